"""Device and precision choices, made the same way by training, inference and the measurements.

- :func:`resolve_device`: ``"auto"`` means the first CUDA device when torch can use one, else the CPU; a
  CUDA device torch cannot use is an error naming the argument.
- :func:`cuda_available`: ``torch.cuda.is_available()``, plus a loud warning when an NVIDIA GPU is
  installed but torch cannot use it (typically a driver older than the CUDA version the torch wheel was
  built for), instead of a silent run on the CPU.
- :func:`resolve_precision` / :func:`amp_dtype`: the Lightning precision for training and the autocast
  dtype it implies.
- :func:`resolve_inference_precision`: the autocast dtype for inference. ``"auto"`` is bf16 (fp16 where
  bf16 is unsupported) on CUDA, and bf16 on a CPU only where it has native bf16 GEMMs
  (:func:`cpu_has_native_bf16`); elsewhere bf16 is emulated and slower than float32.
- :func:`enable_tf32`: TF32 float32 matmuls, applied whenever a CUDA device is chosen for training or
  inference (convolutions already default to TF32 in cuDNN).
"""

from __future__ import annotations

import functools
import shutil
import warnings
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = [
    "MIXED_PRECISIONS",
    "amp_dtype",
    "cpu_has_native_bf16",
    "cuda_available",
    "enable_tf32",
    "nvidia_gpu_evidence",
    "resolve_device",
    "resolve_inference_precision",
    "resolve_precision",
    "wants_cuda",
]

MIXED_PRECISIONS = ("16-mixed", "bf16-mixed", "16", "bf16", 16, "16-true", "bf16-true")
InferencePrecision = Literal["auto", "fp32", "bf16", "fp16"]
_INFERENCE_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# The README section that says how to install a torch build for an older NVIDIA driver.
_DRIVER_HELP = "README.md, 'GPU with an older NVIDIA driver'"
_warned_unusable_gpu = False


def nvidia_gpu_evidence() -> str | None:
    """What shows that an NVIDIA GPU and driver are installed (None if nothing does)."""
    for path in ("/proc/driver/nvidia/version", "/dev/nvidia0"):
        if Path(path).exists():
            return path
    smi = shutil.which("nvidia-smi")
    return f"{smi} on PATH" if smi else None


def _unusable_gpu_message(evidence: str) -> str:
    built_for = torch.version.cuda
    if built_for is None:
        cause = f"this torch {torch.__version__} is a CPU-only build"
    else:
        cause = (
            f"this torch {torch.__version__} is built for CUDA {built_for}, and the installed NVIDIA driver is "
            f"probably older than CUDA {built_for} needs (`nvidia-smi` shows the driver and the highest CUDA "
            "version it supports)"
        )
    return (
        f"An NVIDIA GPU is installed ({evidence}) but torch cannot use it (torch.cuda.is_available() is False), "
        f"so this runs on the CPU. Likely cause: {cause}. Either update the driver or install a torch build for "
        "the driver's CUDA version, e.g. `pip install torch==2.14.1 torchvision==0.29.1 --index-url "
        f"https://download.pytorch.org/whl/cu126` (see {_DRIVER_HELP})"
    )


def cuda_available() -> bool:
    """``torch.cuda.is_available()``; warns once per process when an NVIDIA GPU is present but unusable."""
    global _warned_unusable_gpu
    if torch.cuda.is_available():
        return True
    if not _warned_unusable_gpu:
        evidence = nvidia_gpu_evidence()
        if evidence is not None:
            _warned_unusable_gpu = True
            warnings.warn(_unusable_gpu_message(evidence), RuntimeWarning, stacklevel=2)
    return False


def enable_tf32() -> None:
    """TF32 tensor cores for float32 matmuls (~8x the fp32 rate on Ampere and later, 10-bit mantissa).

    Uses ``torch.set_float32_matmul_precision("high")``, which Lightning's own check reads. A precision the
    user set explicitly ("medium", or the per-backend ``fp32_precision`` API) is left as it is.
    """
    try:
        current = torch.get_float32_matmul_precision()
    except RuntimeError:  # the per-backend API was used: the user chose
        return
    if current == "highest":
        torch.set_float32_matmul_precision("high")


def resolve_device(device: str | torch.device | None = None, *, what: str = "device") -> torch.device:
    """``None``/``"auto"``: the first CUDA device when torch can use one, else the CPU.

    ``what`` names the argument in the error (e.g. ``"--device"``). Choosing CUDA turns on TF32 matmuls.
    """
    if device is None or str(device) == "auto":
        dev = torch.device("cuda" if cuda_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"{what} {device!r}: not a device (use auto, cpu, cuda or cuda:N)") from err
        if dev.type == "cuda":
            if not cuda_available():
                raise ValueError(f"{what} {device!r}: CUDA is not available on this machine")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ValueError(f"{what} {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if dev.type == "cuda":
        enable_tf32()
    return dev


def wants_cuda(accelerator: Any) -> bool:
    """Whether a Lightning ``accelerator`` (string or instance) trains on CUDA; ``auto`` = if available."""
    if isinstance(accelerator, str):
        if accelerator in ("cuda", "gpu"):
            return True
        return accelerator == "auto" and cuda_available()
    return type(accelerator).__name__ == "CUDAAccelerator"


def resolve_precision(precision: Any, accelerator: Any = "auto") -> Any:
    """Lightning precision for training: ``auto`` -> bf16-mixed (16-mixed without bf16) on CUDA, 32-true
    elsewhere. Mixed precision off CUDA is refused: it is slow on most CPUs and the CPU numbers are float32.
    Training on CUDA turns on TF32 matmuls."""
    cuda = wants_cuda(accelerator)
    if cuda:
        enable_tf32()
    if precision in (None, "auto"):
        if not cuda:
            return "32-true"
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if precision in MIXED_PRECISIONS and not cuda:
        raise ValueError(
            f"trainer.precision={precision!r} needs a CUDA device (accelerator={accelerator!r}); use 'auto' or "
            "'32-true' on the CPU"
        )
    return precision


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype a Lightning precision string implies on ``device`` (None = plain float32)."""
    if device.type != "cuda":
        return None
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 GEMMs natively (AVX512-BF16 or AMX-BF16), so bf16 beats float32.

    torch's dispatch level (``torch.backends.cpu.get_cpu_capability()``) says whether it uses AVX-512 or AMX
    kernels at all; the CPU flags say whether those have the bf16 instructions. Without them oneDNN emulates
    bf16 and it is slower than float32.
    """
    capability = torch.backends.cpu.get_cpu_capability().upper()
    if not capability.startswith(("AVX512", "AMX")):
        return False
    return bool({"avx512_bf16", "amx_bf16"} & _cpuinfo_flags())


def resolve_inference_precision(
    requested: InferencePrecision, device: torch.device | str, *, what: str = "precision"
) -> torch.dtype | None:
    """Autocast dtype for inference (None = plain float32).

    ``"auto"``: bf16 on CUDA (fp16 where bf16 is unsupported); on a CPU bf16 where it is native
    (:func:`cpu_has_native_bf16`), float32 elsewhere. ``"bf16"`` and ``"fp16"`` are taken as asked.
    """
    dev = torch.device(device)
    if requested == "auto":
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if dev.type == "cpu":
            return torch.bfloat16 if cpu_has_native_bf16() else None
        return None
    if requested not in _INFERENCE_DTYPES:
        raise ValueError(f"{what} {requested!r}: expected auto, fp32, bf16 or fp16")
    return _INFERENCE_DTYPES[requested]

