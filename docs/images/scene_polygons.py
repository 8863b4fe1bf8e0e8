"""Draw docs/images/scene_polygons.png: class polygons from `predict-scene --vector` over a scene.

    PYTHONPATH=src python docs/images/scene_polygons.py

The scene is a synthetic LoveDA-like tile (seglstm.data.synthetic) written as a georeferenced GeoTIFF;
its class raster is the tile's own label map standing in for a prediction (no trained checkpoint is
shipped), polygonised by the same writer `--vector` uses, with --min-area 2 m^2 and --simplify 0.5 m.
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pyogrio.raw
import rasterio
import shapely
from matplotlib.patches import Patch
from PIL import Image

from seglstm.data.loveda import LoveDA
from seglstm.data.synthetic import render_scene
from seglstm.inference.scene import VectorSpec
from seglstm.inference.scene.vector import write_vector

OUT = Path(__file__).resolve().parent / "scene_polygons.png"
TRANSFORM = rasterio.Affine(0.3, 0.0, 500_000.0, 0.0, -0.3, 4_200_000.0)  # 0.3 m pixels, as LoveDA


def main() -> int:
    rgb, label, _ = render_scene(0, "train", 1, size=512)
    classes = np.where(label == 0, 255, label - 1).astype(np.uint8)  # LoveDA 0 = no-data
    names = list(LoveDA.classes)
    with tempfile.TemporaryDirectory() as work:
        raster = Path(work) / "classes.tif"
        with rasterio.open(raster, "w", driver="GTiff", height=512, width=512, count=1, dtype="uint8", nodata=255,
                           crs="EPSG:32633", transform=TRANSFORM) as dst:
            dst.write(classes, 1)
        vector = Path(work) / "classes.gpkg"
        count = write_vector(raster, VectorSpec(vector, min_area=2.0, simplify=0.5), names)
        _, _, geometry, fields = pyogrio.raw.read(vector)
    ids, geoms = fields[0], shapely.from_wkb(geometry)

    x0, y0 = TRANSFORM.c, TRANSFORM.f
    extent = (x0, x0 + 512 * TRANSFORM.a, y0 + 512 * TRANSFORM.e, y0)
    fig, ax = plt.subplots(figsize=(7.2, 7.2), dpi=110)
    ax.imshow(rgb, extent=extent)
    for cid, geom in zip(ids, geoms):
        colour = np.asarray(LoveDA.palette[int(cid)]) / 255.0
        for ring in [geom.exterior, *geom.interiors]:
            xy = np.asarray(ring.coords)
            ax.plot(xy[:, 0], xy[:, 1], color=colour, linewidth=1.1)
    ax.set_title(f"{count} class polygons (--vector, --min-area 2, --simplify 0.5) over the scene", fontsize=10)
    ax.set_xlabel("easting (m, EPSG:32633)")
    ax.set_ylabel("northing (m)")
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.legend(handles=[Patch(edgecolor=np.asarray(c) / 255, facecolor="none", label=n)
                       for n, c in zip(names, LoveDA.palette)], loc="lower right", fontsize=7, framealpha=0.8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(256).save(OUT, optimize=True)  # a quarter of the bytes
    print(f"wrote {OUT} ({count} polygons)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
