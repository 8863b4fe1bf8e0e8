"""``seglstm export``: write a checkpoint's segmentor as ONNX (or a torch.export ``.pt2``) at a fixed tile."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from seglstm.errors import SeglstmError

PROG = "seglstm export"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Export a segmentor for deployment at a fixed tile size and batch. ONNX files carry "
            "the classes, palette and normalisation, so `seglstm predict-scene --onnx MODEL.onnx` needs "
            "nothing else; .pt2 is torch.export's program format (torch.export.load)."
        ),
    )
    p.add_argument("--ckpt", required=True, help="segmentor checkpoint")
    p.add_argument("--config", default=None, help="model config, when the checkpoint does not carry one")
    p.add_argument("--format", default="onnx", choices=["onnx", "pt2"], help="onnx (default) or pt2")
    p.add_argument("--tile", type=int, default=512, help="input side in pixels (default 512)")
    p.add_argument("--batch", type=int, default=4, help="tiles per run of the exported program (default 4)")
    p.add_argument("--out", default=None, help="output file (default: the checkpoint's name with .onnx/.pt2)")
    p.add_argument("--unsafe-load", action="store_true", help="allow full unpickling of a trusted checkpoint")
    return p


def main(argv: list[str]) -> int:
    """Run the command; 0 on success, 2 on bad input."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"{PROG}: %(message)s")
    from seglstm.inference.export import export_segmentor
    from seglstm.inference.loading import load_segmentor
    from seglstm.utils.io import blocking_file

    out = Path(args.out) if args.out else Path(args.ckpt).with_suffix(f".{args.format}")
    try:
        if out.resolve() == Path(args.ckpt).resolve():
            raise ValueError(f"--out {out} would overwrite the checkpoint")
        blocker = blocking_file(out)
        if blocker is not None:
            raise ValueError(f"--out {out}: {blocker} is a file, not a folder; choose another --out")
        model, meta = load_segmentor(args.ckpt, args.config, map_location="cpu", unsafe=args.unsafe_load)
        written = export_segmentor(model, meta, out, tile=args.tile, fmt=args.format, batch=args.batch)
    except (SeglstmError, ValueError, FileNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    logging.getLogger(__name__).info("%s model, %dx%d tiles -> %s", args.format, args.tile, args.tile, written)
    return 0
