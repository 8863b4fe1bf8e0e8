"""Forward time and peak memory of the vil_s encoder (chunkwise vs the seed's parallel backend) against
timm's ViT-S/16, batch 1, square inputs.

    python benchmarks/encoder_speed.py [--sizes 256 512 1024 2048] [--device cpu|cuda] [--omp-wait-policy passive]
        [--models vil_s/chunkwise ...] [--src old=/path/to/old/src --src new=src]

Prints a table and writes benchmarks/results/encoder_speed[_cuda].json. Ratios, not absolute times, are
the result: every row comes from the same run on the same machine.

Every configuration runs in a fresh process with OMP_WAIT_POLICY=passive unless told otherwise: on a
shared, oversubscribed CPU, OpenMP threads that spin at every barrier steal the time slices their sibling
needs, which costs a model with many medium-sized operators (ViL: ~100 per block) far more than one with a
few large ones (ViT); see benchmarks/NOTES.md. The setting applies to every model alike.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    add_omp_wait_policy,
    add_sources,
    apply_omp_wait_policy,
    machine,
    parse_sources,
    peak_memory_mib,
    print_table,
    run_isolated,
    start_memory,
    time_call,
    use_source,
    write_json,
)

MODELS = {
    "vil_s/chunkwise": ("vil_s", {"mlstm_backend": "chunkwise"}),
    "vil_s/parallel": ("vil_s", {"mlstm_backend": "parallel"}),
    "vit_s16 (timm)": ("timm:vit_small_patch16_224", {}),
}


def build(name: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:], dynamic_img_size=True, num_classes=0, pretrained=False)
    import seglstm

    return seglstm.create_encoder(name, **kwargs)


def measure(model: str, size: int, device: str, slow: bool, src: str | None = None) -> dict[str, Any]:
    use_source(src)
    dev = torch.device(device)
    name, kwargs = MODELS[model]
    net = build(name, kwargs).to(dev).eval()
    x = torch.randn(1, 3, size, size, device=dev)
    base = start_memory(dev)
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        # one warm-up call everywhere, so sizes compare like with like; slow configurations time one call
        seconds = time_call(lambda: net(x), dev, repeats=1 if slow else 3, warmup=1)
    return {"seconds": seconds, "peak_mib": peak_memory_mib(dev, base), "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--max-parallel-size",
        type=int,
        default=1024,
        help="largest side for the quadratic backend (its S x S matrices outgrow RAM)",
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", default=None)
    add_omp_wait_policy(parser)
    add_sources(parser)
    args = parser.parse_args()
    omp_wait_policy = apply_omp_wait_policy(args.omp_wait_policy)
    sources = parse_sources(parser, args.src)

    rows = []
    for size in args.sizes:
        for model in args.models:
            for label, src in sources:
                row = {"model": model, "source": label, "side": size}
                if model.endswith("parallel") and size > args.max_parallel_size:
                    rows.append({**row, "note": "skipped: quadratic memory"})
                    continue
                slow = size >= 2048 or (model.endswith("parallel") and size >= 1024)
                res = run_isolated(measure, model=model, size=size, device=args.device, slow=slow, src=src)
                rows.append({**row, **res})
                print(f"{model:>18} {label:>6} {size:>5}: {res}", flush=True)

    by = {(r["model"], r["source"], r["side"]): r for r in rows}

    def ratio(a: str, b: str, label: str, size: int) -> float | None:
        ra, rb = by.get((a, label, size), {}), by.get((b, label, size), {})
        if "seconds" in ra and "seconds" in rb:
            return ra["seconds"] / rb["seconds"]
        return None

    summary = []
    for size in args.sizes:
        for label, _ in sources:
            summary.append(
                {
                    "side": size,
                    "source": label,
                    "vil/vit time": ratio("vil_s/chunkwise", "vit_s16 (timm)", label, size),
                    "parallel/chunkwise time": ratio("vil_s/parallel", "vil_s/chunkwise", label, size),
                }
            )
    sizes = sorted(args.sizes)
    growth = {}
    for label, _ in sources:
        for a, b in itertools.pairwise(sizes):
            ra, rb = by.get(("vil_s/chunkwise", label, a), {}), by.get(("vil_s/chunkwise", label, b), {})
            if "seconds" in ra and "seconds" in rb:
                growth[f"{label}{' ' if label else ''}{a}->{b}"] = {
                    "time": rb["seconds"] / ra["seconds"],
                    "memory": rb["peak_mib"] / max(ra["peak_mib"], 1e-9),
                }
    print()
    print_table(rows, ["model", "source", "side", "seconds", "peak_mib", "load", "note", "error"])
    print()
    print_table(summary, ["side", "source", "vil/vit time", "parallel/chunkwise time"])
    print("\nchunkwise growth per doubling of the side (linear in pixels = 4x):")
    for k, v in growth.items():
        print(f"  {k}: time x{v['time']:.2f}, memory x{v['memory']:.2f}")
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    out = args.out or Path(__file__).resolve().parent / "results" / f"encoder_speed{suffix}.json"
    write_json(
        out,
        {
            "machine": machine(),
            "device": args.device,
            "omp_wait_policy": omp_wait_policy,
            "sources": dict(sources),
            "load_average": os.getloadavg(),
            "rows": rows,
            "ratios": summary,
            "growth": growth,
        },
    )


if __name__ == "__main__":
    main()
