"""``seglstm predict-scene``: segment a whole GeoTIFF scene into a georeferenced class raster."""

from __future__ import annotations

import argparse
import logging
import sys

from seglstm.inference.scene import SceneError, ScenePredictor, parse_bands, parse_scale
from seglstm.utils.io import CheckpointLoadError

PROG = "seglstm predict-scene"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Segment a GeoTIFF of any size with tiled, overlap-blended sliding-window inference. Memory is "
            "bounded by the tile, batch and --buffer-mb, not by the scene. The output is a tiled, "
            "deflate-compressed uint8 GeoTIFF of class indices (nodata 255) with the input's CRS and "
            "transform and a colour table from the palette."
        ),
    )
    p.add_argument("input", help="input raster (GeoTIFF or anything GDAL reads)")
    p.add_argument("output", help="output class GeoTIFF")
    p.add_argument("--ckpt", required=True, help="segmentor checkpoint")
    p.add_argument("--config", default=None, help="model config, when the checkpoint does not carry one")
    p.add_argument("--bands", default=None, help="1-based bands fed to the model, e.g. 3,2,1 (default: 1..C)")
    p.add_argument("--tile", type=int, default=1024, help="window side in pixels (default 1024)")
    p.add_argument(
        "--overlap", type=int, default=None, help="overlap between windows in pixels (default tile / 4: 256)"
    )
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--no-amp", action="store_true", help="run CUDA in float32 instead of autocast")
    p.add_argument(
        "--scale",
        default="auto",
        help=(
            "bring raw values to the 0..255 training scale: percentile:2,98 (from a decimated overview "
            "read), range:LO,HI, none, or auto = none for uint8 and percentile:2,98 otherwise"
        ),
    )
    p.add_argument("--probs", default=None, help="also write per-class probabilities (uint8 0..255) here")
    p.add_argument("--preview", default=None, help="also write a colour-coded PNG preview here")
    p.add_argument("--preview-size", type=int, default=1024, help="longest preview side (default 1024)")
    p.add_argument(
        "--buffer-mb",
        type=float,
        default=512.0,
        help="blending buffer budget in MiB; sets the strip width (default 512)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run of the same command")
    p.add_argument("--allow-no-crs", action="store_true", help="accept an input without a CRS")
    p.add_argument("--unsafe-load", action="store_true", help="allow full unpickling of a trusted checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str]) -> int:
    """Run the command; 0 on success, 2 on bad input, 130 when interrupted (resumable)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"{PROG}: %(message)s")
    # imported here: the loader pulls in every model and the training stack, which --help does not need
    from seglstm.inference.loading import SegmentorLoadError, load_segmentor
    from seglstm.models.checkpoint import CheckpointMismatchError

    try:
        bands = None if args.bands is None else parse_bands(args.bands)
        scale = parse_scale(args.scale)
        model, meta = load_segmentor(args.ckpt, args.config, map_location="cpu", unsafe=args.unsafe_load)
        if meta["num_classes"] != len(meta["palette"]):
            raise SceneError(
                f"--ckpt {args.ckpt}: the model has {meta['num_classes']} classes but its palette has "
                f"{len(meta['palette'])} colours"
            )
        predictor = ScenePredictor(
            model,
            meta["mean"],
            meta["std"],
            meta["classes"],
            meta["palette"],
            tile=args.tile,
            overlap=args.tile // 4 if args.overlap is None else args.overlap,
            batch_size=args.batch_size,
            device=args.device,
            amp=not args.no_amp,
            buffer_mb=args.buffer_mb,
            progress=not args.quiet,
        )
        result = predictor.predict(
            args.input,
            args.output,
            bands=bands,
            scale=scale,
            probs_path=args.probs,
            preview_path=args.preview,
            preview_size=args.preview_size,
            resume=args.resume,
            allow_no_crs=args.allow_no_crs,
        )
    except (
        SceneError,
        FileNotFoundError,
        SegmentorLoadError,
        CheckpointMismatchError,
        CheckpointLoadError,
    ) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"{PROG}: interrupted; {args.output} was not written. Progress so far is kept beside it: rerun the same "
            "command with --resume to continue.",
            file=sys.stderr,
        )
        return 130
    written = [str(p) for p in (result.output, result.probs, result.preview) if p is not None]
    logging.getLogger(__name__).info(
        "%dx%d scene, %d tiles in %d strip(s), %.1f s -> %s",
        result.height,
        result.width,
        result.tiles,
        result.strips,
        result.seconds,
        ", ".join(written),
    )
    return 0
