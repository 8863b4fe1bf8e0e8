"""Cost measurements that every row of a comparison takes the same way: size, FLOPs, speed and peak memory.

Speed and memory are measured in a fresh child process per configuration (:func:`run_isolated`): on the CPU
the only peak-memory signal is the process's resident-set high-water mark, which never goes down, so two
measurements in one process would contaminate each other. On CUDA the allocator's peak counter is reset
instead. Children come from a fork server that has already imported torch, Lightning and seglstm, so a
measurement costs its own work and not another 5-15 s of imports.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from seglstm.utils.device import amp_dtype, resolve_device

__all__ = [
    "amp_dtype",
    "complexity",
    "inference_speed",
    "machine_info",
    "memory_baseline",
    "peak_memory_mib",
    "resolve_device",
    "run_isolated",
    "time_call",
    "training_speed",
]

# Imported once by the fork server, so that every measurement child starts with them loaded.
_PRELOAD = [
    "torch",
    "lightning.pytorch",
    "seglstm.models",
    "seglstm.data.datamodule",
    "seglstm.training.task",
    "seglstm.training.trainer",
    "seglstm.study.measure",
    "seglstm.study.jobs",
]


# -- machine --------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str | None:
    """Commit of the source tree the numbers were taken with, ``+dirty`` when it had local changes."""
    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    """What a reader needs to weigh the numbers: CPU/GPU, cores, threads, memory, load, versions, commit."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(terse=True),
        "git": _git_revision(),
    }
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_count"] = torch.cuda.device_count()
    return info


# -- timing and memory ----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], Any],
    device: torch.device,
    repeats: int = 3,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median wall time of ``fn`` in seconds over ``repeats`` calls after ``warmup`` untimed ones.

    ``clock`` is the time source (tests pass a fake one rather than sleep).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        _sync(device)
        times.append(clock() - start)
    return statistics.median(times)


def _rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def memory_baseline(device: torch.device) -> float:
    """Start a peak-memory window: reset CUDA's peak counter, or note the CPU high-water mark so far."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return float(torch.cuda.memory_allocated(device)) / 2**20
    return _rss_peak_mib()


def peak_memory_mib(device: torch.device, baseline: float) -> float:
    """Peak memory since :func:`memory_baseline`, in MiB above what was in use at that point.

    CUDA: the allocator's peak of tensor memory. CPU: growth of the process's resident-set high-water mark,
    which also counts allocator caches and library workspaces, as the operating system sees them.
    """
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)) / 2**20 - baseline
    return _rss_peak_mib() - baseline


# -- model costs ----------------------------------------------------------------------------------------


def complexity(name: str, num_classes: int, overrides: Mapping[str, Any] | None = None,
               size: int = 512) -> dict[str, int]:
    """Parameters and FLOPs (2 x MACs, see :mod:`seglstm.models.flops`) of one forward at ``size`` x ``size``.

    The model is built on the ``meta`` device: shapes only, no memory and no arithmetic.
    """
    from seglstm.models.flops import count_flops, count_params
    from seglstm.models.registry import create_model

    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, **dict(overrides or {}))
    return {"params": count_params(model), "flops": count_flops(model, (1, 3, size, size))}


def inference_speed(
    name: str,
    num_classes: int,
    overrides: Mapping[str, Any] | None = None,
    size: int = 512,
    batch: int = 1,
    device: str = "cpu",
    repeats: int = 3,
    warmup: int = 1,
    precision: str = "32-true",
    seed: int = 0,
) -> dict[str, Any]:
    """Whole-image inference (``model(x)``: logits at the input size) on random ``batch`` x 3 x size x size.

    Returns ``seconds`` per batch (median), ``images_per_s`` and ``peak_mib`` (model weights included).
    Run it in a fresh process (:func:`run_isolated`) for a clean CPU peak.
    """
    from seglstm.models.registry import create_model

    dev = resolve_device(device)
    torch.manual_seed(seed)
    base = memory_baseline(dev)
    model = create_model(name, num_classes=num_classes, **dict(overrides or {})).to(dev).eval()
    x = torch.randn(batch, 3, size, size, device=dev)
    dtype = amp_dtype(precision, dev)
    with torch.no_grad(), torch.autocast(dev.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        seconds = time_call(lambda: model(x), dev, repeats=repeats, warmup=warmup)
    return {"seconds": seconds, "images_per_s": batch / seconds, "peak_mib": peak_memory_mib(dev, base)}


def training_speed(
    name: str,
    num_classes: int,
    overrides: Mapping[str, Any] | None = None,
    size: int = 512,
    batch: int = 2,
    device: str = "cpu",
    repeats: int = 3,
    warmup: int = 1,
    precision: str = "32-true",
    recipe: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Training steps of the seed's recipe on random data: forward, loss (decode + auxiliary), backward, AdamW
    step with the no-decay groups, warm-up/poly scheduler step.

    Returns ``seconds`` per step (median), ``steps_per_s``, ``images_per_s`` and ``peak_mib``.
    ``recipe`` takes :class:`~seglstm.training.task.SegmentationTask`'s optimiser arguments (``lr``,
    ``betas``, ``weight_decay``, ``no_decay_keys``, ``warmup_iters``, ``warmup_ratio``, ``power``).
    """
    from seglstm.models.registry import create_model
    from seglstm.training.optim import NO_DECAY_KEYS, build_adamw, build_warmup_poly

    rec = dict(recipe or {})
    dev = resolve_device(device)
    torch.manual_seed(seed)
    base = memory_baseline(dev)
    model = create_model(name, num_classes=num_classes, **dict(overrides or {})).to(dev).train()
    optimizer = build_adamw(
        model,
        float(rec.get("lr", 6e-4)),
        tuple(rec.get("betas", (0.9, 0.999))),
        float(rec.get("weight_decay", 0.01)),
        tuple(rec.get("no_decay_keys", NO_DECAY_KEYS)),
    )
    total = warmup + repeats
    warm = int(rec.get("warmup_iters", 1500))
    scheduler = build_warmup_poly(
        optimizer,
        max(total + 2, warm + 2),
        warm,
        float(rec.get("warmup_ratio", 1e-6)),
        float(rec.get("power", 1.0)),
    )
    x = torch.randn(batch, 3, size, size, device=dev)
    mask = torch.randint(0, num_classes, (batch, size, size), device=dev)
    dtype = amp_dtype(precision, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model.loss(x, mask)["loss"]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()

    seconds = time_call(step, dev, repeats=repeats, warmup=warmup)
    return {
        "seconds": seconds,
        "steps_per_s": 1.0 / seconds,
        "images_per_s": batch / seconds,
        "peak_mib": peak_memory_mib(dev, base),
    }


# -- isolation ------------------------------------------------------------------------------------------


def _context() -> mp.context.BaseContext:
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # no effect once the server runs; harmless to repeat
    return ctx


def _child(conn: Any, job: Callable[..., dict[str, Any]], kwargs: dict[str, Any]) -> None:
    try:
        torch.manual_seed(0)  # every child starts from the same random state, so reruns build the same weights
        result = job(**kwargs)
        conn.send(result)
    except BaseException as err:  # report everything, including KeyboardInterrupt, instead of hanging
        conn.send({"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()})
    finally:
        conn.close()


def run_isolated(
    job: Callable[..., dict[str, Any]], timeout: float | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Run the module-level function ``job(**kwargs)`` in a fresh process and return its result dict.

    A failure never raises here: the dict then holds ``error`` (and ``traceback`` when the child could
    still report one), e.g. a child killed by the kernel's out-of-memory killer or one that ran past
    ``timeout`` seconds.
    """
    ctx = _context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, job, kwargs))
    proc.start()
    child.close()
    result: dict[str, Any]
    try:
        if parent.poll(timeout):
            result = parent.recv()
        else:
            result = {"error": f"timed out after {timeout:.0f} s" if timeout is not None else "no result"}
    except EOFError:  # the child died before sending anything
        result = {}
    finally:
        parent.close()
    proc.join(None if "error" not in result and result else 10)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if not result:
        code = proc.exitcode
        why = f"killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
        hint = " (out of memory?)" if code == -9 else ""
        result = {"error": f"child process {why}{hint} before reporting a result"}
    return result


def finite_or_none(value: Any) -> float | None:
    """A float for tables and JSON, with NaN/inf and missing values as None."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
