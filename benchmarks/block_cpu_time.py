"""Single-thread CPU time of one ViL-S block (or the vil_s encoder, or the seglstm_upernet_s segmentor): the
method behind the per-change tables in NOTES.md.

    python benchmarks/block_cpu_time.py [--part block|encoder|segmentor] [--tokens 4096] [--train-tokens 1024]
        [--repeats 10]

On a shared, loaded CPU, wall-clock times mostly measure how much CPU the scheduler handed out. The process
CPU time of one thread (``time.process_time()`` with ``torch.set_num_threads(1)``, minimum over repeats) is
disturbed far less, so it is what decides whether one change to a block helps. Two rows: inference (eval,
``no_grad``, batch 1 at ``--tokens``) and training (forward plus backward, batch 2 at ``--train-tokens``;
the segmentor's decode + auxiliary loss), for both mLSTM backends. To compare two versions of the code, run
the script at each commit, one right after the other on the same machine, and compare the rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json

from seglstm.study.measure import machine_info


def _build(part: str, backend: str) -> torch.nn.Module:
    """``block``: the first ViL block of vil_s (dim 384, inner 768, 4 heads of 192); ``encoder``: vil_s;
    ``segmentor``: seglstm_upernet_s with 7 classes."""
    import seglstm

    if part == "segmentor":
        return seglstm.create_model("seglstm_upernet_s", 7, mlstm_backend=backend)
    encoder = seglstm.create_encoder("vil_s", mlstm_backend=backend)
    if part == "encoder":
        return encoder
    return next(m for m in encoder.modules() if type(m).__name__ == "ViLBlock")


def _input(part: str, batch: int, tokens: int) -> torch.Tensor:
    """Tokens (B, S, 384) for a block; an image whose 16-pixel patch grid has ``tokens`` cells otherwise."""
    if part == "block":
        return torch.randn(batch, tokens, 384)
    side = 16 * round(tokens**0.5)
    return torch.randn(batch, 3, side, side)


def cpu_seconds(fn: Any, repeats: int) -> float:
    """Minimum process CPU time of ``fn`` over ``repeats`` calls after one untimed call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def _loss(part: str, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if part == "segmentor":
        mask = torch.randint(0, 7, (x.shape[0], *x.shape[2:]))
        return net.loss(x, mask)["loss"]
    out = net(x)
    return sum(o.square().mean() for o in out) if isinstance(out, (list, tuple)) else out.square().mean()


def measure(part: str, backend: str, tokens: int, train_tokens: int, repeats: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    net = _build(part, backend)
    x = _input(part, 1, tokens)
    xt = _input(part, 2, train_tokens)

    def infer() -> None:
        with torch.no_grad():
            net(x)

    def train() -> None:
        _loss(part, net, xt).backward()
        net.zero_grad(set_to_none=True)

    net.train()
    train_ms = 1e3 * cpu_seconds(train, repeats)
    net.eval()
    infer_ms = 1e3 * cpu_seconds(infer, repeats)
    common = {"part": part, "backend": backend}
    return [
        {**common, "mode": "inference", "batch": 1, "tokens": tokens, "cpu_ms": infer_ms},
        {**common, "mode": "forward+backward", "batch": 2, "tokens": train_tokens, "cpu_ms": train_ms},
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="inference tokens (4096 = a 1024x1024 input)")
    parser.add_argument("--train-tokens", type=int, default=1024, help="training tokens (1024 = a 512x512 crop)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls; the minimum is reported")
    parser.add_argument("--backends", default="chunkwise,parallel")
    parser.add_argument("--part", choices=["block", "encoder", "segmentor"], default="block")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/block_cpu_time_PART.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for backend in [b for b in args.backends.split(",") if b]:
        rows += measure(args.part, backend, args.tokens, args.train_tokens, args.repeats)
    print_table(rows, ["part", "backend", "mode", "batch", "tokens", "cpu_ms"])
    out = args.out or Path(__file__).resolve().parent / "results" / f"block_cpu_time_{args.part}.json"
    write_json(out, {"machine": machine_info(), "part": args.part, "threads": 1, "repeats": args.repeats, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
