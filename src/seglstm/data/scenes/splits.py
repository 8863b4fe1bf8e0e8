"""Spatial splits of a scene, in its pixel coordinates, that cannot leak.

An area is a shapely geometry in pixel space (x = column, y = row; pixel ``(r, c)`` is the unit square
with centre ``(c + 0.5, r + 0.5)``). A pixel belongs to an area when its centre does (the labels' rule).

* per-split polygon files (any CRS) give the areas directly;
* ``split: {val, test, block, seed}`` cuts each scene into ``block`` x ``block`` pixel blocks and assigns
  ``round(val * n)`` of its ``n`` blocks to val and ``round(test * n)`` to test, by a permutation seeded with
  ``(seed, scene index)``: the same blocks on every run and in every worker;
* ``split: val`` puts a whole scene in one split.

Training windows keep a buffer of ``buffer`` pixels to every val/test pixel: no training pixel is within
Chebyshev distance ``buffer`` of a val/test pixel (at least ``buffer`` pixels lie between them), so a
model cannot have seen, in any training window, pixels next to what it is scored on. For block splits
the forbidden zone is each block grown by ``buffer + 1`` pixels (exact); for polygon areas it is the
union grown by ``(buffer + 1) * sqrt(2)`` (a Euclidean buffer that contains the Chebyshev one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import shapely
from affine import Affine
from rasterio.features import rasterize

from seglstm.data.io import DataError
from seglstm.data.scenes.labels import Grid, polygonal, read_vector
from seglstm.data.scenes.spec import SceneSpec, SplitSpec


@dataclass
class SceneAreas:
    """The val and test areas of one scene, the train area (``None``: the whole scene), and the zone that
    training windows may not touch."""

    val: shapely.Geometry
    test: shapely.Geometry
    train: shapely.Geometry | None
    forbidden: shapely.Geometry
    how: str

    def area(self, split: str) -> shapely.Geometry | None:
        return {"val": self.val, "test": self.test, "train": self.train}[split]

    def mask(self, split: str, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """Whether each pixel of the window lies in ``split``'s area (pixel centres)."""
        geom = self.area(split)
        if geom is None:
            return np.ones((height, width), bool)
        if geom.is_empty:
            return np.zeros((height, width), bool)
        return rasterize(
            [(geom, 1)], out_shape=(height, width), transform=Affine.translation(x0, y0), fill=0,
            all_touched=False, dtype=np.uint8,
        ).astype(bool)


def block_areas(grid: Grid, spec: SplitSpec, index: int, buffer: int) -> SceneAreas:
    """Deterministic block assignment (see the module docstring)."""
    b = spec.block
    ny, nx = math.ceil(grid.height / b), math.ceil(grid.width / b)
    n = nx * ny
    order = np.random.default_rng([spec.seed, index]).permutation(n)
    n_val, n_test = round(spec.val * n), round(spec.test * n)
    blocks = {"val": order[:n_val], "test": order[n_val : n_val + n_test]}
    boxes = {}
    grown = []
    for split, ids in blocks.items():
        parts = []
        for k in ids.tolist():
            r, c = divmod(k, nx)
            x0, y0, x1, y1 = c * b, r * b, min((c + 1) * b, grid.width), min((r + 1) * b, grid.height)
            parts.append(shapely.box(x0, y0, x1, y1))
            grown.append(shapely.box(x0 - buffer - 1, y0 - buffer - 1, x1 + buffer + 1, y1 + buffer + 1))
        boxes[split] = shapely.union_all(parts) if parts else shapely.Polygon()
    how = f"blocks of {b} px: {n - n_val - n_test} train, {n_val} val, {n_test} test of {n}"
    return SceneAreas(boxes["val"], boxes["test"], None, shapely.union_all(grown) if grown else shapely.Polygon(), how)


def polygon_areas(scene: SceneSpec, grid: Grid, buffer: int) -> SceneAreas:
    """Areas from per-split polygon files, moved into the scene's pixel space and clipped to it."""
    frame = shapely.box(0, 0, grid.width, grid.height)
    found: dict[str, shapely.Geometry] = {}
    for split, path in scene.areas:
        geoms, _, _ = read_vector(path, grid)
        geom = shapely.union_all(polygonal(geoms)) if len(geoms) else shapely.Polygon()
        found[split] = shapely.intersection(geom, frame)
    val = found.get("val", shapely.Polygon())
    test = found.get("test", shapely.Polygon())
    held = shapely.union(val, test)
    forbidden = held.buffer((buffer + 1) * math.sqrt(2)) if not held.is_empty else shapely.Polygon()
    how = "area files: " + ", ".join(f"{s} {p}" for s, p in scene.areas)
    return SceneAreas(val, test, found.get("train"), forbidden, how)


def scene_areas(scene: SceneSpec, grid: Grid, spec: SplitSpec | None, index: int, buffer: int) -> SceneAreas:
    """The areas of scene ``index`` by whichever rule its entry uses."""
    if scene.split is not None:
        whole, empty = shapely.box(0, 0, grid.width, grid.height), shapely.Polygon()
        if scene.split == "train":
            return SceneAreas(empty, empty, None, empty, "whole scene: train")
        val, test = (whole if scene.split == s else empty for s in ("val", "test"))
        return SceneAreas(val, test, empty, whole, f"whole scene: {scene.split}")
    if scene.areas:
        return polygon_areas(scene, grid, buffer)
    if spec is None:
        raise DataError(f"scene {scene.name}: no areas and no split settings")
    return block_areas(grid, spec, index, buffer)


def allowed_windows(areas: SceneAreas, xs: np.ndarray, ys: np.ndarray, width: int, height: int) -> np.ndarray:
    """Which training windows (top-left ``xs, ys``) keep clear of the forbidden zone and, when the scene
    has a train area, have every pixel centre inside it."""
    boxes = shapely.box(xs + 0.5, ys + 0.5, xs + width - 0.5, ys + height - 0.5)
    ok = ~shapely.intersects(boxes, areas.forbidden) if not areas.forbidden.is_empty else np.ones(len(xs), bool)
    if areas.train is not None:
        ok &= shapely.covered_by(boxes, areas.train)
    return ok


def window_grid(length: int, tile: int) -> list[tuple[int, int, int]]:
    """``(origin, own_start, own_end)`` of predict-scene's window grid along one axis with no overlap
    (``plan_tiles(..., overlap=0)``): origins every ``tile`` pixels, the last one moved back to end at the
    edge; each pixel is owned by exactly one window (the first one covering it)."""
    from seglstm.inference.scene.plan import plan_tiles

    tile = min(tile, length)
    out, end = [], 0
    for origin in plan_tiles(1, length, tile, 0).xs:
        out.append((origin, max(origin, end), origin + tile))
        end = origin + tile
    return out

