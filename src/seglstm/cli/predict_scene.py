"""``seglstm predict-scene``: segment a whole scene into a georeferenced class raster, COG and polygons."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from seglstm.errors import SeglstmError
from seglstm.inference.scene import (
    InputOptions,
    SceneError,
    ScenePredictor,
    VectorSpec,
    parse_bands,
    parse_scale,
)
from seglstm.inference.scene.plan import default_tile, model_patch_size

PROG = "seglstm predict-scene"
log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Segment a raster of any size with tiled, overlap-blended sliding-window inference. Memory is "
            "bounded by the tile, batch and --buffer-mb, not by the scene. The output is a tiled, "
            "deflate-compressed uint8 GeoTIFF (or COG) of class indices (nodata 255) with the input's CRS "
            "and transform (or GCPs) and a colour table from the palette; polygons optionally."
        ),
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="INPUT OUTPUT.tif: one input raster (a file, an http(s):// or s3:// URL, a /vsi* path, or a STAC "
        "item .json with --asset/--assets) and the output class GeoTIFF. With --out-dir: any number of inputs: "
        "files, URLs, glob patterns ('tiles/*.tif'), @LIST (a text file, one path or URL a line) or STAC "
        "ItemCollections (.json with features)",
    )
    p.add_argument(
        "--out-dir",
        default=None,
        help="map a region: each scene's products go to OUT_DIR/<scene>/ (classes.tif and the names given to "
        "--probs/--preview/--vector), plus manifest.json/.csv, mosaic.vrt and with --vector one merged "
        "GeoPackage. Ranks started by torchrun or srun share the scenes; a rerun does only what is missing",
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", help="segmentor checkpoint")
    model.add_argument("--onnx", help="an ONNX model written by `seglstm export` (run with onnxruntime)")
    p.add_argument("--config", default=None, help="model config, when the checkpoint does not carry one")
    p.add_argument("--bands", default=None, help="1-based bands fed to the model, e.g. 3,2,1 (default: 1..C)")
    p.add_argument("--asset", default=None, help="STAC input: the asset to read (all its bands)")
    p.add_argument("--assets", default=None, help="STAC input: assets stacked in this order, e.g. red,green,blue")
    p.add_argument(
        "--tile",
        type=int,
        default=None,
        help="window side in pixels (default: the run config's slide crop, else the model's training crop)",
    )
    p.add_argument("--overlap", type=int, default=None, help="overlap between windows in pixels (default tile / 4)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument(
        "--precision",
        default="auto",
        help=(
            "autocast dtype of the forward pass: auto, fp32, bf16 or fp16. auto = bf16 on CUDA (fp16 where "
            "bf16 is unsupported) and on a CPU with native bf16 GEMMs (AVX512-BF16 or AMX), fp32 on other "
            "CPUs (bf16 is emulated there and slower); the mLSTM cell always runs in fp32. An --onnx model runs in "
            "the dtype it was exported in. On a CPU the ViL output norm runs as one compiled kernel when a C++ "
            "compiler is present (SEGLSTM_INDUCTOR=0 turns that off; the first tile of each size compiles it)"
        ),
    )
    p.add_argument(
        "--scale",
        default="auto",
        help=(
            "bring raw values to the 0..255 training scale: percentile:2,98 (from a decimated overview "
            "read), range:LO,HI, none, or auto = none for uint8 and percentile:2,98 otherwise"
        ),
    )
    p.add_argument("--nodata", type=float, default=None, help="treat this value as nodata (overrides the file's)")
    p.add_argument("--dst-crs", default=None, help="reproject on the fly to this CRS (e.g. EPSG:3857)")
    p.add_argument(
        "--resolution", type=float, nargs="+", default=None, metavar="RES",
        help="output pixel size (X [Y]) on gdalwarp's -tr grid",
    )
    # map-ready products: output grid, STAC asset grids
    p.add_argument("--tap", action="store_true", help="snap the output bounds to multiples of --resolution "
                   "(gdalwarp -tap), so that grids of different scenes line up")
    p.add_argument("--asset-grid", default=None, metavar="ASSET", help="STAC assets on different grids are "
                   "resampled onto this asset's grid (default: the finest)")
    p.add_argument("--probs", default=None, help="also write per-class probabilities (uint8 0..255) here")
    p.add_argument("--preview", default=None, help="also write a colour-coded PNG preview here")
    p.add_argument("--preview-size", type=int, default=1024, help="longest preview side (default 1024)")
    p.add_argument("--cog", action="store_true", help="write the class raster and probabilities as COGs")
    p.add_argument(
        "--vector", default=None,
        help="also write class polygons (.gpkg, .geojson per RFC 7946 in WGS84 lon/lat, .parquet)",
    )
    p.add_argument(
        "--min-area", type=float, default=0.0,
        help="minimum mapping unit (map units^2): smaller regions are merged into their largest neighbour "
        "(GDAL sieve, 4-connected) before polygons are traced; no polygon ends below it, even after --simplify",
    )
    p.add_argument(
        "--simplify", type=float, default=0.0, help="topology-preserving simplification tolerance (map units)"
    )
    p.add_argument(
        "--buffer-mb",
        type=float,
        default=512.0,
        help="blending buffer budget in MiB; sets the strip width (default 512)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run of the same command")
    p.add_argument("--allow-no-crs", action="store_true", help="accept an input with neither a CRS nor GCPs")
    p.add_argument("--unsafe-load", action="store_true", help="allow full unpickling of a trusted checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _input_options(args: argparse.Namespace) -> InputOptions:
    if args.asset and args.assets:
        raise SceneError("--asset and --assets exclude each other")
    assets = [args.asset] if args.asset else [a.strip() for a in (args.assets or "").split(",") if a.strip()]
    resolution = None
    if args.resolution is not None:
        if len(args.resolution) > 2 or any(r <= 0 for r in args.resolution):
            raise SceneError(f"--resolution {args.resolution}: expected one or two positive pixel sizes")
        resolution = (args.resolution[0], args.resolution[-1])
    if args.tap and resolution is None:
        raise SceneError("--tap snaps the output bounds to the resolution: add --resolution")
    return InputOptions(tuple(assets) or None, args.nodata, args.dst_crs, resolution, args.tap, args.asset_grid)


def _load(args: argparse.Namespace):
    """The model and what inference needs to know about it, from a checkpoint or an ONNX file."""
    if args.onnx:
        from seglstm.inference.scene.onnx import OnnxSegmentor

        model = OnnxSegmentor(args.onnx)
        return model, model.meta
    from seglstm.inference.loading import load_segmentor

    model, meta = load_segmentor(args.ckpt, args.config, map_location="cpu", unsafe=args.unsafe_load)
    if meta["num_classes"] != len(meta["palette"]):
        raise SceneError(
            f"--ckpt {args.ckpt}: the model has {meta['num_classes']} classes but its palette has "
            f"{len(meta['palette'])} colours"
        )
    return model, meta


def _tiling(args: argparse.Namespace, model, meta: dict) -> tuple[int, int]:
    patch = meta.get("patch_size") or model_patch_size(model)
    if args.tile is not None and patch and args.tile < patch:
        raise SceneError(f"--tile {args.tile} is below the model's patch size {patch}; use --tile >= {patch}")
    if meta.get("tile"):  # an exported model runs one fixed tile
        if args.tile not in (None, meta["tile"]):
            raise SceneError(f"--tile {args.tile}: {args.onnx} was exported for tiles of {meta['tile']}")
        tile, overlap, why = meta["tile"], meta["tile"] // 4, "the tile it was exported for"
    elif args.tile is None:
        tile, overlap, why = default_tile(model, meta.get("test_cfg"))
    else:
        tile, overlap, why = args.tile, args.tile // 4, "--tile"
    overlap = overlap if args.overlap is None else args.overlap
    log.info("tile %d, overlap %d: %s", tile, overlap, why)
    return tile, overlap


def main(argv: list[str]) -> int:
    """Run the command; 0 on success, 2 on bad input, 130 when interrupted (resumable)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out_dir is None:
        if len(args.paths) != 2:
            parser.error(f"give one INPUT and OUTPUT.tif, or several inputs with --out-dir DIR; got {args.paths}")
        args.input, args.output = args.paths
    logging.basicConfig(level=logging.INFO, format=f"{PROG}: %(message)s")
    try:
        bands = None if args.bands is None else parse_bands(args.bands)
        scale = parse_scale(args.scale)
        options = _input_options(args)
        vector = None
        if args.vector is not None:
            vector = VectorSpec(Path(args.vector), args.min_area, args.simplify)
            vector.check()
        elif args.min_area or args.simplify:
            raise SceneError("--min-area and --simplify apply to polygons: add --vector OUT.gpkg")
        if args.onnx and args.precision in ("bf16", "fp16"):
            raise SceneError(
                f"--precision {args.precision}: an ONNX model (--onnx) runs in the dtype it was exported in; "
                "use --precision auto or fp32"
            )
        launch = None
        if args.out_dir is not None:
            from seglstm.inference.scene.region import Launch

            launch = Launch.from_env()
            args.device = launch.device(args.device)
        model, meta = _load(args)
        tile, overlap = _tiling(args, model, meta)
        predictor = ScenePredictor(
            model,
            meta["mean"],
            meta["std"],
            meta["classes"],
            meta["palette"],
            tile=tile,
            overlap=overlap,
            batch_size=args.batch_size,
            device=args.device,
            precision="fp32" if args.onnx else args.precision,
            buffer_mb=args.buffer_mb,
            progress=not args.quiet,
        )
        if launch is not None:
            from seglstm.cli.predict_region import run_region_cli

            return run_region_cli(predictor, args, vector, options, bands, scale, launch)
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
            cog=args.cog,
            vector=vector,
            input_options=options,
        )
    except (SeglstmError, FileNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.out_dir is not None:
            print(f"{PROG}: interrupted; rerun the same command to finish {args.out_dir}", file=sys.stderr)
            return 130
        print(
            f"{PROG}: interrupted; {args.output} was not written. Progress so far is kept beside it: rerun the same "
            "command with --resume to continue.",
            file=sys.stderr,
        )
        return 130
    written = [str(p) for p in (result.output, result.probs, result.preview, result.vector) if p is not None]
    log.info(
        "%dx%d scene, %d tiles in %d strip(s), %.1f s -> %s%s",
        result.height,
        result.width,
        result.tiles,
        result.strips,
        result.seconds,
        ", ".join(written),
        f" ({result.polygons} polygons)" if result.vector else "",
    )
    return 0
