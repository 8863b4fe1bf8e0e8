"""Shared measurement helpers for the benchmark scripts.

Each measurement runs in a fresh child process so that peak memory is the child's own high-water mark
(ru_maxrss on CPU, max_memory_allocated on CUDA) and one configuration cannot inflate the next.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _child(conn, job: Callable[..., dict[str, Any]], kwargs: dict[str, Any]) -> None:
    try:
        torch.manual_seed(0)
        conn.send(job(**kwargs))
    except Exception as err:  # report, do not hang the parent
        conn.send({"error": f"{type(err).__name__}: {err}"})
    finally:
        conn.close()


def run_isolated(job: Callable[..., dict[str, Any]], timeout: float = 1800, **kwargs: Any) -> dict[str, Any]:
    """Run ``job(**kwargs)`` in a spawned process and return its result dict (or an ``error`` entry)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, job, kwargs))
    proc.start()
    child.close()
    result = parent.recv() if parent.poll(timeout) else {"error": f"timed out after {timeout}s"}
    proc.join(5)
    if proc.is_alive():
        proc.kill()
    if proc.exitcode not in (0, None) and "error" not in result:
        result = {"error": f"child exited with {proc.exitcode} (out of memory?)"}
    return result


def peak_memory_mib(device: torch.device, baseline_rss: float) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _rss_mib() - baseline_rss


def start_memory(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return 0.0
    return _rss_mib()


def add_omp_wait_policy(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--omp-wait-policy",
        choices=["passive", "active", "inherit"],
        default="passive",
        help="OMP_WAIT_POLICY of the measuring processes ('inherit': leave the environment as is)",
    )


def apply_omp_wait_policy(policy: str) -> str:
    """Set OMP_WAIT_POLICY before any measuring child starts (OpenMP reads it when a spawned child loads
    torch); returns the value the children run with, for the results JSON."""
    if policy != "inherit":
        os.environ["OMP_WAIT_POLICY"] = policy.upper()
    return os.environ.get("OMP_WAIT_POLICY", "default")


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    text = "\n".join(lines)
    print(text)
    sys.stdout.flush()
    return text


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    from seglstm.utils.io import atomic_write_text

    path = Path(path)
    atomic_write_text(path, json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return path


def add_sources(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--src",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="measure the seglstm package under PATH (a src/ directory) as LABEL; repeat to compare source "
        "trees in one run, interleaved configuration by configuration (default: the installed package)",
    )


def parse_sources(parser: argparse.ArgumentParser, values: list[str]) -> list[tuple[str, str | None]]:
    """``LABEL=PATH`` options -> [(label, path)], or [("", None)] for the package on sys.path."""
    sources = []
    for value in values:
        label, sep, path = value.partition("=")
        if not sep or not label or not (Path(path) / "seglstm" / "__init__.py").is_file():
            parser.error(f"--src must be LABEL=PATH with PATH/seglstm/__init__.py present, got {value!r}")
        sources.append((label, str(Path(path).resolve())))
    return sources or [("", None)]


def use_source(path: str | None) -> None:
    """In a measuring child, before seglstm is imported: import it from ``path``."""
    if path is None:
        return
    if "seglstm" in sys.modules:
        raise RuntimeError("use_source must run before seglstm is imported")
    sys.path.insert(0, path)
