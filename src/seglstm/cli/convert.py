"""``seglstm convert``: official ISPRS Potsdam / Vaihingen tiles -> mmseg's 512x512 patch layout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seglstm convert",
        description="Clip the official ISPRS tiles (RGB/IRRG TIFFs and colour-coded label TIFFs, as folders, "
        "zips or files) into img_dir/{train,val} and ann_dir/{train,val} PNG patches, with mmseg's tile "
        "lists, window grid, file names and label values.",
    )
    p.add_argument("dataset", choices=["potsdam", "vaihingen"])
    p.add_argument(
        "sources", nargs="+", type=Path, metavar="SRC_DIR_OR_ZIP", help="folders, .zip or .tif files"
    )
    p.add_argument("--out", type=Path, required=True, help="output root")
    p.add_argument("--clip-size", type=int, default=512, help="patch side (default 512)")
    p.add_argument("--stride", type=int, default=256, help="stride used to count windows (default 256)")
    p.add_argument(
        "--true-stride",
        action="store_true",
        help="place windows every --stride pixels (overlapping); by default windows sit at multiples of "
        "--clip-size as mmseg's converter places them",
    )
    p.add_argument(
        "--eroded",
        action="store_true",
        help="use the eroded-boundary labels (*_noBoundary, mmseg's documented choice and the seed's data)",
    )
    p.add_argument("--bands", default="RGB", choices=["RGB", "IRRG"], help="Potsdam tiles to convert")
    p.add_argument("--overwrite", action="store_true", help="replace existing img_dir/ann_dir under --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from seglstm.data.convert import convert_isprs
    from seglstm.data.io import DataError

    try:
        report = convert_isprs(
            args.dataset, args.sources, args.out, clip_size=args.clip_size, stride=args.stride,
            eroded=args.eroded, true_stride=args.true_stride, bands=args.bands, overwrite=args.overwrite,
            progress=not args.quiet, command="seglstm convert " + " ".join(argv),
        )  # fmt: skip
    except (DataError, ValueError, FileExistsError) as err:
        print(f"seglstm convert: error: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    print(f"written to {args.out}")
    return 0
