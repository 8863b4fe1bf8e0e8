"""Synthetic GeoTIFF scenes with GeoPackage polygon labels, for trying the ``scenes`` dataset without a
download: what a user brings (one image, polygons drawn in a GIS) in miniature.

Each scene is a procedural aerial image (:func:`seglstm.data.synthetic.render_scene`) georeferenced in UTM
zone 33N at 0.5 m; its label map is vectorised into polygons (one per connected region of a class) and
written in **EPSG:4326**, another CRS than the images, so the reprojection path is always exercised. The
last scene is held out whole (``split: test``): it is what the demo maps with ``predict-scene``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyogrio
import rasterio
import shapely
import yaml
from affine import Affine
from rasterio.features import shapes
from rasterio.warp import transform as warp_transform
from tqdm.auto import tqdm

from seglstm.data.loveda import LoveDA
from seglstm.data.synthetic import render_scene
from seglstm.utils.io import atomic_path, atomic_write_text

IMAGE_CRS = "EPSG:32633"
LABEL_CRS = "EPSG:4326"
GSD = 0.5
HELD_OUT = "heldout"


def _vectorise(mask: np.ndarray, transform: Affine) -> tuple[list, list[str]]:
    """Polygons (in ``LABEL_CRS``) of the connected regions of each class; LoveDA value 0 (no data) is left
    unlabelled."""
    geoms, names = [], []
    for geom, value in shapes(mask, mask=mask > 0, connectivity=4, transform=transform):
        geoms.append(shapely.geometry.shape(geom))
        names.append(LoveDA.classes[int(value) - 1])

    def to_label_crs(coords: np.ndarray) -> np.ndarray:
        return np.column_stack(warp_transform(IMAGE_CRS, LABEL_CRS, coords[:, 0], coords[:, 1]))

    return list(shapely.transform(np.asarray(geoms, dtype=object), to_label_crs)), names


def _write_image(path: Path, rgb: np.ndarray, transform: Affine) -> None:
    height, width, _ = rgb.shape
    profile = dict(driver="GTiff", height=height, width=width, count=3, dtype="uint8", crs=IMAGE_CRS,
                   transform=transform, tiled=True, blockxsize=256, blockysize=256, compress="deflate",
                   photometric="RGB")
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(rgb.transpose(2, 0, 1))


def _write_labels(path: Path, geoms: list, names: list[str]) -> None:
    from seglstm.utils.io import atomic_layer_path

    with atomic_layer_path(path) as work:
        pyogrio.raw.write(str(work), shapely.to_wkb(np.asarray(geoms, dtype=object)),
                          [np.asarray(names, dtype=object)], fields=["class"], crs=LABEL_CRS,
                          geometry_type="Polygon", driver="GPKG", layer=path.stem)


def write_synthetic_scenes(
    out: str | Path,
    n_scenes: int = 3,
    size: int = 512,
    seed: int = 0,
    block: int = 128,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``n_scenes`` training scenes (block splits for val/test) and one held-out scene, their labels,
    ``classes.yaml`` and ``scenes.yaml`` under ``out``; returns the path of ``scenes.yaml``."""
    out = Path(out)
    if n_scenes < 1 or size < 64:
        raise ValueError(f"need at least one scene of at least 64 px, got {n_scenes} of {size} px")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    names = [f"scene{i + 1}" for i in range(n_scenes)] + [HELD_OUT]
    for i, name in enumerate(tqdm(names, desc="synthetic scenes", disable=not progress)):
        rgb, mask, _ = render_scene(seed, "train" if name != HELD_OUT else "val", i, size)
        # scenes side by side in one UTM zone, 100 m apart
        transform = Affine(GSD, 0.0, 400_000.0 + i * (size * GSD + 100.0), 0.0, -GSD, 4_650_000.0)
        _write_image(out / f"{name}.tif", rgb, transform)
        geoms, classes = _vectorise(mask, transform)
        _write_labels(out / f"{name}.gpkg", geoms, classes)
        entry = {"name": name, "image": f"{name}.tif", "labels": f"{name}.gpkg", "label_field": "class"}
        if name == HELD_OUT:
            entry["split"] = "test"
        entries.append(entry)
    classes_doc = {"classes": list(LoveDA.classes), "palette": [list(c) for c in LoveDA.palette]}
    atomic_write_text(out / "classes.yaml", yaml.safe_dump(classes_doc, sort_keys=False))
    doc = {
        "classes": "classes.yaml",
        "split": {"val": 0.15, "test": 0.15, "block": block, "seed": seed},
        "sampling": {"samples_per_epoch": 1600, "class_balanced": False},
        "scenes": entries,
    }
    path = out / "scenes.yaml"
    atomic_write_text(path, "# synthetic scenes: written by `seglstm synth --scenes`\n" + yaml.safe_dump(doc, sort_keys=False))
    return path
