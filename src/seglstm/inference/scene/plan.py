"""Where the windows go: mmseg's slide grid, block-aligned column strips and the blending weight.

Pure functions of the scene size and the settings, so a resumed run plans exactly what the first run did.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from seglstm.inference.scene.errors import SceneError

BLOCK = 256  # GeoTIFF block side; strips, flushes and chunks are aligned to it
# smallest blending weight, at a window's edge: near zero, so that a window hands over to its neighbour
# without a step (a floor of 0.1 left straight class boundaries along window edges), yet positive where
# a single window covers the scene edge (the division by the summed weights then returns that window)
WEIGHT_FLOOR = 1e-3


@dataclass(frozen=True)
class TileGrid:
    """Top-left corners of equally sized windows covering a ``height x width`` scene."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]


def _axis_origins(length: int, tile: int, stride: int) -> tuple[int, ...]:
    if length <= tile:
        return (0,)
    n = -(-(length - tile) // stride) + 1
    return tuple(min(i * stride, length - tile) for i in range(n))


def plan_tiles(height: int, width: int, tile: int, overlap: int) -> TileGrid:
    """mmseg's slide grid: stride ``tile - overlap``, last window snapped to the edge, windows clipped to
    the scene when it is smaller than a tile (so all windows share one shape and batch together)."""
    if tile <= 0:
        raise SceneError(f"--tile must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise SceneError(f"--overlap must be in [0, tile={tile}), got {overlap}")
    if height <= 0 or width <= 0:
        raise SceneError(f"scene size must be positive, got {height}x{width}")
    th, tw = min(tile, height), min(tile, width)
    stride = tile - overlap
    return TileGrid(
        height, width, th, tw, _axis_origins(height, th, stride), _axis_origins(width, tw, stride)
    )


@dataclass(frozen=True)
class Strip:
    """Output columns ``[x0, x1)`` and the grid columns of every window that touches them."""

    index: int
    x0: int
    x1: int
    cols: tuple[int, ...]

    def extent(self, grid: TileGrid) -> tuple[int, int]:
        """Columns spanned by this strip's windows (what its buffer and reads cover)."""
        return grid.xs[self.cols[0]], grid.xs[self.cols[-1]] + grid.tile_w


def plan_strips(grid: TileGrid, strip_width: int) -> list[Strip]:
    """Split output columns into block-aligned strips of ``strip_width`` (a multiple of 256)."""
    if strip_width <= 0 or strip_width % BLOCK:
        raise SceneError(f"strip width must be a positive multiple of {BLOCK}, got {strip_width}")
    strips = []
    for k, x0 in enumerate(range(0, grid.width, strip_width)):
        x1 = min(x0 + strip_width, grid.width)
        cols = tuple(c for c, x in enumerate(grid.xs) if x < x1 and x + grid.tile_w > x0)
        strips.append(Strip(k, x0, x1, cols))
    return strips


@dataclass(frozen=True)
class Tile:
    """One window run: its position in the global run order, its strip and its grid row / column."""

    index: int
    strip: int
    row: int
    col: int


def plan_run(grid: TileGrid, strips: list[Strip]) -> list[Tile]:
    """Every window of every strip in run order: strip by strip, row by row, left to right."""
    order = [(s.index, r, c) for s in strips for r in range(len(grid.ys)) for c in s.cols]
    return [Tile(i, k, r, c) for i, (k, r, c) in enumerate(order)]


def window_weight(h: int, w: int, floor: float = WEIGHT_FLOOR) -> np.ndarray:
    """Separable Hann window ``floor + (1 - floor) sin^2(pi (i + 0.5) / n)``, float32 ``(h, w)``.

    It falls smoothly to about ``floor`` at a window's border, so overlapping windows hand over without
    seams while the centre pixels dominate, and the floor keeps it positive where a single window covers
    the scene edge (there the blend is that window's own prediction).
    """
    if not 0.0 < floor <= 1.0:
        raise SceneError(f"window weight floor must be in (0, 1], got {floor}")

    def axis(n: int) -> np.ndarray:
        return floor + (1.0 - floor) * np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2

    return np.outer(axis(h), axis(w)).astype(np.float32)


def model_patch_size(model: object) -> int | None:
    """The encoder's patch size (its smallest meaningful window), when it has one."""
    encoder = getattr(model, "backbone", model)
    size = getattr(encoder, "patch_size", None)
    if isinstance(size, (tuple, list)):
        size = max(size)
    return int(size) if isinstance(size, int) else None


def default_tile(model: object, test_cfg: dict | None) -> tuple[int, int, str]:
    """``(tile, overlap, why)`` a scene should be cut into for this model: the run config's slide-inference
    crop and stride when it has them, else the crop the encoder was trained on (its position table),
    else 1024 with a quarter overlap."""
    cfg = dict(test_cfg or {})
    if cfg.get("mode") == "slide" and cfg.get("crop_size"):
        crop = cfg["crop_size"]
        tile = int(max(crop) if isinstance(crop, (list, tuple)) else crop)
        stride = cfg.get("stride") or tile
        stride = int(max(stride) if isinstance(stride, (list, tuple)) else stride)
        return tile, max(0, tile - stride), f"the run config's slide inference (crop {tile}, stride {stride})"
    encoder = getattr(model, "backbone", model)
    table = getattr(getattr(encoder, "pos_embed", None), "embed", None)
    patch = model_patch_size(model)
    if table is not None and patch:
        tile = int(max(table.shape[1:3])) * patch
        return tile, tile // 4, f"the model's training crop ({tile} px: {tuple(table.shape[1:3])} patches of {patch})"
    return 1024, 256, "the default (the model records no training crop)"
