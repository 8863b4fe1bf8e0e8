"""Forward time and peak memory of the vil_s encoder (chunkwise vs the seed's parallel backend) against
timm's ViT-S/16 and Swin-T, batch 1, square inputs, each in float32, under bf16 autocast and (when asked
for) with torchao's dynamic int8 on every nn.Linear.

    python benchmarks/encoder_speed.py [--sizes 256 512 1024 2048] [--device cpu|cuda]
        [--precisions fp32 bf16 int8] [--models vil_s/chunkwise "swin_t (timm)" ...] [--omp-wait-policy passive]

Prints a table and writes benchmarks/results/encoder_speed[_cuda].json. Ratios, not absolute times, are
the result: every row comes from the same run on the same machine. The ratio rows compare vil_s with each
timm model in the same precision, and each model's bf16 (int8) with its own float32 (``fp32/bf16`` > 1:
bf16 is faster). bf16 is ``torch.autocast(device, bfloat16)``, as ``predict-scene --precision bf16`` runs it; on a
CPU it pays only where the CPU has native bf16 GEMMs (AVX512-BF16 or AMX).

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
from _common import print_table, write_json

from seglstm.study.measure import machine_info, memory_baseline, peak_memory_mib, run_isolated, time_call
from seglstm.utils.device import cpu_has_native_bf16
from seglstm.utils.threads import add_omp_wait_policy, apply_omp_wait_policy

MODELS = {
    "vil_s/chunkwise": ("vil_s", {"mlstm_backend": "chunkwise"}),
    "vil_s/parallel": ("vil_s", {"mlstm_backend": "parallel"}),
    "vit_s16 (timm)": ("timm:vit_small_patch16_224", {}),
    "swin_t (timm)": ("timm:swin_tiny_patch4_window7_224", {"strict_img_size": False}),
}
REFERENCE = "vil_s/chunkwise"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "int8": None}  # int8: torchao, see measure()


def build(name: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:], dynamic_img_size=True, num_classes=0, pretrained=False, **kwargs)
    import seglstm

    return seglstm.create_encoder(name, **kwargs)


def measure(model: str, size: int, device: str, slow: bool, precision: str = "fp32") -> dict[str, Any]:
    dev = torch.device(device)
    name, kwargs = MODELS[model]
    net = build(name, kwargs).to(dev).eval()
    if precision == "int8":  # torchao dynamic int8 on every nn.Linear; ViL layers on their reference path
        from precision_accuracy import torchao_int8

        net = torchao_int8(net, names=())
    x = torch.randn(1, 3, size, size, device=dev)
    base = memory_baseline(dev)
    dtype = PRECISIONS[precision]
    with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
        # one warm-up call everywhere, so sizes compare like with like; slow configurations time one call
        seconds = time_call(lambda: net(x), dev, repeats=1 if slow else 3, warmup=1)
    return {"seconds": seconds, "peak_mib": peak_memory_mib(dev, base), "load": os.getloadavg()[0]}


def ratios(rows: list[dict[str, Any]], sizes: list[int], precisions: list[str]) -> list[dict[str, Any]]:
    """The comparisons the note reports, from rows of one run: vil_s over every other model in the same
    precision, and each model's fp32 time over its time in every other precision. A failed or skipped row gives no ratio."""
    seconds = {(r["model"], r["precision"], r["side"]): r["seconds"] for r in rows if "seconds" in r}
    models = list(dict.fromkeys(r["model"] for r in rows))
    out = []

    def add(side: int, precision: str, name: str, a: tuple, b: tuple) -> None:
        if a in seconds and b in seconds:
            out.append({"side": side, "precision": precision, "ratio": name, "value": seconds[a] / seconds[b]})

    for side in sizes:
        for precision in precisions:
            for other in models:
                if other != REFERENCE:
                    add(side, precision, f"{REFERENCE} / {other}", (REFERENCE, precision, side),
                        (other, precision, side))
        for low in (p for p in precisions if p != "fp32" and "fp32" in precisions):
            for model in models:
                add(side, "-", f"{model} fp32/{low}", (model, "fp32", side), (model, low, side))
    return out


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
    parser.add_argument(
        "--precisions", nargs="+", choices=list(PRECISIONS), default=["fp32", "bf16"],
        help="int8 (torchao, the bench extra) is measured only when named",
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--out", default=None)
    add_omp_wait_policy(parser)
    args = parser.parse_args()
    omp_wait_policy = apply_omp_wait_policy(args.omp_wait_policy)

    rows = []
    for size in args.sizes:
        for precision in args.precisions:
            for model in args.models:
                key = {"model": model, "precision": precision, "side": size}
                if model.endswith("parallel") and size > args.max_parallel_size:
                    rows.append({**key, "note": "skipped: quadratic memory"})
                    continue
                slow = size >= 2048 or (model.endswith("parallel") and size >= 1024)
                res = run_isolated(measure, timeout=1800, model=model, size=size, device=args.device, slow=slow,
                                   precision=precision)
                rows.append({**key, **res})
                print(f"{model:>18} {precision} {size:>5}: {res}", flush=True)

    summary = ratios(rows, args.sizes, args.precisions)
    by = {(r["model"], r["side"]): r for r in rows if r["precision"] == args.precisions[0]}
    sizes = sorted(args.sizes)
    growth = {}
    for a, b in itertools.pairwise(sizes):
        ra, rb = by.get((REFERENCE, a), {}), by.get((REFERENCE, b), {})
        if "seconds" in ra and "seconds" in rb:
            growth[f"{a}->{b}"] = {
                "time": rb["seconds"] / ra["seconds"],
                "memory": rb["peak_mib"] / max(ra["peak_mib"], 1e-9),
            }
    print()
    print_table(rows, ["model", "precision", "side", "seconds", "peak_mib", "load", "note", "error"])
    print("\nratios (time of the first over the second; fp32/bf16 > 1: bf16 is faster):")
    print_table(summary, ["side", "precision", "ratio", "value"])
    print(f"\nchunkwise growth per doubling of the side ({args.precisions[0]}; linear in pixels = 4x):")
    for k, v in growth.items():
        print(f"  {k}: time x{v['time']:.2f}, memory x{v['memory']:.2f}")
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    out = args.out or Path(__file__).resolve().parent / "results" / f"encoder_speed{suffix}.json"
    write_json(
        out,
        {
            "machine": machine_info(),
            "device": args.device,
            "omp_wait_policy": omp_wait_policy,
            "cpu_has_native_bf16": cpu_has_native_bf16(),
            "load_average": os.getloadavg(),
            "rows": rows,
            "ratios": summary,
            "growth": growth,
        },
    )


if __name__ == "__main__":
    main()
