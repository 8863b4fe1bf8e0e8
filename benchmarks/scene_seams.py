"""Seams along window edges: class changes across window-edge lines against all other lines, per blending
weight floor, for trained checkpoints on one synthetic scene.

    python benchmarks/scene_seams.py --ckpt NAME=PATH [NAME=PATH ...] [--side 2000] [--tile 64]
                                     [--overlap 16] [--floors 0.1 0.001]

A line is the boundary between two pixel columns (or rows); it is a window-edge line when a window of the
sliding grid starts or ends there. With a blend whose weight steps at a window's edge, class boundaries
snap to those lines: their change rate exceeds the other lines' (ratio > 1) and the lines with the most
changes are window edges. The scene is ``seglstm.data.synthetic.render_scene`` at ``--side`` pixels,
written as a GeoTIFF; each checkpoint segments it with ``predict-scene``'s predictor in float32. Prints a
table and writes benchmarks/results/scene_seams.json (its seconds are only for orientation).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json

RESULTS = Path(__file__).resolve().parent / "results" / "scene_seams.json"


def edge_lines(origins: tuple[int, ...], size: int, n: int) -> np.ndarray:
    """Mask over the ``n - 1`` lines between pixels: True where a window starts or ends."""
    edge = np.zeros(n - 1, bool)
    for o in origins:
        for line in (o, o + size):
            if 0 < line < n:
                edge[line - 1] = True
    return edge


def seam_counts(classes: np.ndarray, tile: int, overlap: int) -> dict:
    from seglstm.inference.scene import NODATA, plan_tiles

    h, w = classes.shape
    grid = plan_tiles(h, w, tile, overlap)
    valid = classes != NODATA
    cols = ((classes[:, 1:] != classes[:, :-1]) & valid[:, 1:] & valid[:, :-1]).sum(0)
    rows = ((classes[1:] != classes[:-1]) & valid[1:] & valid[:-1]).sum(1)
    counts = np.concatenate([cols, rows])
    edge = np.concatenate([edge_lines(grid.xs, grid.tile_w, w), edge_lines(grid.ys, grid.tile_h, h)])
    top5 = np.argsort(-counts, kind="stable")[:5]
    per_edge, per_other = counts[edge].mean(), counts[~edge].mean()
    return {"edge_changes_per_line": float(per_edge), "other_changes_per_line": float(per_other),
            "ratio": float(per_edge / per_other), "top5_on_edges": int(edge[top5].sum()),
            "edge_lines": int(edge.sum()), "other_lines": int((~edge).sum())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", nargs="+", required=True, metavar="NAME=PATH")
    parser.add_argument("--side", type=int, default=2000)
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--floors", type=float, nargs="+", default=[0.1, 1e-3])
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    import rasterio

    from seglstm.data.synthetic import render_scene
    from seglstm.inference.loading import load_segmentor
    from seglstm.inference.scene import ScenePredictor
    from seglstm.study.measure import machine_info

    rgb, _, kind = render_scene(args.seed, "val", 0, size=args.side)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        scene = Path(work) / "scene.tif"
        with rasterio.open(scene, "w", driver="GTiff", height=args.side, width=args.side, count=3, dtype="uint8",
                           crs="EPSG:32633", transform=rasterio.Affine(0.3, 0, 500_000, 0, -0.3, 4_200_000),
                           tiled=True, blockxsize=256, blockysize=256) as dst:
            dst.write(rgb.transpose(2, 0, 1))
        for spec in args.ckpt:
            name, _, path = spec.partition("=")
            model, meta = load_segmentor(path)
            for floor in args.floors:
                predictor = ScenePredictor(model, meta["mean"], meta["std"], meta["classes"], meta["palette"],
                                           tile=args.tile, overlap=args.overlap, device="cpu", precision="fp32",
                                           weight_floor=floor, progress=False)
                out = Path(work) / f"{name}_{floor}.tif"
                started = time.perf_counter()
                predictor.predict(scene, out)
                with rasterio.open(out) as src:
                    classes = src.read(1)
                rows.append({"model": name, "floor": floor, **seam_counts(classes, args.tile, args.overlap),
                             "seconds": round(time.perf_counter() - started, 1)})
    print(f"{args.side}x{args.side} synthetic {kind} scene, tile {args.tile}, overlap {args.overlap}")
    print_table(rows, ["model", "floor", "edge_changes_per_line", "other_changes_per_line", "ratio",
                       "top5_on_edges", "seconds"])
    settings = {**vars(args), "ckpt": [c.partition("=")[0] for c in args.ckpt]}  # names, not local paths
    write_json(RESULTS, {"settings": settings, "scene": kind, "machine": machine_info(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
