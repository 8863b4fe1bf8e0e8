"""Labels of one scene in its image's pixel grid, window by window.

Vector labels are read once per process with a bounding-box filter (only features over the image), moved
into the image's pixel coordinates (reprojected by GDAL, then the inverse geotransform), repaired with
``make_valid`` and put in an STRtree; a window rasterises only the polygons its box meets. The rule is
GDAL's default: a pixel takes a polygon's class when the pixel's **centre** lies inside it
(``all_touched=False``), so a polygon edge on a pixel border never claims both pixels. Overlapping
polygons of different classes resolve by class priority (:meth:`ScenesFile.paint_order`), never by file
order: polygons are burnt lowest priority first. Raster labels are warped by nearest neighbour into the
image grid (a ``WarpedVRT``), read by the same windows; values 0..K-1 are class ids, the label raster's
nodata, 255 and pixels outside it are unlabelled. Unlabelled pixels are 255 (ignored).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.features import rasterize
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform as warp_transform
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from seglstm.data.io import DataError
from seglstm.inference.scene.source import is_remote

IGNORE = 255


@dataclass(frozen=True)
class Grid:
    """An image's pixel grid: what labels are brought into."""

    height: int
    width: int
    crs: str
    transform: tuple[float, ...]

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform[:6])

    def bounds(self) -> tuple[float, float, float, float]:
        corners = [self.affine @ (x, y) for x in (0, self.width) for y in (0, self.height)]
        xs, ys = zip(*corners)
        return min(xs), min(ys), max(xs), max(ys)


def _check_file(path: str, what: str) -> None:
    if not is_remote(path) and not os.path.exists(path):
        raise DataError(f"{path}: {what} does not exist (check the path in the scenes file)")


def to_pixels(geoms: np.ndarray, src_crs: str | None, grid: Grid) -> np.ndarray:
    """Geometries in ``src_crs`` -> the grid's pixel coordinates (column, row): GDAL reprojects the
    vertices, then the inverse geotransform maps them to pixels."""
    inverse = ~grid.affine
    same = src_crs is None or rasterio.crs.CRS.from_user_input(src_crs) == rasterio.crs.CRS.from_user_input(grid.crs)

    def move(coords: np.ndarray) -> np.ndarray:
        xs, ys = coords[:, 0], coords[:, 1]
        if not same and len(xs):
            xs, ys = (np.asarray(v) for v in warp_transform(src_crs, grid.crs, xs, ys))
        cols = inverse.a * xs + inverse.b * ys + inverse.c
        rows = inverse.d * xs + inverse.e * ys + inverse.f
        return np.column_stack([cols, rows])

    return shapely.transform(geoms, move)


def polygonal(geoms: np.ndarray) -> np.ndarray:
    """Only the polygon parts (``make_valid`` can return collections with lines or points)."""
    out = []
    for g in geoms:
        if g is None or g.is_empty:
            out.append(shapely.Polygon())
        elif g.geom_type in ("Polygon", "MultiPolygon"):
            out.append(g)
        else:
            parts = [p for p in shapely.get_parts(g) if p.geom_type in ("Polygon", "MultiPolygon")]
            out.append(shapely.union_all(parts) if parts else shapely.Polygon())
    return np.asarray(out, dtype=object)


@dataclass
class VectorStats:
    """What loading found, for ``check-data``."""

    features: int = 0
    in_file: int = 0
    invalid: int = 0
    outside: int = 0
    unknown: dict | None = None
    crs: str | None = None
    file_bounds: tuple[float, float, float, float] | None = None


def read_vector(
    path: str, grid: Grid, layer: str | None = None, field: str | None = None
) -> tuple[np.ndarray, np.ndarray | None, VectorStats]:
    """Features of ``path`` over the grid (bounding-box filtered read) as pixel-space polygons, and the
    values of ``field``; invalid geometries repaired and counted."""
    import pyogrio

    _check_file(path, "label file")
    try:
        info = pyogrio.read_info(path, layer=layer, force_total_bounds=True)
    except Exception as err:  # pyogrio raises DataSourceError, DataLayerError, ...
        raise DataError(f"{path}: not a readable vector file ({type(err).__name__}: {err})") from err
    stats = VectorStats(in_file=int(info.get("features") or 0), crs=info.get("crs"))
    if info.get("total_bounds") is not None:
        stats.file_bounds = tuple(float(v) for v in info["total_bounds"])
    fields = list(info.get("fields", []))
    if field is not None and field not in fields:
        raise DataError(
            f"{path}: label_field {field!r} is not an attribute of this file; it has {fields} "
            "(set label_field to one of them, or label_class for one class)"
        )
    crs = stats.crs or grid.crs
    bbox = transform_bounds(grid.crs, crs, *grid.bounds(), densify_pts=21) if stats.crs else grid.bounds()
    try:
        _, _, wkb, values = pyogrio.raw.read(
            path, layer=layer, columns=[] if field is None else [field], bbox=tuple(bbox)
        )
    except Exception as err:
        raise DataError(f"{path}: reading the features failed ({type(err).__name__}: {err})") from err
    geoms = shapely.from_wkb(wkb)
    valid = shapely.is_valid(geoms)
    stats.invalid = int((~valid & ~shapely.is_missing(geoms)).sum())
    geoms = to_pixels(geoms, stats.crs, grid)
    geoms = polygonal(shapely.make_valid(geoms))
    inside = shapely.intersects(geoms, shapely.box(0, 0, grid.width, grid.height))
    stats.features = int(inside.sum())
    stats.outside = stats.in_file - stats.features  # outside the image's box, or only within its envelope
    column = None if field is None else np.asarray(values[0])
    return geoms[inside], None if column is None else column[inside], stats


def class_ids(values: np.ndarray, classes: Sequence[str], path: str, field: str, strict: bool = True) -> np.ndarray:
    """Attribute values (class names, or ids 0..K-1) -> class ids; unknown values raise, listing them (or,
    with ``strict=False``, map to -1)."""
    names = {c: i for i, c in enumerate(classes)}
    out = np.empty(len(values), np.int64)
    bad: list = []
    for i, v in enumerate(values):
        key = v.item() if hasattr(v, "item") else v
        if isinstance(key, str) and key in names:
            out[i] = names[key]
        elif isinstance(key, (int, float)) and not isinstance(key, bool) and float(key).is_integer() and 0 <= key < len(classes):
            out[i] = int(key)
        elif isinstance(key, str) and key.strip().lstrip("-").isdigit() and 0 <= int(key) < len(classes):
            out[i] = int(key)
        else:
            bad.append(key)
            out[i] = -1
    if bad and strict:
        shown = sorted({str(b) for b in bad})
        raise DataError(
            f"{path}: {field} values {shown[:10]} ({len(bad)} features) are not in the class file "
            f"({', '.join(classes)} or ids 0..{len(classes) - 1}); fix the values or add the classes"
        )
    return out


def no_overlap_message(
    labels: str, image: str, grid: Grid, crs: str | None, bounds: tuple[float, float, float, float] | None
) -> str:
    """Both extents in the image's CRS, and what usually causes it."""
    def fmt(b: Sequence[float]) -> str:
        return "(" + ", ".join(f"{v:.6g}" for v in b) + ")"

    if bounds is None:
        theirs = "empty"
    else:
        try:
            theirs = fmt(transform_bounds(crs, grid.crs, *bounds, densify_pts=21)) if crs else fmt(bounds) + " (no CRS)"
        except Exception:  # bounds that cannot be projected to the image CRS at all
            theirs = f"{fmt(bounds)} in {crs} (not representable in the image CRS)"
    return (
        f"{labels}: no label overlaps the image {image}; in the image CRS {grid.crs} the labels span {theirs}, "
        f"the image {fmt(grid.bounds())}: check the labels' CRS (a missing or wrong .prj is the usual cause) "
        "and that they belong to this image"
    )


def geojson_polygons(geoms: np.ndarray, values: np.ndarray) -> list[tuple[dict, int]]:
    """``(GeoJSON polygon, value)`` pairs for rasterio, in the order of ``geoms`` (multi-polygons split into
    their parts). Coordinates come out of GEOS as arrays: several times faster than rasterio asking each
    shapely geometry for its ``__geo_interface__``, which walks the coordinates in Python."""
    parts, owner = shapely.get_parts(geoms, return_index=True)
    rings, ring_owner = shapely.get_rings(parts, return_index=True)  # per polygon: exterior, then holes
    coords, coord_owner = shapely.get_coordinates(rings, return_index=True)
    enabled = gc.isenabled()
    gc.disable()  # thousands of small lists, no cycles: collections here would only rescan the heap
    try:
        flat = coords.tolist()  # one conversion, then slices of the list
    finally:
        if enabled:
            gc.enable()
    ends = np.searchsorted(coord_owner, np.arange(1, len(rings) + 1)).tolist()
    polygons: list[list] = [[] for _ in range(len(parts))]
    start = 0
    for p, end in zip(ring_owner.tolist(), ends):
        polygons[p].append(flat[start:end])
        start = end
    return [({"type": "Polygon", "coordinates": r}, v) for r, v in zip(polygons, values[owner].tolist())]


class VectorLabels:
    """Pixel-space polygons of one label file over one image, sorted by paint order, in an STRtree."""

    def __init__(self, geoms: np.ndarray, ids: np.ndarray, paint_order: Sequence[int], stats: VectorStats) -> None:
        rank = np.empty(max(paint_order) + 1, np.int64)
        rank[list(paint_order)] = np.arange(len(paint_order))
        order = np.argsort(rank[ids], kind="stable")
        self.geoms, self.ids, self.stats = geoms[order], ids[order].astype(np.uint8), stats
        self.tree = shapely.STRtree(self.geoms)

    def window(self, x0: int, y0: int, width: int, height: int, scale: int = 1) -> np.ndarray:
        """Class ids (255 = none) of the pixels ``[y0, y0 + height) x [x0, x0 + width)`` at ``scale``
        image pixels per output pixel (1 for training; more for the coarse sampling grid)."""
        x1, y1 = x0 + width * scale, y0 + height * scale
        hits = np.sort(self.tree.query(shapely.box(x0, y0, x1, y1), predicate="intersects"))  # sorted = paint order
        # only the part of each polygon around the window: rasterio walks every vertex in Python (GeoJSON),
        # and a large polygon (a field, a road network) has many more vertices than the window needs
        parts = shapely.clip_by_rect(self.geoms[hits], x0 - 1, y0 - 1, x1 + 1, y1 + 1)
        keep = ~shapely.is_empty(parts)
        if not keep.any():
            return np.full((height, width), IGNORE, np.uint8)
        return rasterize(
            geojson_polygons(parts[keep], self.ids[hits][keep]),
            out_shape=(height, width),
            transform=Affine(scale, 0, x0, 0, scale, y0),
            fill=IGNORE,
            all_touched=False,
            dtype=np.uint8,
        )


def load_vector_labels(
    path: str, grid: Grid, layer: str | None, field: str | None, one_class: int | None,
    classes: Sequence[str], paint_order: Sequence[int], image: str,
) -> VectorLabels:
    """The label file's polygons over ``grid``, ready for window reads (one bounding-box filtered read)."""
    geoms, values, stats = read_vector(path, grid, layer, field)
    if not len(geoms):
        raise DataError(no_overlap_message(path, image, grid, stats.crs, stats.file_bounds))
    ids = np.full(len(geoms), one_class, np.int64) if values is None else class_ids(values, classes, path, field)
    return VectorLabels(geoms, ids, paint_order, stats)


class RasterLabels:
    """A label raster warped (nearest neighbour) into the image grid, read by window."""

    def __init__(self, path: str, grid: Grid, num_classes: int, image: str = "") -> None:
        _check_file(path, "label raster")
        self.path, self.num_classes = path, num_classes
        try:
            self.src = rasterio.open(path)
        except RasterioError as err:
            raise DataError(f"{path}: not a readable label raster ({err})") from err
        if self.src.crs is None:
            raise DataError(f"{path}: the label raster has no CRS; georeference it (e.g. gdal_edit.py -a_srs)")
        theirs = transform_bounds(self.src.crs, grid.crs, *self.src.bounds, densify_pts=21)
        ours = grid.bounds()
        if theirs[0] >= ours[2] or theirs[2] <= ours[0] or theirs[1] >= ours[3] or theirs[3] <= ours[1]:
            self.src.close()
            raise DataError(no_overlap_message(path, image, grid, self.src.crs.to_string(), tuple(self.src.bounds)))
        if self.src.count != 1:
            raise DataError(f"{path}: a label raster needs one band of class ids, it has {self.src.count}")
        nodata = self.src.nodata
        self.vrt = WarpedVRT(
            self.src, crs=grid.crs, transform=grid.affine, width=grid.width, height=grid.height,
            resampling=Resampling.nearest, src_nodata=nodata, nodata=IGNORE,
        )

    def window(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """Class ids (255 = none) of the pixels ``[y0, y0 + height) x [x0, x0 + width)``."""
        return self._read(Window(x0, y0, width, height))

    def coarse(self, height: int, width: int) -> np.ndarray:
        """The whole scene decimated (nearest) to ``height x width``: the sampler's labelled-area grid."""
        return self._read(Window(0, 0, self.vrt.width, self.vrt.height), (height, width))

    def _read(self, window: Window, out_shape: tuple[int, int] | None = None) -> np.ndarray:
        kw = {} if out_shape is None else {"out_shape": out_shape, "resampling": Resampling.nearest}
        try:
            data = self.vrt.read(1, window=window, **kw)
            mask = self.vrt.read_masks(1, window=window, **kw)
        except RasterioError as err:
            raise DataError(f"{self.path}: reading window {window} failed: {err}") from err
        out = np.full(data.shape, IGNORE, np.uint8)
        ok = mask > 0
        bad = ok & ((data < 0) | (data >= self.num_classes)) & (data != IGNORE)
        if bad.any():
            values = sorted({int(v) for v in np.unique(data[bad])})
            raise DataError(
                f"{self.path}: label values {values[:10]} are not class ids 0..{self.num_classes - 1} "
                "(nor 255 / the raster's nodata = unlabelled); fix the raster or the class file"
            )
        keep = ok & (data != IGNORE)
        out[keep] = data[keep].astype(np.uint8)
        return out

    def close(self) -> None:
        self.vrt.close()
        self.src.close()
