"""Builders for the ``scenes`` dataset tests: GeoTIFF scenes in a UTM zone, polygon labels written in
EPSG:4326 from pixel-space shapes, label rasters in other grids, and the ``scenes.yaml`` around them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import rasterio
import shapely
import yaml
from affine import Affine
from rasterio.warp import transform as warp_transform

CRS = "EPSG:32633"
TRANSFORM = Affine(2.0, 0.0, 500_000.0, 0.0, -2.0, 4_200_000.0)
CLASSES = ["building", "road", "water"]


def write_image(path: Path, data: np.ndarray, *, transform: Affine = TRANSFORM, crs: str = CRS,
                mask: np.ndarray | None = None, nodata: float | None = None) -> Path:
    count, height, width = data.shape
    profile = dict(driver="GTiff", height=height, width=width, count=count, dtype=data.dtype.name, crs=crs,
                   transform=transform, tiled=True, blockxsize=64, blockysize=64, nodata=nodata,
                   photometric="MINISBLACK")
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if mask is not None:
            dst.write_mask(np.where(mask, 255, 0).astype(np.uint8))
    return path


def pixels_to_crs(geoms: Any, crs: str = "EPSG:4326", transform: Affine = TRANSFORM, src_crs: str = CRS) -> Any:
    """Pixel-space shapes (x = column, y = row) -> coordinates in ``crs``."""
    def move(c: np.ndarray) -> np.ndarray:
        x = transform.a * c[:, 0] + transform.b * c[:, 1] + transform.c
        y = transform.d * c[:, 0] + transform.e * c[:, 1] + transform.f
        if crs != src_crs:
            x, y = warp_transform(src_crs, crs, x, y)
        return np.column_stack([x, y])

    return shapely.transform(geoms, move)


def write_vector(path: Path, geoms: list, values: list | None = None, field: str = "class",
                 crs: str = "EPSG:4326", driver: str = "GPKG") -> Path:
    """Write geometries (already in ``crs``) with one attribute column."""
    fields = None if values is None else [field]
    data = None if values is None else [np.asarray(values, dtype=object)]
    pyogrio.raw.write(str(path), shapely.to_wkb(np.asarray(geoms, dtype=object)), data, fields=fields, crs=crs,
                      geometry_type="Unknown", driver=driver)
    return path


def random_polygons(rng: np.random.Generator, width: int, height: int, n: int, radius: tuple[float, float] = (4, 20),
                    region: tuple[float, float, float, float] | None = None) -> list:
    """``n`` random blobs and boxes in pixel space inside ``region`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = region or (0, 0, width, height)
    out = []
    for k in range(n):
        cx, cy, r = rng.uniform(x0, x1), rng.uniform(y0, y1), rng.uniform(*radius)
        if k % 2:
            out.append(shapely.Point(cx, cy).buffer(r, quad_segs=3))
        else:
            out.append(shapely.box(cx - r, cy - r * 0.6, cx + r, cy + r * 0.6))
    return out


def write_scenes_yaml(folder: Path, scenes: list[dict], classes: list[str] | None = None, **top: Any) -> Path:
    doc = {"classes": {"classes": classes or CLASSES}, **top, "scenes": scenes}
    path = folder / "scenes.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def make_scene(folder: Path, rng: np.random.Generator, *, name: str = "scene", height: int = 256, width: int = 320,
               n_polygons: int = 60, region: tuple[float, float, float, float] | None = None,
               mask: np.ndarray | None = None) -> tuple[Path, Path, list, list]:
    """A random 3-band uint8 scene and random labels (class names) in EPSG:4326; returns the paths and the
    pixel-space polygons with their class names."""
    image = write_image(folder / f"{name}.tif", rng.integers(0, 256, (3, height, width), dtype=np.uint8), mask=mask)
    polys = random_polygons(rng, width, height, n_polygons, region=region)
    names = [CLASSES[int(k)] for k in rng.integers(0, len(CLASSES), len(polys))]
    labels = write_vector(folder / f"{name}.gpkg", [pixels_to_crs(p) for p in polys], names)
    return image, labels, polys, names
