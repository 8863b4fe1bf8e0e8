"""The ``scenes`` dataset: windows read from whole GeoTIFF scenes with vector or raster labels.

Training items are random windows of the crop size, drawn from ``(seed, epoch, index)`` alone, so they
do not depend on the worker, the number of workers or the rank (the existing ``EpochSampler``, mid-epoch
resume and DDP sharding apply unchanged). Where they may go is decided once, in the parent process:

* a coarse labelled-area grid per scene (labels rasterised at ``f = max(1, min(crop) // 16)`` image pixels
  per cell-pixel, counted in cells of ``4 f`` pixels): a window's weight is its labelled pixels, or, with
  ``class_balanced``, the sum over classes of its pixels of that class divided by the class's total;
* candidate windows on the cell lattice that keep clear of val/test (see :mod:`.splits`); an item picks a
  candidate by weight and shifts it by up to one cell when the shifted window is still allowed.

Val and test items are the windows of predict-scene's grid (``plan_tiles`` with the crop as tile and no
overlap) that meet the split's area; each pixel is scored once (by the first window covering it) and only
inside the area: everything else in a window is 255.

Files are opened lazily in the process that reads (a DataLoader worker opens its own; nothing open is
pickled). A window reads only its pixels and rasterises only the polygons its box meets.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import torch
from rasterio.windows import Window

from seglstm.data.base import SegDataset
from seglstm.data.io import DEFAULT_MAX_PIXELS, DataError
from seglstm.data.scenes.labels import IGNORE, Grid, RasterLabels, VectorLabels, load_vector_labels
from seglstm.data.scenes.spec import SPLITS, SceneSpec, read_scenes_file
from seglstm.data.scenes.splits import SceneAreas, allowed_windows, scene_areas, window_grid
from seglstm.data.transforms import Sample
from seglstm.inference.scene.errors import SceneError
from seglstm.inference.scene.source import InputOptions, SceneInput, open_input

_SAMPLER_STREAM = 0x5CE7E  # keeps the window draw apart from the augmentation stream of the same item


def scene_error(scene: SceneSpec, err: SceneError) -> DataError:
    """predict-scene's opener speaks of command-line flags; here the scenes file is what to fix."""
    text = (
        str(err)
        .replace("--asset(s) ", "asset(s) ")
        .replace("--asset/--assets need", "assets need")
        .replace("choose its bands with --asset NAME or --assets A,B,C", "list the assets to stack under assets:")
    )
    return DataError(f"scene {scene.name}: {text} (fix this entry of the scenes file)")


def scene_grid(scene: SceneSpec) -> tuple[Grid, int]:
    """The image's grid and band count, from its header."""
    try:
        with open_input(scene.image, InputOptions(assets=scene.assets)) as src:
            if src.crs is None:
                raise DataError(
                    f"{scene.image}: the image has no CRS, so its labels cannot be placed on it; "
                    "georeference it (e.g. gdal_edit.py -a_srs)"
                )
            return Grid(src.height, src.width, src.crs.to_string(), tuple(src.transform)[:6]), src.count
    except SceneError as err:
        raise scene_error(scene, err) from err


class SceneDataset(SegDataset):
    """Windows of GeoTIFF scenes listed in a ``scenes.yaml`` (see :mod:`seglstm.data.scenes.spec`).

    Args:
        root: unused (paths in ``scenes.yaml`` are relative to that file); kept for the registry's call.
        split: ``train``, ``val`` or ``test``.
        scenes: path of the ``scenes.yaml``.
        crop_size: window (h, w); also the buffer kept between training windows and val/test pixels.
        transforms: joint transform on each sample dict.
        bands: 0-based bands of the images, in order (default the first three).
        seed: seed of the window draw and the augmentation.
        max_pixels: largest window (h * w) to read.
    """

    splits = SPLITS
    reduce_zero_label = False

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        scenes: str | Path | None = None,
        crop_size: Sequence[int] = (512, 512),
        transforms: Callable[..., Sample] | None = None,
        *,
        bands: Sequence[int] | None = None,
        seed: int = 0,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        channels: int | None = None,
    ) -> None:
        if scenes is None:
            raise ValueError("dataset 'scenes' needs data.scenes: the path of a scenes.yaml")
        super().__init__(split, transforms, seed=seed, max_pixels=max_pixels, channels=channels, bands=bands)
        if len(crop_size) != 2 or min(crop_size) <= 0:
            raise ValueError(f"crop_size must be two positive integers, got {crop_size!r}")
        self.crop = (int(crop_size[0]), int(crop_size[1]))
        if max_pixels is not None and self.crop[0] * self.crop[1] > max_pixels:
            raise ValueError(f"crop_size {self.crop} exceeds max_pixels={max_pixels}")
        self.spec = read_scenes_file(scenes)
        self.classes, self.palette = self.spec.classes, self.spec.palette
        self.buffer = max(self.crop)
        self.band_list = [1, 2, 3] if self.bands is None else [b + 1 for b in self.bands]
        self.grids: list[Grid] = []
        for scene in self.spec.scenes:
            grid, count = scene_grid(scene)
            if max(self.band_list) > count:
                raise DataError(
                    f"{scene.image}: has {count} band(s) but bands {[b - 1 for b in self.band_list]} (0-based) "
                    "are asked for; set data.bands"
                )
            self.grids.append(grid)
        self.areas: list[SceneAreas] = [
            scene_areas(s, g, self.spec.split, i, self.buffer)
            for i, (s, g) in enumerate(zip(self.spec.scenes, self.grids))
        ]
        for a in self.areas:
            shapely.prepare(a.forbidden)
            if a.train is not None:
                shapely.prepare(a.train)
        self.files = [(Path(s.image), Path(s.labels)) for s in self.spec.scenes]
        self._handles: dict[int, dict[str, Any]] = {}
        if split == "train":
            self._plan_training()
        else:
            self._plan_eval()
        self.close()  # what planning opened; the processes that read windows open their own

    # ------------------------------------------------------------------------------------------ planning
    @property
    def cell_scale(self) -> int:
        """Image pixels per pixel of the coarse labelled-area raster."""
        return max(1, min(self.crop) // 16)

    def coarse_labels(self, i: int) -> np.ndarray:
        """Scene ``i``'s labels at ``cell_scale`` pixels per value (pixel-centre rule at that scale)."""
        f, grid = self.cell_scale, self.grids[i]
        h, w = math.ceil(grid.height / f), math.ceil(grid.width / f)
        labels = self.labels(i)
        if isinstance(labels, RasterLabels):
            return labels.coarse(h, w)
        return labels.window(0, 0, w, h, scale=f)

    def _plan_training(self) -> None:
        ch, cw = self.crop
        f = self.cell_scale
        cell = 4 * f
        k = self.num_classes
        per_scene = []
        totals = np.zeros(k, np.float64)
        for i, grid in enumerate(self.grids):
            if self.areas[i].train is not None and self.areas[i].train.is_empty:
                continue  # a scene held out whole
            if grid.height < ch or grid.width < cw:
                raise DataError(
                    f"{self.spec.scenes[i].image}: the scene ({grid.width}x{grid.height}) is smaller than the "
                    f"crop ({cw}x{ch}); lower data.crop_size"
                )
            lab = self.coarse_labels(i)
            gh, gw = math.ceil(lab.shape[0] / 4), math.ceil(lab.shape[1] / 4)
            padded = np.full((gh * 4, gw * 4), IGNORE, np.uint8)
            padded[: lab.shape[0], : lab.shape[1]] = lab
            blocks = padded.reshape(gh, 4, gw, 4)
            counts = np.stack([(blocks == c).sum(axis=(1, 3)) for c in range(k)]).astype(np.float64) * f * f
            totals += counts.sum(axis=(1, 2))
            integral = np.zeros((k, gh + 1, gw + 1))
            integral[:, 1:, 1:] = counts.cumsum(1).cumsum(2)
            ys, xs = np.meshgrid(np.arange(0, grid.height - ch + 1, cell), np.arange(0, grid.width - cw + 1, cell),
                                 indexing="ij")
            ys, xs = ys.ravel(), xs.ravel()
            ok = allowed_windows(self.areas[i], xs, ys, cw, ch)
            ys, xs = ys[ok], xs[ok]
            gy, gx = ys // cell, xs // cell
            gy1, gx1 = np.minimum(gy + math.ceil(ch / cell), gh), np.minimum(gx + math.ceil(cw / cell), gw)
            win = integral[:, gy1, gx1] - integral[:, gy, gx1] - integral[:, gy1, gx] + integral[:, gy, gx]
            per_scene.append((i, xs, ys, win))
        if not any(len(xs) for _, xs, _, _ in per_scene):
            raise DataError(
                f"{self.spec.path}: no training window of {cw}x{ch} fits in any scene's train area clear of "
                f"val/test (buffer {self.buffer} px); lower data.crop_size or the val/test share, or enlarge the area"
            )
        inverse = np.divide(1.0, totals, out=np.zeros(k), where=totals > 0)
        scene_ids, cand_x, cand_y, weights = [], [], [], []
        for i, xs, ys, win in per_scene:
            weight = (win * inverse[:, None]).sum(0) if self.spec.class_balanced else win.sum(0)
            scene_ids.append(np.full(len(xs), i))
            cand_x.append(xs)
            cand_y.append(ys)
            weights.append(weight)
        weight = np.concatenate(weights)
        if not (weight > 0).any():
            raise DataError(
                f"{self.spec.path}: no allowed training window contains labelled pixels; check that the labels "
                "overlap the train area (`seglstm check-data` shows the labelled area per split)"
            )
        self.cell = cell
        self.candidates = np.stack([np.concatenate(scene_ids), np.concatenate(cand_x), np.concatenate(cand_y)], 1)
        self.cumulative = np.cumsum(weight / weight.sum())
        self.length = self.spec.samples_per_epoch

    def _plan_eval(self) -> None:
        ch, cw = self.crop
        items = []
        for i, (grid, areas) in enumerate(zip(self.grids, self.areas)):
            area = areas.area(self.split)
            if area is None or area.is_empty:
                continue
            for oy, sy0, sy1 in window_grid(grid.height, ch):
                for ox, sx0, sx1 in window_grid(grid.width, cw):
                    owned = shapely.box(sx0 + 0.5, sy0 + 0.5, sx1 - 0.5, sy1 - 0.5)
                    if shapely.intersects(area, owned):
                        th, tw = min(ch, grid.height), min(cw, grid.width)
                        items.append((i, ox, oy, tw, th, sx0, sy0, sx1, sy1))
        if not items:
            raise DataError(f"{self.spec.path}: the {self.split} split is empty: {self._empty_hint()}")
        self.items = items
        self.length = len(items)

    def _empty_hint(self) -> str:
        """Why each scene has no pixel in this split, and what to change."""
        hints = []
        for scene in self.spec.scenes:
            if scene.split is not None:
                continue
            if scene.areas:
                given = dict(scene.areas).get(self.split)
                hints.append(
                    f"scene {scene.name}: areas.{self.split} {given} has no polygon over the image"
                    if given
                    else f"scene {scene.name} gives no areas.{self.split}"
                )
            else:
                spec = self.spec.split
                hints.append(
                    f"scene {scene.name}: split.{self.split}={getattr(spec, self.split)} of its blocks of {spec.block} "
                    "px rounds to no block (lower split.block or raise the fraction)"
                )
        return "; ".join(hints) or f"no scene has split: {self.split}"

    # ------------------------------------------------------------------------------------------ items
    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return (
            f"SceneDataset(split={self.split!r}, scenes={len(self.grids)}, items={len(self)}, "
            f"crop={self.crop}, classes={self.num_classes})"
        )

    def window(self, epoch: int, index: int) -> tuple[int, int, int, int, int]:
        """``(scene, x0, y0, width, height)`` of item ``index`` in ``epoch``."""
        if self.split != "train":
            i, x0, y0, w, h, *_ = self.items[index]
            return i, x0, y0, w, h
        ch, cw = self.crop
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, index, _SAMPLER_STREAM]))
        j = int(np.searchsorted(self.cumulative, rng.random() * self.cumulative[-1], side="right"))
        i, x0, y0 = (int(v) for v in self.candidates[min(j, len(self.candidates) - 1)])
        dx, dy = (int(v) for v in rng.integers(0, self.cell, 2))
        grid = self.grids[i]
        x1, y1 = x0 + dx, y0 + dy
        if x1 + cw <= grid.width and y1 + ch <= grid.height and allowed_windows(
            self.areas[i], np.array([x1]), np.array([y1]), cw, ch
        )[0]:
            x0, y0 = x1, y1
        return i, x0, y0, cw, ch

    def item_path(self, index: int) -> str:
        return self.spec.scenes[self.window(self.epoch, index)[0]].image

    def load_item(self, epoch: int, index: int) -> Sample:
        i, x0, y0, w, h = self.window(epoch, index)
        sample = self.read_window(i, x0, y0, w, h)
        if self.split != "train":
            _, _, _, _, _, sx0, sy0, sx1, sy1 = self.items[index]
            keep = self.areas[i].mask(self.split, x0, y0, w, h)
            owned = np.zeros_like(keep)
            owned[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = True
            sample["mask"][torch.from_numpy(~(keep & owned))] = IGNORE
        return sample

    def load(self, index: int) -> Sample:
        return self.load_item(self.epoch, index)

    def read_window(self, i: int, x0: int, y0: int, width: int, height: int) -> Sample:
        """Image bands and labels of one window of scene ``i``; nodata / mask-0 pixels labelled 255."""
        src = self.image(i)
        raw, band_valid, valid = src.read(self.band_list, window=Window(x0, y0, width, height))
        image = np.where(band_valid & valid[None], raw, 0).astype(np.float32)
        labels = self.labels(i).window(x0, y0, width, height)
        labels[~valid] = IGNORE
        return {
            "image": torch.from_numpy(image),
            "mask": torch.from_numpy(labels.astype(np.int64)),
            "path": f"{self.spec.scenes[i].image}#{x0},{y0}",
            "ori_shape": (height, width),
            "window": (i, x0, y0, width, height),
        }

    # ------------------------------------------------------------------------------------------ files
    def _process_handles(self) -> dict[str, Any]:
        pid = os.getpid()
        if pid not in self._handles:  # a new process (a forked worker): never reuse the parent's handles
            self._handles = {pid: {"stack": contextlib.ExitStack(), "images": {}, "rasters": {}, "vectors": {}}}
        return self._handles[pid]

    def image(self, i: int) -> SceneInput:
        """Scene ``i``'s image, opened once in this process."""
        h = self._process_handles()
        if i not in h["images"]:
            scene = self.spec.scenes[i]
            try:
                h["images"][i] = h["stack"].enter_context(open_input(scene.image, InputOptions(assets=scene.assets)))
            except SceneError as err:
                raise scene_error(scene, err) from err
        return h["images"][i]

    def labels(self, i: int) -> VectorLabels | RasterLabels:
        """Scene ``i``'s labels in its image grid, loaded once in this process."""
        scene, grid = self.spec.scenes[i], self.grids[i]
        if scene.raster_labels:
            h = self._process_handles()
            if i not in h["rasters"]:
                raster = RasterLabels(scene.labels, grid, self.num_classes, scene.image)
                h["stack"].callback(raster.close)
                h["rasters"][i] = raster
            return h["rasters"][i]
        h = self._process_handles()
        if i not in h["vectors"]:
            one = None if scene.label_class is None else self.classes.index(scene.label_class)
            h["vectors"][i] = load_vector_labels(
                scene.labels, grid, scene.layer, scene.label_field, one, self.classes, self.spec.paint_order(),
                scene.image,
            )
        return h["vectors"][i]

    def close(self) -> None:
        """Close this process's files and drop its polygons (they are reloaded when next needed)."""
        for h in self._handles.values():
            h["stack"].close()
        self._handles = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
