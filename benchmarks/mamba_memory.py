"""Memory and time of the PyTorch selective scan: whole-sequence (the (B, L, D, N) states at once) against
chunked, with and without recomputing each chunk in the backward pass, alone and inside ``mamba_upernet``.

    python benchmarks/mamba_memory.py [--parts sweep,train,infer] [--size 512] [--batch 2] [--infer-size 1024]
        [--chunks 64 256 1024] [--max-mem-gib 8]

``sweep``: the scan alone at the shape of VMamba-T's first stage for a ``--size`` input (4 directions x 192
channels = D 768, N 16, L = (size/4)^2, batch ``--batch``), forward + backward, for the whole sequence, the
automatic chunk size and each ``--chunks`` size. ``train``: one seed-recipe training step of ``mamba_upernet`` (forward, decode +
auxiliary loss, backward, AdamW) at ``--size``, batch ``--batch``. ``infer``: one forward of the segmentor at
``--infer-size``, batch 1, no gradients. Every configuration runs in its own child process, capped at
``--max-mem-gib`` of address space above its start (a configuration over the cap becomes an error row);
peak memory is the growth of the child's resident-set high-water mark. Prints a table and writes
benchmarks/results/mamba_memory.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json
from scaling import limit_memory
from scaling import measure as scaling_measure
from training_throughput import capped_training_speed

from seglstm.study.measure import machine_info, memory_baseline, peak_memory_mib, run_isolated, time_call

NUM_CLASSES = 7
VARIANTS = {  # name -> (scan_chunk_size, recompute chunks in the backward)
    "whole sequence": (None, True),
    "chunked (auto)": ("auto", True),
    "chunked (auto), no recompute": ("auto", False),
}


def _configure_scan(recompute: bool) -> None:
    """Without recomputation every chunk keeps its states for the backward pass (the measured alternative)."""
    if not recompute:
        from seglstm.models import mamba

        mamba.checkpoint = lambda fn, *args, **kwargs: fn(*args)


def scan_job(
    batch: int, length: int, chunk: int | str | None, max_mem_gib: float | None, recompute: bool = True
) -> dict[str, Any]:
    _configure_scan(recompute)
    from seglstm.models.mamba import selective_scan

    dev = torch.device("cpu")
    limit_memory(max_mem_gib, dev)
    base = memory_baseline(dev)
    g, d, n = 4, 768, 16
    gen = torch.Generator().manual_seed(0)
    leaves = {
        "u": torch.randn(batch, d, length, generator=gen),
        "delta": torch.randn(batch, d, length, generator=gen) - 4,
        "A": -torch.arange(1, n + 1.0).expand(d, n).contiguous(),
        "B": torch.randn(batch, g, n, length, generator=gen),
        "C": torch.randn(batch, g, n, length, generator=gen),
        "D": torch.ones(d),
        "delta_bias": torch.randn(d, generator=gen) * 0.1,
    }
    leaves = {k: v.requires_grad_(True) for k, v in leaves.items()}
    weight = torch.randn(batch, d, length, generator=gen)

    def step() -> None:
        (selective_scan(**leaves, backend="pscan", chunk_size=chunk) * weight).sum().backward()

    seconds = time_call(step, dev, repeats=1, warmup=1)
    return {"seconds": seconds, "peak_mib": peak_memory_mib(dev, base)}


def train_job(recompute: bool, **kwargs: Any) -> dict[str, Any]:
    _configure_scan(recompute)
    return capped_training_speed(**kwargs)


def infer_job(recompute: bool, **kwargs: Any) -> dict[str, Any]:
    _configure_scan(recompute)
    return scaling_measure(**kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="sweep,train,infer", help="comma-separated: sweep, train, infer")
    parser.add_argument("--size", type=int, default=512, help="training side and the sweep's image side")
    parser.add_argument("--batch", type=int, default=2, help="training and sweep batch (default 2)")
    parser.add_argument("--infer-size", type=int, default=1024, help="inference side (default 1024)")
    parser.add_argument("--chunks", type=int, nargs="*", default=[64, 256, 1024], help="fixed chunk sizes to sweep")
    parser.add_argument("--steps", type=int, default=1, help="timed training steps after the warm-up steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps first (default 1)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
    parser.add_argument("--max-mem-gib", type=float, default=8.0, help="address-space cap per child, GiB")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/mamba_memory.json)")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    cap = args.max_mem_gib or None
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    if "sweep" in parts:
        length = (args.size // 4) ** 2
        for chunk, recompute in [(None, True), ("auto", True), ("auto", False), *((c, True) for c in args.chunks)]:
            res = run_isolated(scan_job, timeout=args.timeout, batch=args.batch, length=length, chunk=chunk,
                               max_mem_gib=cap, recompute=recompute)  # fmt: skip
            variant = f"chunk {chunk}" + ("" if recompute else ", no recompute") if chunk else "whole sequence"
            record({"part": "scan fwd+bwd", "variant": variant, "side": args.size, "batch": args.batch, **res})
    for part in ("train", "infer"):
        if part not in parts:
            continue
        for variant, (chunk, recompute) in VARIANTS.items():
            if variant not in args.variants.split(",") or (part == "infer" and not recompute):
                continue  # no backward pass: nothing is recomputed
            overrides = {"scan_chunk_size": chunk}
            if part == "train":
                res = run_isolated(
                    train_job, timeout=args.timeout, recompute=recompute, max_mem_gib=cap, name="mamba_upernet",
                    num_classes=NUM_CLASSES, overrides=overrides, size=args.size, batch=args.batch,
                    device="cpu", repeats=args.steps, warmup=args.warmup,
                )  # fmt: skip
                side, batch = args.size, args.batch
            else:
                res = run_isolated(
                    infer_job, timeout=args.timeout, recompute=recompute, model="mamba_upernet",
                    part="segmentor", size=args.infer_size, batch=1, mode="forward", device="cpu", repeats=1,
                    slow_seconds=30.0, max_mem_gib=cap, overrides=overrides,
                )  # fmt: skip
                side, batch = args.infer_size, 1
            record({"part": f"mamba_upernet {part}", "variant": variant, "side": side, "batch": batch, **res})

    print()
    print_table(rows, ["part", "variant", "side", "batch", "seconds", "peak_mib", "error"])
    out = args.out or Path(__file__).resolve().parent / "results" / "mamba_memory.json"
    write_json(out, {"machine": machine_info(), "load_average": os.getloadavg(), "max_mem_gib": args.max_mem_gib,
                     "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
