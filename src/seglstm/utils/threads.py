"""Thread count and OpenMP wait policy, chosen before torch starts its thread pool.

OpenMP reads ``OMP_WAIT_POLICY`` when torch's library loads and torch sizes its intra-op pool from
``OMP_NUM_THREADS`` when it first runs a parallel op, so both must be in the environment before
``import torch``: the ``seglstm`` console entry sets them for the inference commands. The default policy of
the OpenMP runtime (threads spin while waiting for work) is fastest on an idle machine and much slower on an
oversubscribed one, where the spinning threads take the cores the working threads need (benchmarks/NOTES.md:
vil_s 2.7x slower than ViT-S under load). Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = [
    "OMP_WAIT_POLICIES",
    "add_omp_wait_policy",
    "apply_omp_wait_policy",
    "choose_inference_threads",
    "cpu_oversubscribed",
    "physical_cores_available",
]

OMP_WAIT_POLICIES = ("auto", "passive", "active", "inherit")
_SYS_CPU = Path("/sys/devices/system/cpu")  # Linux CPU topology


def _available_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def physical_cores_available() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads of one core count once)."""
    cpus = _available_cpus()
    cores = set()
    for cpu in cpus:
        topo = _SYS_CPU / f"cpu{cpu}" / "topology"
        try:
            cores.add((topo / "physical_package_id").read_text().strip() + ":" + (topo / "core_id").read_text().strip())
        except OSError:
            cores.add(f"cpu{cpu}")  # no topology: count the logical CPU
    return max(1, len(cores))


def cpu_oversubscribed() -> bool:
    """Whether the 1-minute load average exceeds the CPUs available to this process."""
    try:
        return os.getloadavg()[0] > len(_available_cpus())
    except (AttributeError, OSError):
        return False


def add_omp_wait_policy(parser: argparse.ArgumentParser, default: str = "passive") -> None:
    """The ``--omp-wait-policy`` option of the benchmarks and the inference commands."""
    parser.add_argument(
        "--omp-wait-policy",
        choices=OMP_WAIT_POLICIES,
        default=default,
        help=(
            f"OMP_WAIT_POLICY before torch starts (default {default}): 'auto' = PASSIVE when the load average "
            "exceeds the available CPUs, else the OpenMP default; 'inherit' = leave the environment as is"
        ),
    )


def apply_omp_wait_policy(policy: str) -> str:
    """Set OMP_WAIT_POLICY for this process and the children it starts; returns the value they run with.

    ``auto`` sets PASSIVE on an oversubscribed CPU and otherwise leaves the environment alone;
    ``inherit`` always leaves it alone.
    """
    if policy not in OMP_WAIT_POLICIES:
        raise ValueError(f"--omp-wait-policy {policy!r}: expected one of {', '.join(OMP_WAIT_POLICIES)}")
    if policy in ("passive", "active"):
        os.environ["OMP_WAIT_POLICY"] = policy.upper()
    elif policy == "auto" and "OMP_WAIT_POLICY" not in os.environ and cpu_oversubscribed():
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return os.environ.get("OMP_WAIT_POLICY", "default")


def choose_inference_threads(threads: int | None = None) -> int:
    """Set OMP_NUM_THREADS for torch's pool: ``threads`` if given, else an OMP_NUM_THREADS already in the
    environment, else the physical cores available (hyper-threads add little to GEMM-bound inference)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        os.environ["OMP_NUM_THREADS"] = str(threads)
    elif not os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        os.environ["OMP_NUM_THREADS"] = str(physical_cores_available())
    return int(os.environ["OMP_NUM_THREADS"])
