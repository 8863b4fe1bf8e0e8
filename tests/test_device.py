"""seglstm.utils.device: the one device/precision resolver (training, inference, measurements), the warning
for an NVIDIA GPU that torch cannot use, TF32 on CUDA and the CPU bf16 detection. CUDA is mocked."""

import warnings
from pathlib import Path

import pytest
import torch

from seglstm.utils import device as dv


@pytest.fixture
def no_gpu(monkeypatch):
    """No NVIDIA driver visible and no CUDA: the plain CPU machine."""
    monkeypatch.setattr(dv, "nvidia_gpu_evidence", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def unusable_gpu(monkeypatch):
    """A driver is installed but torch cannot use the GPU (the too-old-driver case)."""
    monkeypatch.setattr(dv, "nvidia_gpu_evidence", lambda: "/dev/nvidia0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dv, "_warned_unusable_gpu", False)


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch sees one CUDA device; the float32 matmul precision is restored afterwards."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def test_resolve_device_on_a_cpu_machine(no_gpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning without an NVIDIA GPU
        assert dv.resolve_device() == torch.device("cpu")
        assert dv.resolve_device("auto") == torch.device("cpu")
        assert dv.resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--device 'cuda:1': CUDA is not available"):
        dv.resolve_device("cuda:1", what="--device")
    with pytest.raises(ValueError, match=r"--device 'gpu0': not a device"):
        dv.resolve_device("gpu0", what="--device")


def test_resolve_device_with_cuda_checks_the_index_and_enables_tf32(fake_cuda):
    torch.set_float32_matmul_precision("highest")
    assert dv.resolve_device("auto") == torch.device("cuda")
    assert torch.get_float32_matmul_precision() == "high"
    assert dv.resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"'cuda:1': only 1 CUDA device"):
        dv.resolve_device("cuda:1")


def test_enable_tf32_keeps_an_explicit_choice(fake_cuda):
    torch.set_float32_matmul_precision("medium")
    dv.enable_tf32()
    assert torch.get_float32_matmul_precision() == "medium"


def test_unusable_gpu_warns_once_naming_cause_and_fix(unusable_gpu):
    with pytest.warns(RuntimeWarning) as record:
        assert dv.resolve_device("auto") == torch.device("cpu")
    message = str(record[0].message)
    assert "/dev/nvidia0" in message and "torch.cuda.is_available() is False" in message
    cause = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    assert cause in message
    assert "pip install torch==" in message and "--index-url https://download.pytorch.org/whl/" in message
    assert "README.md" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not dv.cuda_available()  # once per process


def test_unusable_gpu_warns_for_training_auto(unusable_gpu):
    with pytest.warns(RuntimeWarning, match="cannot use it"):
        assert dv.resolve_precision("auto", "auto") == "32-true"


@pytest.mark.parametrize(
    ("exists", "smi", "want"),
    [
        ({"/proc/driver/nvidia/version"}, None, "/proc/driver/nvidia/version"),
        ({"/dev/nvidia0"}, None, "/dev/nvidia0"),
        (set(), "/usr/bin/nvidia-smi", "/usr/bin/nvidia-smi on PATH"),
        (set(), None, None),
    ],
)
def test_nvidia_gpu_evidence(monkeypatch, exists, smi, want):
    monkeypatch.setattr(Path, "exists", lambda self: str(self) in exists)
    monkeypatch.setattr(dv.shutil, "which", lambda name: smi if name == "nvidia-smi" else None)
    assert dv.nvidia_gpu_evidence() == want


def test_resolve_precision(no_gpu, monkeypatch):
    assert dv.resolve_precision("auto", "cpu") == "32-true"
    assert dv.resolve_precision(None, "auto") == "32-true"
    assert dv.resolve_precision("32-true", "cpu") == "32-true"
    for mixed in ("bf16-mixed", "16-mixed", 16):
        with pytest.raises(ValueError, match="needs a CUDA device"):
            dv.resolve_precision(mixed, "cpu")


def test_resolve_precision_on_cuda(fake_cuda, monkeypatch):
    torch.set_float32_matmul_precision("highest")
    assert dv.resolve_precision("auto", "gpu") == "bf16-mixed"
    assert torch.get_float32_matmul_precision() == "high"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert dv.resolve_precision("auto", "auto") == "16-mixed"
    assert dv.resolve_precision("32-true", "cuda") == "32-true"


def test_amp_dtype():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert dv.amp_dtype("bf16-mixed", cuda) is torch.bfloat16
    assert dv.amp_dtype("16-mixed", cuda) is torch.float16
    assert dv.amp_dtype("32-true", cuda) is None
    assert dv.amp_dtype("bf16-mixed", cpu) is None


@pytest.mark.parametrize(
    ("capability", "flags", "native"),
    [
        ("AVX512", {"avx512f", "avx512_bf16"}, True),
        ("AMX", {"amx_tile", "amx_bf16"}, True),
        ("AVX512", {"avx512f", "avx512bw"}, False),  # AVX-512 without its bf16 extension: emulated
        ("AVX2", {"avx2", "avx512_bf16"}, False),  # torch dispatches AVX2 kernels here
        ("DEFAULT", set(), False),
    ],
)
def test_cpu_has_native_bf16(monkeypatch, capability, flags, native):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(dv, "_cpuinfo_flags", lambda: flags)
    dv.cpu_has_native_bf16.cache_clear()
    try:
        assert dv.cpu_has_native_bf16() is native
    finally:
        dv.cpu_has_native_bf16.cache_clear()


def test_cpuinfo_flags_reads_this_machine():
    flags = dv._cpuinfo_flags()
    if Path("/proc/cpuinfo").exists():
        assert flags and all(f == f.strip() and f for f in flags)


@pytest.mark.parametrize("native", [True, False])
def test_inference_precision_auto_on_cpu_follows_native_bf16(monkeypatch, native):
    monkeypatch.setattr(dv, "cpu_has_native_bf16", lambda: native)
    want = torch.bfloat16 if native else None
    assert dv.resolve_inference_precision("auto", "cpu") is want
    assert dv.resolve_inference_precision("auto", torch.device("cpu")) is want


def test_inference_precision_explicit_and_cuda(fake_cuda, monkeypatch):
    monkeypatch.setattr(dv, "cpu_has_native_bf16", lambda: False)
    assert dv.resolve_inference_precision("fp32", "cpu") is None
    assert dv.resolve_inference_precision("bf16", "cpu") is torch.bfloat16  # asked for: taken even if emulated
    assert dv.resolve_inference_precision("fp16", "cuda") is torch.float16
    assert dv.resolve_inference_precision("auto", "cuda:0") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert dv.resolve_inference_precision("auto", "cuda") is torch.float16
    with pytest.raises(ValueError, match=r"--precision 'int8': expected auto, fp32, bf16 or fp16"):
        dv.resolve_inference_precision("int8", "cpu", what="--precision")


def test_one_implementation():
    """Training and the measurements use this module's functions, not copies."""
    from seglstm.study import measure
    from seglstm.training import trainer

    assert trainer.resolve_precision is dv.resolve_precision
    assert trainer.wants_cuda is dv.wants_cuda
    assert measure.resolve_device is dv.resolve_device
    assert measure.amp_dtype is dv.amp_dtype


def test_one_implementation_in_scene_and_compare():
    """Scene inference and the comparison study resolve devices here too, not with their own CUDA checks."""
    from seglstm.inference.scene import predictor
    from seglstm.study import compare

    assert predictor.resolve_device is dv.resolve_device
    assert compare.resolve_device is dv.resolve_device
    assert compare.cuda_available is dv.cuda_available


def test_scene_device_errors_are_scene_errors(no_gpu):
    from seglstm.inference.scene import SceneError, ScenePredictor

    with pytest.raises(SceneError, match=r"--device 'cuda:0': CUDA is not available"):
        ScenePredictor(torch.nn.Identity(), [0.0], [1.0], ["a"], [(0, 0, 0)], tile=64, overlap=0, device="cuda:0")
    with pytest.raises(SceneError, match=r"--device 'gpu0': not a device"):
        ScenePredictor(torch.nn.Identity(), [0.0], [1.0], ["a"], [(0, 0, 0)], tile=64, overlap=0, device="gpu0")
    assert ScenePredictor(torch.nn.Identity(), [0.0], [1.0], ["a"], [(0, 0, 0)], tile=64, overlap=0).device == (
        torch.device("cpu")
    )


def test_compare_devices_with_and_without_cuda(no_gpu, monkeypatch):
    from seglstm.study import compare

    with pytest.raises(ValueError, match=r"--accelerator 'cuda': CUDA is not available"):
        compare.parse_devices("1", "cuda")
    assert compare.parse_devices("auto", "auto") == ("cpu", 1, "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    before = torch.get_float32_matmul_precision()
    try:
        assert compare.parse_devices("auto", "auto") == ("cuda", [0], "cuda:0")
        assert compare.parse_devices("1,", "gpu") == ("cuda", [1], "cuda:1")
        assert compare.parse_devices("[1]", "cuda") == ("cuda", [1], "cuda:1")
        with pytest.raises(ValueError, match=r"--devices 'cuda:2': only 2 CUDA device\(s\) visible"):
            compare.parse_devices("cuda:2", "auto")
    finally:
        torch.set_float32_matmul_precision(before)
