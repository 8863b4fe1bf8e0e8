"""``seglstm check-data`` for scenes: per scene, before any training, what would go wrong or be surprising.

Everything here reads decimated views (at most ``max_side`` pixels a side): the labels rasterised at that
scale (pixel-centre rule), the image through GDAL's overview-aware decimated read, the split areas
rasterised at the same scale. Areas are therefore estimates at that resolution; the counts of features,
invalid geometries and unknown values are exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from affine import Affine
from rasterio.features import rasterize

from seglstm.data.base import _display_image, colorize
from seglstm.data.io import DataError, write_png
from seglstm.data.scenes.dataset import scene_error, scene_grid
from seglstm.data.scenes.labels import IGNORE, Grid, RasterLabels, VectorLabels, class_ids, no_overlap_message, read_vector
from seglstm.data.scenes.spec import SPLITS, SceneSpec, ScenesFile
from seglstm.data.scenes.splits import scene_areas
from seglstm.inference.scene.errors import SceneError
from seglstm.inference.scene.source import InputOptions, open_input

SPLIT_COLOURS = {"val": (0, 255, 255), "test": (255, 0, 255)}


@dataclass
class SceneReport:
    """What :func:`check_scene` found for one scene."""

    name: str
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    class_pixels: dict[str, np.ndarray] = field(default_factory=dict)  # split -> per-class pixel estimate
    band_sum: np.ndarray | None = None
    band_sq: np.ndarray | None = None
    pixels: int = 0
    preview: Path | None = None


def _res(transform: Sequence) -> tuple[float, float]:
    t = Affine(*transform[:6])
    return math.hypot(t.a, t.d), math.hypot(t.b, t.e)


def _vector(scene: SceneSpec, grid: Grid, spec: ScenesFile, rep: SceneReport) -> VectorLabels | None:
    geoms, values, stats = read_vector(scene.labels, grid, scene.layer, scene.label_field)
    crs_note = "same CRS as the image" if stats.crs and _same_crs(stats.crs, grid.crs) else (
        f"{stats.crs}, reprojected to the image CRS" if stats.crs else "no CRS (taken as the image's)"
    )
    rep.lines.append(
        f"  labels {scene.labels}: vector, {crs_note}; {stats.in_file} feature(s) in the file, "
        f"{stats.features} over the image, {stats.invalid} invalid (repaired with make_valid), "
        f"{stats.outside} outside the image"
    )
    if stats.crs is None:
        rep.problems.append(f"{scene.labels}: no CRS; give the file one (e.g. ogr2ogr -a_srs) so it is not guessed")
    if not len(geoms):
        rep.problems.append(no_overlap_message(scene.labels, scene.image, grid, stats.crs, stats.file_bounds))
        return None
    if values is None:
        ids = np.full(len(geoms), spec.classes.index(scene.label_class))
    else:
        ids = class_ids(values, spec.classes, scene.labels, scene.label_field, strict=False)
        if (ids < 0).any():
            unknown = sorted({str(v) for v, k in zip(values, ids) if k < 0})
            rep.problems.append(
                f"{scene.labels}: {scene.label_field} values {unknown[:10]} ({int((ids < 0).sum())} features) are "
                f"not in the class file ({', '.join(spec.classes)}); fix the values or add the classes"
            )
    keep = ids >= 0
    return VectorLabels(geoms[keep], ids[keep], spec.paint_order(), stats)


def _same_crs(a: str, b: str) -> bool:
    from rasterio.crs import CRS

    return CRS.from_user_input(a) == CRS.from_user_input(b)


def _raster(scene: SceneSpec, grid: Grid, spec: ScenesFile, rep: SceneReport) -> RasterLabels:
    labels = RasterLabels(scene.labels, grid, len(spec.classes), scene.image)
    src = labels.src
    lr, ir = _res(tuple(src.transform)), _res(grid.transform)
    same = _same_crs(src.crs.to_string(), grid.crs)
    rep.lines.append(
        f"  labels {scene.labels}: raster {src.width}x{src.height}, {src.crs.to_string()}"
        f"{'' if same else ' (warped to the image CRS)'}, pixel {lr[0]:.4g} x {lr[1]:.4g}"
        + ("" if same and np.allclose(lr, ir) else f" against the image's {ir[0]:.4g} x {ir[1]:.4g} (nearest neighbour)")
    )
    return labels


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def check_scene(
    index: int, spec: ScenesFile, crop: tuple[int, int], bands: list[int], preview_dir: Path | None,
    max_side: int = 1024,
) -> SceneReport:
    """Check scene ``index`` of ``spec`` (``bands`` 1-based); problems are collected, not raised."""
    scene = spec.scenes[index]
    rep = SceneReport(scene.name)
    try:
        grid, count = scene_grid(scene)
    except DataError as err:
        rep.problems.append(str(err))
        return rep
    rx, ry = _res(grid.transform)
    rep.lines.append(f"scene {scene.name}: {scene.image} {grid.width}x{grid.height}, {count} band(s), {grid.crs}, "
                     f"pixel {rx:.4g} x {ry:.4g}")
    if max(bands) > count:
        rep.problems.append(f"{scene.image}: has {count} band(s) but band {max(bands)} (1-based) is asked for; set data.bands")
        return rep
    labels = None
    try:
        labels = _raster(scene, grid, spec, rep) if scene.raster_labels else _vector(scene, grid, spec, rep)
    except DataError as err:
        rep.problems.append(str(err))
    f = max(1, math.ceil(max(grid.height, grid.width) / max_side))
    h, w = math.ceil(grid.height / f), math.ceil(grid.width / f)
    try:
        with open_input(scene.image, InputOptions(assets=scene.assets)) as src:
            raw, band_valid, valid = src.read(bands, out_shape=(h, w))
    except SceneError as err:
        rep.problems.append(str(scene_error(scene, err)))
        return rep
    lab = np.full((h, w), IGNORE, np.uint8)
    if labels is not None:
        try:
            lab = labels.coarse(h, w) if isinstance(labels, RasterLabels) else labels.window(0, 0, w, h, scale=f)
        except DataError as err:
            rep.problems.append(str(err))
        if isinstance(labels, RasterLabels):
            labels.close()
    lab[~valid] = IGNORE
    labelled = float((lab != IGNORE).mean())
    rep.lines.append(f"  overlap: labels cover {100 * labelled:.1f}% of the image's valid pixels"
                     + (f" ({100 * (1 - valid.mean()):.1f}% of the image is nodata)" if not valid.all() else ""))
    if labels is not None and labelled == 0 and not rep.problems:
        rep.problems.append(f"{scene.labels}: no labelled pixel on valid image pixels of {scene.image}")
    try:
        areas = scene_areas(scene, grid, spec.split, index, max(crop))
    except DataError as err:
        rep.problems.append(str(err))
        areas = None
    masks = {}
    if areas is not None:
        rep.lines.append(f"  split: {areas.how}; training windows keep {max(crop)} px from val/test")

        def raster(geom: shapely.Geometry) -> np.ndarray:
            if geom is None or geom.is_empty:
                return np.zeros((h, w), bool)
            return rasterize([(geom, 1)], out_shape=(h, w), transform=Affine.scale(f), fill=0, dtype=np.uint8) > 0

        masks["val"], masks["test"] = raster(areas.val), raster(areas.test)
        train = ~raster(areas.forbidden) & ~masks["val"] & ~masks["test"]
        if areas.train is not None:
            train &= raster(areas.train)
        masks["train"] = train
    for split in SPLITS:
        if split in masks:
            rep.class_pixels[split] = np.bincount(lab[masks[split]], minlength=256)[: len(spec.classes)] * f * f
    ok = band_valid & valid[None]
    values = raw.astype(np.float64)
    rep.band_sum = np.array([v[m].sum() for v, m in zip(values, ok)])
    rep.band_sq = np.array([(v[m] ** 2).sum() for v, m in zip(values, ok)])
    rep.pixels = int(valid.sum())
    if preview_dir is not None:
        import torch

        image = (_display_image(torch.from_numpy(values)) * 255).astype(np.uint8)
        colours = colorize(lab, spec.palette)
        out = np.where((lab != IGNORE)[..., None], (0.5 * image + 0.5 * colours).astype(np.uint8), image)
        for split, colour in SPLIT_COLOURS.items():
            if split in masks:
                out[_outline(masks[split])] = colour
        rep.preview = preview_dir / f"{scene.name}.png"
        write_png(rep.preview, out)
        rep.lines.append(f"  preview: {rep.preview} (labels over the image; val outlined cyan, test magenta)")
    return rep


def scenes_table(spec: ScenesFile, reports: list[SceneReport]) -> str:
    """Labelled area per class and split over all scenes, and the per-band statistics."""
    lines = [line for r in reports for line in r.lines]
    width = max(len(c) for c in (*spec.classes, "class"))
    totals = {s: sum((r.class_pixels[s] for r in reports if s in r.class_pixels), np.zeros(len(spec.classes)))
              for s in SPLITS}
    lines.append("")
    lines.append("labelled pixels per class and split (all scenes, at the check's decimation; train: where training "
                 "windows may go, outside val/test and their buffer):")
    lines.append(f"  {'class':<{width}}  " + "  ".join(f"{s:>12}" for s in SPLITS) + f"  {'share':>7}")
    grand = sum(t.sum() for t in totals.values())
    for k, name in enumerate(spec.classes):
        share = 100 * sum(t[k] for t in totals.values()) / grand if grand else 0.0
        lines.append(f"  {name:<{width}}  " + "  ".join(f"{int(totals[s][k]):>12,d}" for s in SPLITS) + f"  {share:>6.2f}%")
    for s in SPLITS:
        absent = [c for c, v in zip(spec.classes, totals[s]) if v == 0]
        if absent and totals[s].sum():
            lines.append(f"  note: never labelled in {s}: {', '.join(absent)}")
    stats = scenes_band_statistics(reports)
    if stats is not None:
        lines.append(f"  band mean: {stats['mean']}  std: {stats['std']}")
    return "\n".join(lines)


def scenes_band_statistics(reports: list[SceneReport]) -> dict[str, list[float]] | None:
    """Per-band mean / std over every scene's valid pixels (decimated), rounded for a config."""
    pixels = sum(r.pixels for r in reports)
    sums = [r.band_sum for r in reports if r.band_sum is not None]
    if not pixels or not sums:
        return None
    mean = sum(sums) / pixels
    std = np.sqrt(np.maximum(sum(r.band_sq for r in reports if r.band_sq is not None) / pixels - mean**2, 0))
    return {"mean": [round(float(m), 3) for m in mean], "std": [round(max(float(v), 1e-3), 3) for v in std]}
