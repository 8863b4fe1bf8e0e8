"""Forward and forward+backward time and peak memory against the input side, for every compared encoder and
full segmentor, at batch 1 and the training batch.

    python benchmarks/scaling.py [--models seglstm_upernet_s,vit_s_upernet,...] [--parts encoder,segmentor]
        [--sizes 256 512 1024 2048] [--batches 1 2] [--modes forward,train] [--device cpu|cuda]

The encoder rows are the segmentor's own ``backbone`` (ViL-S for ``seglstm_upernet_s``, ViT-S/16 for
``vit_s_upernet``, Swin-T, the VMamba-like encoder, the dilated ResNet-50), so both rows of a model use the same
weights and settings. ``forward``: eval mode, no gradients (bf16 autocast on CUDA). ``train``: one forward and
backward in train mode, of the segmentor's decode + auxiliary loss or of the sum of the encoder's feature maps;
at batch 1 BatchNorm layers stay in eval mode (a 1x1 pooled map cannot be batch-normalised over one image).
Peak memory is what the pass adds above the model weights: the CUDA allocator's peak, or on a CPU the growth of
the child's resident-set high-water mark. Every configuration runs in its own child process; one that
fails (out of memory, ``--max-mem-gib``, ``--timeout``) becomes a row with its error. Prints a table and the
growth per doubling of the side, and writes benchmarks/results/scaling[_cuda].json.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json

from seglstm.study.measure import machine_info, memory_baseline, peak_memory_mib, run_isolated, time_call

MODELS = "seglstm_upernet_s,vit_s_upernet,swin_t_upernet,mamba_upernet,deeplabv3plus_r50"
NUM_CLASSES = 7


def limit_memory(gib: float | None, device: torch.device) -> None:
    """Cap the child's address space so a too-large configuration fails with an error instead of drawing
    the kernel's out-of-memory killer onto the machine (CPU only; CUDA reserves huge virtual ranges)."""
    if gib is None or device.type != "cpu":
        return
    with open("/proc/self/statm") as fh:
        current = int(fh.read().split()[0]) * resource.getpagesize()
    limit = current + int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def measure(
    model: str,
    part: str,
    size: int,
    batch: int,
    mode: str,
    device: str,
    repeats: int,
    slow_seconds: float,
    max_mem_gib: float | None,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    import seglstm

    dev = torch.device(device)
    limit_memory(max_mem_gib, dev)
    seg = seglstm.create_model(model, num_classes=NUM_CLASSES, **overrides)
    net = (seg.backbone if part == "encoder" else seg).to(dev)
    weights_mib = sum(p.numel() * p.element_size() for p in net.parameters()) / 2**20
    x = torch.randn(batch, 3, size, size, device=dev)
    mask = torch.randint(0, NUM_CLASSES, (batch, size, size), device=dev)
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    if mode == "forward":
        net.eval()

        def run() -> None:
            with torch.no_grad(), torch.autocast(**amp):
                net(x)
    else:
        net.train()
        if batch == 1:
            for m in net.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()

        def run() -> None:
            with torch.autocast(**amp):
                if part == "encoder":
                    loss = sum(f.float().mean() for f in net(x))
                else:
                    loss = seg.loss(x, mask)["loss"]
            loss.backward()
            net.zero_grad(set_to_none=True)

    base = memory_baseline(dev)  # the peak is what the pass adds above the weights and inputs
    start = time.perf_counter()
    run()  # first call: warm-up, and how long one call takes here
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    first = time.perf_counter() - start
    # A call slower than slow_seconds is its own measurement: one-off costs are small beside it.
    slow = first > slow_seconds
    seconds = first if slow else time_call(run, dev, repeats=repeats, warmup=0)
    return {
        "seconds": seconds,
        "images_per_s": batch / seconds,
        "peak_mib": peak_memory_mib(dev, base),
        "weights_mib": weights_mib,
        "timed_calls": "first call only" if slow else repeats,
    }


def _growth(rows: list[dict[str, Any]], sizes: list[int]) -> list[dict[str, Any]]:
    """Time and memory ratios between consecutive sizes of the same configuration (4x pixels per doubling)."""
    by = {(r["model"], r["part"], r["batch"], r["mode"], r["side"]): r for r in rows}
    out = []
    for key in sorted({k[:4] for k in by}):
        for a, b in itertools.pairwise(sorted(sizes)):
            ra, rb = by.get((*key, a), {}), by.get((*key, b), {})
            if "seconds" in ra and "seconds" in rb:
                out.append({
                    "model": key[0], "part": key[1], "batch": key[2], "mode": key[3], "sides": f"{a}->{b}",
                    "time x": rb["seconds"] / ra["seconds"],
                    "memory x": rb["peak_mib"] / ra["peak_mib"] if ra["peak_mib"] > 0 else None,
                })  # fmt: skip
    return out


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``MODEL:KEY=VALUE`` items (YAML values) -> per-model preset overrides.

    Parsed here with PyYAML alone: errors are the benchmark's own (``SystemExit`` naming the item).
    """
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, rest = item.partition(":")
        key, eq, value = rest.partition("=")
        if not sep or not eq or not key:
            raise SystemExit(f"--model-overrides {item!r}: expected MODEL:KEY=VALUE")
        out.setdefault(name, {})[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=MODELS, help=f"comma-separated presets (default {MODELS})")
    parser.add_argument("--parts", default="encoder,segmentor", help="encoder, segmentor or both")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8 if cuda else 2],
                        help="batch sizes (default 1 and the training batch: 2 on CPU, 8 on GPU)")
    parser.add_argument("--modes", default="forward,train", help="forward (inference), train (fwd+bwd) or both")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up call")
    parser.add_argument("--slow-seconds", type=float, default=20.0,
                        help="a first call slower than this is the measurement (no further calls)")
    parser.add_argument("--max-mem-gib", type=float, default=8.0,
                        help="address-space cap per CPU child above its start, GiB (0 = none)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    parser.add_argument("--model-overrides", nargs="+", default=[], metavar="MODEL:KEY=VALUE")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/scaling[_cuda].json)")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    parts = [p for p in args.parts.split(",") if p]
    modes = [m for m in args.modes.split(",") if m]
    if set(parts) - {"encoder", "segmentor"} or set(modes) - {"forward", "train"}:
        parser.error("--parts takes encoder/segmentor, --modes takes forward/train")
    overrides = parse_overrides(args.model_overrides)

    rows = []
    configs = list(itertools.product(sorted(args.sizes), args.batches, modes, models, parts))
    for n, (size, batch, mode, model, part) in enumerate(configs, 1):
        res = run_isolated(
            measure, timeout=args.timeout, model=model, part=part, size=size, batch=batch, mode=mode,
            device=args.device, repeats=args.repeats, slow_seconds=args.slow_seconds,
            max_mem_gib=args.max_mem_gib or None, overrides=overrides.get(model, {}),
        )  # fmt: skip
        row = {"model": model, "part": part, "side": size, "batch": batch, "mode": mode, **res}
        rows.append(row)
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}
        print(f"[{n}/{len(configs)}] {model} {part} {size} b{batch} {mode}: {shown}", flush=True)

    print()
    print_table(rows, ["model", "part", "mode", "batch", "side", "seconds", "images_per_s", "peak_mib", "error"])
    growth = _growth(rows, args.sizes)
    if growth:
        print("\ngrowth per doubling of the side (4x the pixels; linear cost = 4x):")
        print_table(growth, ["model", "part", "mode", "batch", "sides", "time x", "memory x"])
    suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    out = args.out or Path(__file__).resolve().parent / "results" / f"scaling{suffix}.json"
    write_json(out, {"machine": machine_info(), "device": args.device, "overrides": overrides, "rows": rows,
                     "growth": growth})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
