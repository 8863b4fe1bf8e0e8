"""Training-step throughput of the full Seg-LSTM segmentor (UPerNet + auxiliary FCN on ViL-S), chunkwise vs
the seed's parallel mLSTM backend: forward, loss, backward and an AdamW step at 512x512, batch 2.

    python benchmarks/training_step.py [--steps 3] [--size 512] [--batch 2] [--omp-wait-policy passive]

Prints a table and writes benchmarks/results/encoder_speed_training[_cuda].json. Each backend runs in a
fresh process (``seglstm.study.measure.run_isolated``), with the same OMP_WAIT_POLICY handling as
encoder_speed.py (``_common.add_omp_wait_policy``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json

from seglstm.study.measure import machine_info, memory_baseline, peak_memory_mib, run_isolated
from seglstm.utils.threads import add_omp_wait_policy, apply_omp_wait_policy

BACKENDS = ("chunkwise", "parallel")


def measure(backend: str, size: int, batch: int, steps: int, device: str) -> dict[str, Any]:
    import seglstm

    dev = torch.device(device)
    model = seglstm.create_model("seglstm_upernet_s", 7, mlstm_backend=backend).to(dev).train()
    optim = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(batch, 3, size, size, generator=gen).to(dev)
    mask = torch.randint(0, 7, (batch, size, size), generator=gen).to(dev)

    def step() -> float:
        optim.zero_grad(set_to_none=True)
        loss = model.loss(img, mask)["loss"]
        loss.backward()
        optim.step()
        return loss.detach().item()

    base = memory_baseline(dev)
    step()  # warm-up: allocations, first-call dispatch
    times = []
    for _ in range(steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    seconds = times[len(times) // 2]
    return {
        "seconds_per_step": seconds,
        "steps_per_s": 1.0 / seconds,
        "all_seconds": times,
        "peak_mib": peak_memory_mib(dev, base),
        "final_loss": loss,
        "load_average": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per backend (median reported)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    add_omp_wait_policy(parser)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    omp_wait_policy = apply_omp_wait_policy(args.omp_wait_policy)

    rows = []
    for backend in BACKENDS:
        res = run_isolated(
            measure, timeout=1800, backend=backend, size=args.size, batch=args.batch, steps=args.steps, device=args.device
        )
        rows.append({"backend": backend, **res})
        print(f"{backend:>10}: {res}", flush=True)
    print()
    print_table(rows, ["backend", "seconds_per_step", "steps_per_s", "peak_mib", "load_average", "error"])
    by = {r["backend"]: r for r in rows}
    speedup = None
    if all("steps_per_s" in by[b] for b in BACKENDS):
        speedup = by["chunkwise"]["steps_per_s"] / by["parallel"]["steps_per_s"]
        print(f"\nchunkwise / parallel steps per second: {speedup:.2f}x")
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    out = args.out or Path(__file__).resolve().parent / "results" / f"encoder_speed_training{suffix}.json"
    write_json(
        out,
        {
            "machine": machine_info(),
            "device": args.device,
            "model": "seglstm_upernet_s",
            "size": args.size,
            "batch": args.batch,
            "omp_wait_policy": omp_wait_policy,
            "rows": rows,
            "chunkwise_over_parallel_steps_per_s": speedup,
        },
    )


if __name__ == "__main__":
    main()
