"""Training steps/s of each compared model under the seed's recipe: forward, decode + auxiliary loss, backward,
AdamW step (no-decay groups) and warm-up/poly scheduler step, at 512x512 on random data.

    python benchmarks/training_throughput.py [--models seglstm_upernet_s,seglstm_upernet_s/parallel,...]
        [--size 512] [--batch 2 (CPU) | 8 (GPU)] [--steps 3] [--device cpu|cuda]

``MODEL/parallel`` (or ``/chunkwise``, ``/recurrent``) selects the mLSTM backend of a Seg-LSTM preset; the
target is chunkwise >= 2x the steps/s of the seed's quadratic parallel form. On CUDA the step runs under
bf16 autocast, as ``seglstm fit`` trains there. Every model runs in its own child process (peak memory:
weights, AdamW state, activations and gradients; on a CPU capped by ``--max-mem-gib``); one that fails
becomes a row with its error. Prints a
table and writes benchmarks/results/training_throughput[_cuda].json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json
from scaling import limit_memory, parse_overrides

from seglstm.study.measure import machine_info, run_isolated, training_speed

MODELS = "seglstm_upernet_s,seglstm_upernet_s/parallel,vit_s_upernet,swin_t_upernet,mamba_upernet,deeplabv3plus_r50"
BACKENDS = ("chunkwise", "parallel", "recurrent")
NUM_CLASSES = 7


def split_variant(entry: str) -> tuple[str, dict[str, Any]]:
    """``seglstm_upernet_s/parallel`` -> (``seglstm_upernet_s``, ``{"mlstm_backend": "parallel"}``)."""
    name, _, backend = entry.partition("/")
    if not backend:
        return name, {}
    if backend not in BACKENDS:
        raise SystemExit(f"--models {entry!r}: the part after '/' must be one of {', '.join(BACKENDS)}")
    return name, {"mlstm_backend": backend}


def capped_training_speed(max_mem_gib: float | None, **kwargs: Any) -> dict[str, Any]:
    """``seglstm.study.measure.training_speed`` under an address-space cap (CPU), so that a model too large
    for the machine fails with an error rather than calling the out-of-memory killer."""
    limit_memory(max_mem_gib, torch.device(kwargs.get("device", "cpu")))
    return training_speed(**kwargs)


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=MODELS, help=f"comma-separated presets (default {MODELS})")
    parser.add_argument("--size", type=int, default=512, help="square crop side (default 512)")
    parser.add_argument("--batch", type=int, default=8 if cuda else 2, help="batch (default 2 on CPU, 8 on GPU)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median) after the warm-up steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per model")
    parser.add_argument("--max-mem-gib", type=float, default=8.0,
                        help="address-space cap per CPU child above its start, GiB (0 = none)")
    parser.add_argument("--model-overrides", nargs="+", default=[], metavar="MODEL:KEY=VALUE",
                        help="preset overrides for a --models entry (its name as written, e.g. with /parallel)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/training_throughput.json)")
    args = parser.parse_args(argv)
    entries = [m for m in args.models.split(",") if m]
    extra = parse_overrides(args.model_overrides)
    precision = "bf16-mixed" if args.device.startswith("cuda") else "32-true"

    rows = []
    for n, entry in enumerate(entries, 1):
        name, overrides = split_variant(entry)
        overrides = {**overrides, **extra.get(entry, {})}
        res = run_isolated(
            capped_training_speed, timeout=args.timeout, max_mem_gib=args.max_mem_gib or None, name=name,
            num_classes=NUM_CLASSES, overrides=overrides, size=args.size, batch=args.batch, device=args.device, repeats=args.steps, warmup=args.warmup,
            precision=precision,
        )  # fmt: skip
        rows.append({"model": entry, "side": args.size, "batch": args.batch, **res})
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}
        print(f"[{n}/{len(entries)}] {entry}: {shown}", flush=True)

    print()
    print_table(rows, ["model", "side", "batch", "seconds", "steps_per_s", "images_per_s", "peak_mib", "error"])
    by = {r["model"]: r for r in rows if "steps_per_s" in r}
    ratios = {}
    for entry in by:
        base, _, backend = entry.partition("/")
        if backend == "parallel" and base in by:
            ratios[f"{base}: chunkwise / parallel steps/s"] = by[base]["steps_per_s"] / by[entry]["steps_per_s"]
    if "seglstm_upernet_s" in by and "vit_s_upernet" in by:
        ratios["seglstm_upernet_s / vit_s_upernet steps/s"] = (
            by["seglstm_upernet_s"]["steps_per_s"] / by["vit_s_upernet"]["steps_per_s"]
        )
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x")
    suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    out = args.out or Path(__file__).resolve().parent / "results" / f"training_throughput{suffix}.json"
    write_json(out, {"machine": machine_info(), "device": args.device, "precision": precision, "size": args.size,
                     "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "rows": rows,
                     "ratios": ratios})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
