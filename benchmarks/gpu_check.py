"""First-run check of seglstm on one CUDA GPU: correctness, mixed precision, training and speed in one
prepared run of at most 9 minutes, printed as one table.

    python benchmarks/gpu_check.py [--out DIR] [--budget 530]      # on the GPU machine, from the repo root
    python benchmarks/gpu_check.py --cpu-dry-run                   # tiny sizes on the CPU: the script runs

Every stage is its own process with its own timeout (cut so that the later stages keep their share of
``--budget`` seconds), so a crash, a hang or a poisoned CUDA context in one stage cannot stop the others:

  env       torch build, driver, CUDA, TF32, Triton, mlstm_kernels, mamba_ssm
  cell      every mLSTM backend (chunkwise with kernel auto and native, parallel, recurrent) with fp32 and
            bf16 inputs: forward without gradients (the inference path) and the input gradients, against the
            float64 CPU reference (seglstm's own chunkwise kernel, autograd)
  triton    the chunkwise Triton kernel (mlstm_kernel="triton") for head dims 64, 96, 48, 192 and 256 / 4
            tokens, against the same reference; training through it must match or be refused
  amp       a small ViL encoder under bf16 autocast against float32: a training step (loss, gradient cosine)
            and inference (relative error)
  enc_*     forward time of the vil_s, ViT-S/16 and Swin-T encoders at 512 and 1024, batch 1 and 8
  train_*   training step (forward, decode + auxiliary loss, backward, AdamW) of seglstm_upernet_s,
            vit_s_upernet and swin_t_upernet at 512 and 1024, batch 1 and 8
  scene     predict-scene on a 4096x4096 synthetic GeoTIFF, seglstm_upernet_s (vil_s) in bf16, tile 1024:
            Mpx/s and the share of the wall time the GPU spends in the model's forwards (CUDA events), with
            the host's time per pipeline phase
  fit       `seglstm fit` for 20 steps of configs/demo.yaml on the synthetic data, on CUDA, precision auto

On CUDA the timed stages run under bf16 autocast (what ``precision: auto`` gives). ``--cpu-dry-run`` runs
every stage with tiny sizes on the CPU, the Triton stage under Triton's interpreter (``TRITON_INTERPRET=1``).
Rows go to ``<out>/results.jsonl``, the table to stdout and ``<out>/summary.txt``, each stage's output to
``<out>/logs/<stage>.log``.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET = 530  # seconds; the stage maxima below add up to it, leaving time for start-up and the table
DRY_RUN_BUDGET = 1020  # the CPU dry run: a 2-core CPU builds and runs the full-size models slowly
FIT_STEPS = 20
ENV_RESULTS, ENV_DEVICE, ENV_TINY, ENV_DEADLINE, ENV_STAGE = (
    "GC_RESULTS", "GC_DEVICE", "GC_TINY", "GC_DEADLINE", "GC_STAGE"
)  # fmt: skip


# ------------------------------------------------------------------------------------------- child helpers
def _dev() -> str:
    return os.environ.get(ENV_DEVICE, "cuda")


def _tiny() -> bool:
    return os.environ.get(ENV_TINY, "0") == "1"


def _time_left() -> float:
    return float(os.environ.get(ENV_DEADLINE, "inf")) - time.time()


def record(check: str, status: str, value: Any = "", detail: Any = "", stage: str | None = None, **data: Any) -> None:
    """Append one table row to the results file and echo it to the stage's log."""
    row = {"stage": stage or os.environ.get(ENV_STAGE, "?"), "check": check, "status": status,
           "value": str(value), "detail": str(detail)[:400], "data": data}  # fmt: skip
    with open(os.environ[ENV_RESULTS], "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(f"[{row['stage']}] {status:7s} {check}: {value}  {row['detail']}", flush=True)


def where(err: BaseException) -> str:
    """``Type: first line @ file:line`` of the innermost seglstm / mlstm_kernels frame."""
    frames = traceback.extract_tb(err.__traceback__)
    own = [f for f in frames if "seglstm" in f.filename or "mlstm_kernels" in f.filename] or frames
    loc = f" @ {'/'.join(Path(own[-1].filename).parts[-2:])}:{own[-1].lineno}" if own else ""
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:200]}{loc}"


def _is_oom(err: BaseException) -> bool:
    return "out of memory" in str(err).lower() or type(err).__name__ == "OutOfMemoryError"


def _fatal(err: BaseException) -> bool:
    """A CUDA error other than OOM leaves the context unusable: the stage stops."""
    return _dev() == "cuda" and "CUDA error" in str(err) and not _is_oom(err)


def _torch():
    import torch

    if _dev() == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    return torch


def _sync() -> None:
    import torch

    if _dev() == "cuda":
        torch.cuda.synchronize()


def _reset_peak() -> None:
    import torch

    if _dev() == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if _dev() == "cuda" else float("nan")


def _autocast(enabled: bool = True):
    """bf16 autocast on CUDA (``precision: auto``); off in the CPU dry run, where training is float32."""
    import torch

    return torch.autocast(_dev(), dtype=torch.bfloat16, enabled=enabled and _dev() == "cuda")


def _rel(a, b) -> float:
    """max |a - b| / max |b| in float64 on the CPU; inf for NaN/Inf."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not bool(a.isfinite().all()):
        return float("inf")
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _fmt(e: float) -> str:
    return "nan/inf" if not math.isfinite(e) else f"{e:.1e}"


def _timed(fn: Callable[[], Any], reps: int) -> tuple[float, float]:
    """(first call s, median of ``reps`` later calls in ms); fewer repeats when time runs short."""
    t0 = time.perf_counter()
    fn()
    _sync()
    first = time.perf_counter() - t0
    times = []
    for _ in range(1 if first > 2 else reps):
        if times and _time_left() < 4 * first:
            break
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return first, 1000 * statistics.median(times)


# ------------------------------------------------------------------------------------------------------ env
def stage_env() -> None:
    torch = _torch()
    from seglstm.utils.device import cuda_available, resolve_device

    record("torch build", "INFO", torch.__version__, f"CUDA build {torch.version.cuda}, cuDNN "
           f"{torch.backends.cudnn.version()}, python {sys.version.split()[0]}")  # fmt: skip
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError) as err:
        smi = f"nvidia-smi unavailable ({type(err).__name__})"
    record("nvidia-smi", "INFO", (smi.splitlines() or ["(no output)"])[0])
    if _dev() == "cuda":
        if not cuda_available():  # seglstm's warning (cause and fix) is in this stage's log
            record("torch.cuda.is_available", "FAIL", False, f"torch {torch.__version__} is built for CUDA "
                   f"{torch.version.cuda}; with an older driver see README 'GPU with an older NVIDIA driver'")  # fmt: skip
            return
        dev = resolve_device("auto")
        props = torch.cuda.get_device_properties(dev)
        record("torch.cuda.is_available", "PASS", True, f"{torch.cuda.device_count()} device(s); {props.name}, "
               f"sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, bf16 "
               f"{torch.cuda.is_bf16_supported()}")  # fmt: skip
        precision = torch.get_float32_matmul_precision()
        record("TF32 matmuls after resolve_device", "PASS" if precision == "high" else "FAIL", precision,
               f"cuDNN conv fp32_precision {torch.backends.cudnn.conv.fp32_precision}")
    else:
        record("torch.cuda.is_available", "INFO", cuda_available(), "CPU dry run")
    try:
        import triton

        record("triton", "INFO", triton.__version__)
    except ImportError as err:
        record("triton", "FAIL" if _dev() == "cuda" else "INFO", "", where(err))
    try:
        from importlib.metadata import version

        from mlstm_kernels.torch import get_available_mlstm_kernels

        has = "chunkwise--triton_xl_chunk" in get_available_mlstm_kernels()
        record("mlstm_kernels", "PASS" if has or _dev() == "cpu" else "FAIL", version("mlstm_kernels"),
               "Triton chunkwise registered" if has else "Triton chunkwise kernel NOT registered")
    except Exception as err:
        record("mlstm_kernels", "FAIL", "", where(err))
    from seglstm.models import mamba

    record("mamba_ssm", "INFO" if mamba.MAMBA_SSM_AVAILABLE else "WARN", mamba.MAMBA_SSM_AVAILABLE,
           "" if mamba.MAMBA_SSM_AVAILABLE else "mamba_upernet runs the chunked PyTorch scan (pip install 'seglstm[mamba-cuda]')")


# ----------------------------------------------------------------------------------------------------- cell
# Tolerances (output, gradients) on max |x - ref| / max |ref|. float32 allows TF32 GEMMs (on by default on
# CUDA); bf16 is the rounding of the bf16 inputs (the cell computes in float32).
TOL = {"float32": (5e-3, 2e-2), "bfloat16": (4e-2, 1.5e-1)}


def _cell_inputs(shape: tuple[int, int, int, int], seed: int):
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    b, nh, s, d = shape
    q, k, v = (torch.randn(b, nh, s, d, generator=g, dtype=torch.float64) for _ in range(3))
    i = torch.randn(b, nh, s, generator=g, dtype=torch.float64)  # input gate N(0, 1)
    f = 3.0 + 2.0 * torch.randn(b, nh, s, generator=g, dtype=torch.float64)  # forget gate N(3, 2)
    w = torch.randn(b, nh, s, d, generator=g, dtype=torch.float64)  # loss weights
    return [q, k, v, i, f], w


def _run_cell(xs, w, backend: str, kernel: str, device, dtype, grad: bool):
    torch = _torch()
    from seglstm.models.vil import mlstm

    ins = [x.to(device=device, dtype=dtype).detach().requires_grad_(grad) for x in xs]
    with torch.set_grad_enabled(grad):
        h = mlstm(*ins, backend=backend, kernel=kernel)
        if grad:
            (h.double() * w.to(device)).sum().backward()
    _sync()
    return h.detach(), [x.grad for x in ins] if grad else None


def _reference(shape, seed):
    torch = _torch()
    xs, w = _cell_inputs(shape, seed)
    h, g = _run_cell(xs, w, "chunkwise", "native", torch.device("cpu"), torch.float64, grad=True)
    return xs, w, h, g


def _check_cell(name: str, ref, backend: str, kernel: str, dtype, triton_stage: bool = False) -> bool:
    """One case: no-grad forward, then forward + backward; False when the CUDA context is lost."""
    torch = _torch()
    from seglstm.models.vil import wants_triton

    xs, w, ref_h, ref_g = ref
    dev = torch.device(_dev())
    tol_h, tol_g = TOL[str(dtype).split(".")[-1]]
    with torch.no_grad():
        path = "triton" if backend == "chunkwise" and wants_triton(torch.empty(0, device=dev), kernel) else "torch"
    if triton_stage and path != "triton":
        record(name, "SKIP", "", "this build does not hand these tensors to Triton (CPU without interpreter support)")
        return True
    try:
        h0, _ = _run_cell(xs, w, backend, kernel, dev, dtype, grad=False)
        e0 = _rel(h0, ref_h)
    except Exception as err:
        record(name, "FAIL", f"no-grad forward [{path}] raised", where(err))
        return not _fatal(err)
    parts, worst = [f"nograd[{path}] h {_fmt(e0)}"], e0 / tol_h
    try:
        h1, g1 = _run_cell(xs, w, backend, kernel, dev, dtype, grad=True)
        ge = [_rel(a, b) if a is not None else float("inf") for a, b in zip(g1, ref_g)]
        parts.append(f"grad h {_fmt(_rel(h1, ref_h))} q {_fmt(ge[0])} k {_fmt(ge[1])} v {_fmt(ge[2])} "
                     f"i {_fmt(ge[3])} f {_fmt(ge[4])}")  # fmt: skip
        worst = max(worst, _rel(h1, ref_h) / tol_h, *(e / tol_g for e in ge))
        detail = f"tol h {tol_h:g}, grads {tol_g:g}"
    except Exception as err:
        if path == "triton" and not _fatal(err) and not _is_oom(err):
            # Training through Triton may be refused with a reason; that is a correct outcome.
            parts.append("training refused")
            detail = where(err)
        else:
            record(name, "FAIL", " | ".join(parts) + " | grad run raised", where(err))
            return not _fatal(err)
    status = "PASS" if worst <= 1 else "WARN" if worst <= 5 else "FAIL"
    record(name, status, " | ".join(parts), detail, max_err_over_tol=worst)
    return True


def stage_cell() -> None:
    torch = _torch()
    shapes = {"A": (1, 2, 40, 16), "B": (1, 1, 9, 8)} if _tiny() else {"A": (2, 2, 256, 192), "B": (1, 2, 100, 64)}
    refs = {key: _reference(shape, seed=1000 + shape[2]) for key, shape in shapes.items()}
    record("reference", "INFO", "float64 CPU chunkwise, autograd", ", ".join(f"{k}={v}" for k, v in shapes.items()))
    f32, bf16 = torch.float32, torch.bfloat16
    cases = [  # most important first: a stage cut short by its timeout loses the tail
        ("chunkwise", "auto", f32, "A"), ("chunkwise", "auto", bf16, "A"), ("chunkwise", "native", f32, "A"),
        ("parallel", "auto", f32, "A"), ("recurrent", "auto", f32, "A"), ("chunkwise", "auto", f32, "B"),
        ("chunkwise", "native", bf16, "A"), ("parallel", "auto", bf16, "A"), ("recurrent", "auto", bf16, "A"),
    ]  # fmt: skip
    for backend, kernel, dtype, key in cases:
        name = f"{backend}/{kernel} {str(dtype).split('.')[-1]} {key}{shapes[key]}"
        if _time_left() < 8:
            record(name, "SKIP", "", "stage time budget used up")
        elif not _check_cell(name, refs[key], backend, kernel, dtype):
            return


def stage_triton() -> None:
    torch = _torch()
    dims = (16, 24) if _tiny() else (64, 96, 48, 192)  # 96: ViL-T/demo width; 48 and 96 need padding
    long_seq = 32 if _tiny() else 256
    cases = [(d, long_seq, torch.float32) for d in dims]
    cases += [(dims[0], 4, torch.float32), (dims[0], long_seq, torch.bfloat16)]
    for d, s, dtype in cases:
        name = f"chunkwise/triton {str(dtype).split('.')[-1]} head dim {d}, {s} tokens"
        if _time_left() < 8:
            record(name, "SKIP", "", "stage time budget used up")
            continue
        ref = _reference((1, 2, s, d), seed=d * 100 + s)
        if not _check_cell(name, ref, "chunkwise", "triton", dtype, triton_stage=True):
            return


# ------------------------------------------------------------------------------------------------------ amp
def stage_amp() -> None:
    """bf16 autocast against float32 on a small ViL encoder (head dim 64): training and inference."""
    torch = _torch()
    from seglstm.models.vil import VisionLSTM

    size = 64 if _tiny() else 256
    torch.manual_seed(0)
    enc = VisionLSTM(img_size=size, patch_size=16, embed_dim=128, depths=(1, 1), num_heads=4).to(_dev())
    x = torch.randn(2, 3, size, size, device=_dev())
    label = "bf16 autocast" if _dev() == "cuda" else "autocast off (CPU dry run)"

    def grads(amp: bool) -> tuple[float, torch.Tensor]:
        enc.train()
        enc.zero_grad(set_to_none=True)
        with _autocast(amp):
            loss = sum(o.float().pow(2).mean() for o in enc(x))
        loss.backward()
        _sync()
        return float(loss), torch.cat([p.grad.flatten().float() for p in enc.parameters() if p.grad is not None])

    try:
        (loss32, g32), (loss16, g16) = grads(False), grads(True)
        cos = float(torch.nn.functional.cosine_similarity(g16, g32, dim=0))
        finite = bool(g16.isfinite().all())
        record(f"ViL training step, {label} vs fp32", "PASS" if finite and cos >= 0.99 else "FAIL",
               f"gradient cosine {cos:.4f}", f"loss {loss16:.4f} vs {loss32:.4f}; need cosine >= 0.99")
    except Exception as err:
        record(f"ViL training step, {label}", "FAIL", "raised", where(err))
        if _fatal(err):
            return
    for kernel in ("auto", "native"):
        try:
            enc.eval()
            for m in enc.modules():
                if hasattr(m, "mlstm_kernel"):
                    m.mlstm_kernel = kernel
            with torch.no_grad():
                ref = [t.float() for t in enc(x)]
                with _autocast():
                    out = enc(x)
            _sync()
            e = max(float((a.float() - b).norm() / b.norm()) for a, b in zip(out, ref))
            record(f"ViL inference, {label}, kernel {kernel}", "PASS" if e < 1e-2 else "FAIL",
                   f"relative L2 error {_fmt(e)}", "need < 1%")
        except Exception as err:
            record(f"ViL inference, {label}, kernel {kernel}", "FAIL", "raised", where(err))
            if _fatal(err):
                return


# ---------------------------------------------------------------------------------------------------- speed
def _sizes() -> tuple[list[int], list[int]]:
    return ([64], [1, 2]) if _tiny() else ([512, 1024], [1, 8])


def _peak() -> str:
    return f", peak {_peak_gib():.2f} GiB" if _dev() == "cuda" else ""


def stage_enc(name: str) -> None:
    """Encoder forward time, no gradients."""
    torch = _torch()
    import seglstm

    if name == "vil_s":
        net = seglstm.create_encoder("vil_s")
    else:  # the timm encoders exactly as the comparison segmentors use them
        net = seglstm.create_model(f"{name}_upernet", num_classes=7).backbone
    net = net.to(_dev()).eval()
    per_pixel = 0.0
    sizes, batches = _sizes()
    for size in sizes:
        for b in batches:
            check = f"{name} encoder fwd {size}px b{b}"
            if _time_left() < 8 + 4 * per_pixel * size * size * b:
                record(check, "SKIP", "", f"{_time_left():.0f}s left in the stage")
                continue
            try:
                _reset_peak()
                x = torch.randn(b, 3, size, size, device=_dev())
                with torch.no_grad(), _autocast():
                    first, ms = _timed(lambda: net(x), reps=3)  # noqa: B023
                per_pixel = ms / 1000 / (size * size * b)
                record(check, "PASS", f"{ms:.1f} ms", f"{1000 * b / ms:.1f} img/s, first call {first:.2f}s{_peak()}",
                       kind="enc", model=name, size=size, batch=b, ms=ms)  # fmt: skip
            except Exception as err:
                record(check, "OOM" if _is_oom(err) else "FAIL", "", where(err))
                if _fatal(err):
                    return
            finally:
                x = None


def stage_train(name: str) -> None:
    """Training step of a segmentor: forward, loss, backward, AdamW."""
    torch = _torch()
    import seglstm

    torch.manual_seed(0)
    model = seglstm.create_model(name, num_classes=7).to(_dev()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    per_pixel = 0.0
    sizes, batches = _sizes()
    for size in sizes:
        for b in batches:
            check = f"{name} train step {size}px b{b}"
            if _time_left() < 8 + 4 * per_pixel * size * size * b:
                record(check, "SKIP", "", f"{_time_left():.0f}s left in the stage")
                continue
            if b == 1:  # a 1x1 pooled map cannot be batch-normalised over one image
                for m in model.modules():
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                        m.eval()
            else:
                model.train()
            x = torch.randn(b, 3, size, size, device=_dev())
            y = torch.randint(0, 7, (b, size, size), device=_dev())
            losses: list[float] = []

            def step() -> None:
                with _autocast():
                    loss = model.loss(x, y)["loss"]  # noqa: B023
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))  # noqa: B023

            try:
                _reset_peak()
                first, ms = _timed(step, reps=3)
                lv = losses[-1]
                per_pixel = ms / 1000 / (size * size * b)
                record(check, "PASS" if math.isfinite(lv) else "FAIL", f"{ms:.0f} ms/step",
                       f"{1000 * b / ms:.1f} img/s{_peak()}, loss {lv:.3f}, first {first:.1f}s",
                       kind="train", model=name, size=size, batch=b, ms=ms)  # fmt: skip
            except Exception as err:
                opt.zero_grad(set_to_none=True)
                record(check, "OOM" if _is_oom(err) else "FAIL", "raised", where(err))
                if _fatal(err):
                    return
            finally:
                x = y = None


# ---------------------------------------------------------------------------------------------------- scene
def _forward_timer(model):
    """``model`` whose forwards are bracketed by CUDA events (wall clock on the CPU), so that the share of
    the run in which the device computes the model can be read off afterwards."""
    torch = _torch()

    class Timed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.spans, self.cpu_s = model, [], 0.0

        def forward(self, x):
            if x.is_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                y = self.model(x)
                end.record()
                self.spans.append((start, end))
                return y
            t0 = time.perf_counter()
            y = self.model(x)
            self.cpu_s += time.perf_counter() - t0
            return y

        def busy_s(self) -> float:
            _sync()
            return self.cpu_s + sum(a.elapsed_time(b) for a, b in self.spans) / 1000

    return Timed()


def stage_scene() -> None:
    """predict-scene on a synthetic GeoTIFF with seglstm_upernet_s (vil_s) in bf16: Mpx/s and the share of
    the wall time in which the device runs the model (the rest is reading, blending and writing)."""
    torch = _torch()
    import numpy as np
    import rasterio

    import seglstm
    from seglstm.inference.scene import ScenePredictor

    sys.path.insert(0, str(REPO / "benchmarks"))
    from scene_memory import child_make

    side, tile = (256, 128) if _tiny() else (4096, 1024)
    precision = "bf16" if _dev() == "cuda" else "fp32"
    tmp = tempfile.TemporaryDirectory(prefix="scene_", dir=Path(os.environ[ENV_RESULTS]).parent)
    work = Path(tmp.name)
    scene, warm = work / f"scene_{side}.tif", work / f"warm_{tile}.tif"
    child_make(side, str(scene))
    child_make(tile, str(warm))
    torch.manual_seed(0)
    timed = _forward_timer(seglstm.create_model("seglstm_upernet_s", num_classes=7))
    check = f"predict-scene {side}x{side} vil_s {precision} tile {tile}"
    try:
        pred = ScenePredictor(timed, [123.675, 116.28, 103.53], [58.395, 57.12, 57.375], [f"c{i}" for i in range(7)],
                              [(30 * i, 60, 90) for i in range(7)], tile=tile, overlap=tile // 4, batch_size=4,
                              device=_dev(), precision=precision, progress=False)  # fmt: skip
        pred.predict(warm, work / "warm_out.tif")  # first call: kernels compiled and tuned
        timed.spans, timed.cpu_s = [], 0.0
        _reset_peak()
        t0 = time.perf_counter()
        result = pred.predict(scene, work / "classes.tif")
        wall = time.perf_counter() - t0
        busy = timed.busy_s()
        with rasterio.open(work / "classes.tif") as out:
            classes = out.read(1)
        ok = classes.shape == (side, side) and int(classes.max()) < 7
        phases = ", ".join(f"{k} {v:.2f}s" for k, v in pred.profile.items() if v >= 0.005)
        record(check, "PASS" if ok else "FAIL", f"{side * side / 1e6 / wall:.3g} Mpx/s, model busy {busy / wall:.0%}",
               f"wall {wall:.1f}s, {result.tiles} tiles, forward {busy:.1f}s{_peak()}; host phases: {phases}; "
               f"classes {np.unique(classes).tolist()}", kind="scene", wall_s=wall, busy_s=busy,
               profile=pred.profile)  # fmt: skip
    except Exception as err:
        record(check, "OOM" if _is_oom(err) else "FAIL", "raised", where(err))
    finally:
        tmp.cleanup()


# ------------------------------------------------------------------------------------------------ parent
def _fit_row(run_dir: Path, log: Path, rc: int | str, steps_wanted: int) -> None:
    """The fit stage's row, from the run's metrics.csv and log."""
    rows: list[dict[str, str]] = []
    for path in sorted(glob.glob(str(run_dir / "logs" / "version_*" / "metrics.csv"))):
        with open(path, newline="") as fh:
            rows += list(csv.DictReader(fh))
    steps, loss = -1, float("nan")
    for r in rows:
        if (r.get("step") or "").strip():
            steps = max(steps, int(float(r["step"])))
        if (r.get("train/loss") or "").strip():
            loss = float(r["train/loss"])
    text = log.read_text(errors="replace") if log.exists() else ""
    gpu = re.search(r"GPU available: [^\n]*", text)
    errors = [ln.strip() for ln in text.splitlines() if re.match(r"^\s*(\w+\.)*\w*(Error|Exception)\b", ln)]
    ckpts = sorted(p.name for p in run_dir.rglob("*.ckpt"))
    ok = str(rc) == "0" and steps >= steps_wanted - 2 and math.isfinite(loss)
    detail = (f"rc {rc}; {gpu.group(0) if gpu else 'no GPU line'}; checkpoints {','.join(ckpts) or '-'}"
              + (f"; last error: {errors[-1][:200]}" if errors else ""))  # fmt: skip
    record(f"seglstm fit {steps_wanted} steps", "PASS" if ok else "FAIL",
           f"last logged step {steps}, train/loss {_fmt(loss)}", detail, stage="fit")


def _stage_exit_row(name: str, status: str, seconds: float, log: Path, rc: int | str) -> None:
    detail = ""
    if status != "OK" and log.exists():
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        errs = [ln for ln in lines if re.search(r"(Error|Exception|error:|Aborted|Segmentation|illegal memory)", ln)]
        detail = (errs or lines or [""])[-1][:300]
        if status == "TIMEOUT":
            detail = f"killed at its time limit; last output: {detail}"
    record(f"stage exit (rc {rc}, {seconds:.0f}s)", status, "", detail, stage=name)


def _run(name: str, cmd: list[str], timeout: float, log: Path, env: dict[str, str]) -> int | str:
    """Run ``cmd`` in its own process group with a hard timeout; returns its exit code or ``timeout``."""
    t0 = time.time()
    env = {**env, ENV_STAGE: name, ENV_DEADLINE: str(t0 + timeout - 3)}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            rc: int | str = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage and its children (data loader workers)
            proc.wait()
            rc = "timeout"
    status = {0: "OK", "timeout": "TIMEOUT", -6: "ABORT", 134: "ABORT", -11: "SEGV", 139: "SEGV"}.get(rc, "ERROR")
    _stage_exit_row(name, status, time.time() - t0, log, rc)
    return rc


def _summary(out: Path, started: float) -> str:
    rows = [json.loads(ln) for ln in open(out / "results.jsonl") if ln.strip()]
    base = {"enc": "vit_s", "train": "vit_s_upernet"}
    ref = {(r["data"]["kind"], r["data"]["size"], r["data"]["batch"]): r["data"]["ms"] for r in rows
           if r["data"].get("model") in base.values() and "ms" in r["data"]}  # fmt: skip
    for r in rows:
        d = r["data"]
        key = (d.get("kind"), d.get("size"), d.get("batch"))
        if "ms" in d and d.get("model") != base.get(d["kind"]) and key in ref:
            r["value"] += f" ({d['ms'] / ref[key]:.2f}x {base[d['kind']]})"
    w = (10, 58, 8, 64)
    lines = [f"seglstm GPU check: {len(rows)} rows in {time.time() - started:.0f}s; folder {out}",
             f"{'STAGE':<{w[0]}} {'CHECK':<{w[1]}} {'STATUS':<{w[2]}} {'VALUE':<{w[3]}} DETAIL", "-" * 180]  # fmt: skip
    for r in rows:
        lines.append(f"{r['stage'][: w[0]]:<{w[0]}} {r['check'][: w[1]]:<{w[1]}} {r['status']:<{w[2]}} "
                     f"{r['value'][:110]:<{w[3]}} {r['detail'][:240]}")  # fmt: skip
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines += ["-" * 180, "totals: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
              "errors are relative, max |x - ref| / max |ref| against the float64 CPU reference; nograd[triton] / "
              f"nograd[torch] name the kernel that ran; per-stage logs in {out / 'logs'}"]  # fmt: skip
    text = "\n".join(lines)
    (out / "summary.txt").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU (proves the script runs)")
    parser.add_argument("--out", default=None, help="output folder (default runs/gpu_check/<time>)")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for all stages (default {DEFAULT_BUDGET}, {DRY_RUN_BUDGET} for the dry run)")
    parser.add_argument("--stage", nargs="+", default=None, help=argparse.SUPPRESS)  # a child's own stage
    args = parser.parse_args(argv)
    if args.stage:
        name, *rest = args.stage
        stages = {"env": stage_env, "cell": stage_cell, "triton": stage_triton, "amp": stage_amp,
                  "enc": stage_enc, "train": stage_train, "scene": stage_scene}  # fmt: skip
        stages[name](*rest)
        return 0

    started = time.time()
    out = Path(args.out or REPO / "runs" / "gpu_check" / time.strftime("%Y%m%d-%H%M%S"))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    results.write_text("")
    dry = args.cpu_dry_run
    budget = args.budget or (DRY_RUN_BUDGET if dry else DEFAULT_BUDGET)
    src = str(REPO / "src")
    env = {**os.environ, ENV_RESULTS: str(results), ENV_DEVICE: "cpu" if dry else "cuda", ENV_TINY: str(int(dry)),
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.update({ENV_RESULTS: str(results), ENV_STAGE: "main"})
    me = [sys.executable, str(Path(__file__).resolve()), "--stage"]
    syn = out / "synthetic"
    fit_dir = out / "fit"
    steps, val_every, batch = (6, 3, 4) if dry else (FIT_STEPS, 10, 16)
    n_train, n_val = (8, 2) if dry else (32, 4)
    fit_cmd = [sys.executable, "-m", "seglstm.cli.main", "fit", "--config", str(REPO / "configs" / "demo.yaml"),
               "--data.root", str(syn), "--data.num_workers", "2", "--data.batch_size", str(batch),
               "--trainer.accelerator", "cpu" if dry else "gpu", "--trainer.devices", "1",
               "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(val_every),
               "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "1",
               "--trainer.enable_progress_bar", "false", "--model.warmup_iters", "2",
               "--trainer.default_root_dir", str(fit_dir)]  # fmt: skip
    plan: list[tuple[str, int, list[str], dict[str, str]]] = [  # (stage, max seconds, command, extra env)
        ("env", 20, [*me, "env"], {}),
        ("cell", 60, [*me, "cell"], {}),
        ("triton", 45, [*me, "triton"], {"TRITON_INTERPRET": "1"} if dry else {}),
        ("amp", 25, [*me, "amp"], {}),
        ("enc_vil_s", 35, [*me, "enc", "vil_s"], {}),
        ("enc_vit_s", 25, [*me, "enc", "vit_s"], {}),
        ("enc_swin_t", 25, [*me, "enc", "swin_t"], {}),
        ("train_seglstm", 45, [*me, "train", "seglstm_upernet_s"], {}),
        ("train_vit", 35, [*me, "train", "vit_s_upernet"], {}),
        ("train_swin", 35, [*me, "train", "swin_t_upernet"], {}),
        ("scene", 60, [*me, "scene"], {}),
        ("synth", 15, [sys.executable, "-m", "seglstm.cli.main", "synth", "--out", str(syn), "--train",
                       str(n_train), "--val", str(n_val), "--size", "256", "--quiet", "--overwrite"], {}),
        ("fit", 80, fit_cmd, {}),
    ]
    scale = budget / sum(p[1] for p in plan)
    reserve = sum(p[1] for p in plan)
    gpu_ok = True
    for name, max_s, cmd, extra in plan:
        reserve -= max_s
        limit = min(max_s * scale, started + budget - time.time() - reserve * scale)
        if not gpu_ok or limit < 6:
            why = "torch cannot use CUDA (see the env rows)" if not gpu_ok else "no time left in the budget"
            record("stage", "SKIP", "", why, stage=name)
            continue
        print(f"== [{name}] timeout {limit:.0f}s, {time.time() - started:.0f}s elapsed", flush=True)
        log = out / "logs" / f"{name}.log"
        rc = _run(name, cmd, limit, log, {**env, **extra})
        if name == "env" and not dry:
            rows = [json.loads(ln) for ln in open(results) if ln.strip()]
            gpu_ok = any(r["check"] == "torch.cuda.is_available" and r["status"] == "PASS" for r in rows)
        if name == "fit":
            _fit_row(fit_dir, log, rc, steps)
    print()
    print(_summary(out, started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
