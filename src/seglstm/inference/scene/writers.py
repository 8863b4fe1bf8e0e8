"""Final raster products from the partial run's chunks: the class GeoTIFF (or COG), the probabilities and
the PNG preview, each written under a temporary name and renamed only when complete.

A Cloud-Optimized GeoTIFF cannot be written block by block (GDAL's COG driver only copies a finished
dataset), so a COG is first assembled as a tiled GeoTIFF inside the partial run and then copied by the COG
driver, which builds the overviews (mode for classes, average for probabilities) with GDAL's bounded cache.

Class names are the class raster's GDAL category names, so GIS legends show names rather than numbers.
A GeoTIFF has no place for them inside the file: GDAL keeps them in its PAM sidecar ``NAME.tif.aux.xml``
(``<CategoryNames>``), where GDAL (``gdalinfo``), QGIS and ArcGIS read them, so that sidecar is written
(atomically) beside the class raster; the names are also in the file's ``classes`` tag (JSON).
"""

from __future__ import annotations

import contextlib
import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from PIL import Image
from rasterio.windows import Window

from seglstm.inference.scene.outputs import PartialRun
from seglstm.inference.scene.plan import BLOCK, Strip, TileGrid
from seglstm.utils.io import atomic_path, atomic_write_text

NODATA = 255  # class value written where the input has no data


@dataclass(frozen=True)
class Georef:
    """Where the output lies: a CRS and transform, or ground control points (with their CRS)."""

    crs: object
    transform: Affine
    gcps: list = field(default_factory=list)
    gcp_crs: object = None

    def apply(self, dst) -> None:
        if self.gcps:
            dst.gcps = (self.gcps, self.gcp_crs)


@dataclass(frozen=True)
class Products:
    """Output paths (None: not asked for) and how the rasters are written."""

    classes: Path
    probs: Path | None = None
    preview: Path | None = None
    preview_size: int = 1024
    cog: bool = False


def _profile(grid: TileGrid, georef: Georef) -> dict:
    profile = {
        "driver": "GTiff",
        "height": grid.height,
        "width": grid.width,
        "dtype": "uint8",
        "tiled": True,
        "blockxsize": BLOCK,
        "blockysize": BLOCK,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }
    if not georef.gcps:
        profile.update(crs=georef.crs, transform=georef.transform)
    return profile


def _cog_copy(tiff: Path, final: Path, resampling: str) -> None:
    """GDAL's COG driver: tiles, internal overviews, the layout its readers expect (``LAYOUT=COG``)."""
    with atomic_path(final) as tmp:
        rasterio.shutil.copy(
            tiff, tmp, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=BLOCK, OVERVIEW_RESAMPLING=resampling,
            BIGTIFF="IF_SAFER",
        )


def write_category_names(raster: Path, classes: Sequence[str]) -> Path:
    """GDAL's PAM sidecar of ``raster`` naming its categories (value i: ``classes[i]``); returns its path."""
    root = ET.Element("PAMDataset")
    names = ET.SubElement(ET.SubElement(root, "PAMRasterBand", band="1"), "CategoryNames")
    for name in classes:
        ET.SubElement(names, "Category").text = name
    sidecar = raster.with_name(raster.name + ".aux.xml")
    atomic_write_text(sidecar, ET.tostring(root, encoding="unicode") + "\n")
    return sidecar


def write_rasters(
    partial: PartialRun,
    grid: TileGrid,
    strips: Sequence[Strip],
    products: Products,
    georef: Georef,
    classes: Sequence[str],
    palette: Sequence[Sequence[int]],
) -> None:
    """Write the GeoTIFF(s) from the chunks in one pass, block row by block row."""
    profile = _profile(grid, georef)
    step = max(1, math.ceil(max(grid.height, grid.width) / products.preview_size))
    preview = (
        np.zeros((-(-grid.height // step), -(-grid.width // step)), np.uint8) if products.preview else None
    )
    num_classes = len(classes)
    with contextlib.ExitStack() as stack:
        # the probabilities' nodata mask goes inside the file, not into a .msk sidecar
        stack.enter_context(rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True))

        def target(path: Path, name: str) -> Path:
            return partial.scratch(name) if products.cog else stack.enter_context(atomic_path(path))

        tmp_out = target(products.classes, "classes.tif")
        tmp_probs = target(products.probs, "probs.tif") if products.probs else None
        dst = stack.enter_context(rasterio.open(tmp_out, "w", count=1, nodata=NODATA, **profile))
        georef.apply(dst)
        dst.write_colormap(1, {i: (*c, 255) for i, c in enumerate(palette)} | {NODATA: (0, 0, 0, 0)})
        dst.set_band_description(1, "class index")
        dst.update_tags(classes=json.dumps(list(classes)), nodata_class=str(NODATA))
        pdst = None
        if tmp_probs is not None:
            # MINISBLACK: GDAL would take 3 or 4 byte bands for RGB(A), the 4th an alpha band (a mask)
            pdst = stack.enter_context(
                rasterio.open(tmp_probs, "w", count=num_classes, photometric="MINISBLACK", **profile)
            )
            georef.apply(pdst)
            for i, name in enumerate(classes):
                pdst.set_band_description(i + 1, f"P({name}) x 255")
        for band in range(-(-grid.height // BLOCK)):
            y0 = band * BLOCK
            for strip in strips:
                chunk, probs = partial.load_chunk(band, strip.index, pdst is not None)
                window = Window(strip.x0, y0, strip.x1 - strip.x0, chunk.shape[0])
                dst.write(chunk, 1, window=window)
                if pdst is not None:
                    pdst.write(probs, window=window)
                    pdst.write_mask(np.where(chunk == NODATA, 0, 255).astype(np.uint8), window=window)
                if preview is not None:
                    ry = np.arange(-(-y0 // step) * step, y0 + chunk.shape[0], step)
                    rx = np.arange(-(-strip.x0 // step) * step, strip.x1, step)
                    preview[np.ix_(ry // step, rx // step)] = chunk[np.ix_(ry - y0, rx - strip.x0)]
    write_category_names(products.classes, classes)
    if products.cog:
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
            _cog_copy(tmp_out, products.classes, "MODE")
            if tmp_probs is not None:
                _cog_copy(tmp_probs, products.probs, "AVERAGE")
    if products.preview is not None:
        lut = np.zeros((256, 4), np.uint8)
        lut[:num_classes, :3] = palette
        lut[:num_classes, 3] = 255
        with atomic_path(products.preview) as tmp:
            Image.fromarray(lut[preview], "RGBA").save(tmp, format="PNG")
