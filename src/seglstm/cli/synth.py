"""``seglstm synth``: write the built-in synthetic LoveDA-like dataset (and/or a sample grid), or synthetic
GeoTIFF scenes with GeoPackage labels for the ``scenes`` dataset (``--scenes``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seglstm synth",
        description="Generate procedural LoveDA-like aerial scenes in mmseg's LoveDA layout "
        "(img_dir/{train,val,test}, ann_dir/{train,val}, meta.json). Deterministic from --seed.",
    )
    p.add_argument("--out", type=Path, help="dataset root to write")
    p.add_argument("--train", type=int, default=200, help="training images (default 200)")
    p.add_argument("--val", type=int, default=50, help="validation images (default 50)")
    p.add_argument("--test", type=int, default=0, help="test images, written without masks (default 0)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--workers", type=int, default=1, help="processes (output does not depend on it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    p.add_argument(
        "--grid", type=Path, help="also save a PNG grid of 3 urban and 3 rural scenes (image | mask overlay)"
    )
    p.add_argument("--bands", type=int, default=3, help="3 (RGB PNG) or 4 (RGB + near-infrared TIFF, folder dataset)")
    p.add_argument(
        "--scenes", type=Path,
        help="write synthetic GeoTIFF scenes (UTM) with GeoPackage polygon labels (EPSG:4326) and a scenes.yaml "
        "here instead (--size is each scene's side)",
    )
    p.add_argument("--n-scenes", type=int, default=3, help="training scenes for --scenes, plus one held out (default 3)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.scenes is not None:
        return _scenes(args, argv)
    if args.out is None and args.grid is None:
        _parser().error("give --out DIR (and/or --grid PNG), or --scenes DIR")
    from seglstm.data.io import write_dataset
    from seglstm.data.synthetic import generate, sample_grid, sample_scenes

    for flag, path in (("--out", args.out), ("--grid", args.grid)):
        blocker = None if path is None else next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None and not (flag == "--grid" and blocker == path):
            print(f"seglstm synth: error: {flag} {path}: {blocker} is a file, not a folder", file=sys.stderr)
            return 2
    try:
        if args.out is not None:
            def write(folder: Path) -> Path:
                return generate(
                    folder, args.train, args.val, args.test, size=args.size, seed=args.seed, workers=args.workers,
                    overwrite=args.overwrite, progress=not args.quiet, bands=args.bands,
                )  # fmt: skip

            # built in a staging folder and moved into place when complete
            root = write_dataset(args.out, write, "seglstm synth " + " ".join(argv), replace=args.overwrite)
            print(f"synthetic dataset ready at {root} (train {args.train}, val {args.val}, test {args.test})")
        if args.grid is not None:
            sample_grid(sample_scenes(args.seed, args.size), args.grid)
            print(f"sample grid written to {args.grid}")
    except (ValueError, OSError) as err:
        return _failed(err, args.out)
    return 0


def _failed(err: ValueError | OSError, target: Path | None) -> int:
    """One line for a refused or failed write: the generator's own words, or the file that could not be written."""
    if isinstance(err, OSError) and not isinstance(err, FileExistsError):
        err = f"cannot write {err.filename or target}: {err.strerror or err}"
    print(f"seglstm synth: error: {err}", file=sys.stderr)
    return 1


def _scenes(args: argparse.Namespace, argv: list[str]) -> int:
    from seglstm.data.io import write_dataset
    from seglstm.data.synthetic_scenes import write_synthetic_scenes

    if args.out is not None or args.grid is not None:
        _parser().error("--scenes writes scenes only; leave out --out and --grid")
    if args.scenes.exists() and not args.scenes.is_dir():
        print(f"seglstm synth: error: --scenes {args.scenes} is a file, not a folder", file=sys.stderr)
        return 2

    def write(folder: Path) -> Path:
        return write_synthetic_scenes(folder, args.n_scenes, size=args.size, seed=args.seed,
                                      overwrite=args.overwrite, progress=not args.quiet)

    try:
        command = "seglstm synth " + " ".join(argv)
        path = write_dataset(args.scenes, write, command, replace=args.overwrite) / "scenes.yaml"
    except (ValueError, OSError) as err:
        return _failed(err, args.scenes)
    print(f"synthetic scenes ready: {path} ({args.n_scenes} scenes + 1 held out, {args.size} px a side)")
    return 0
