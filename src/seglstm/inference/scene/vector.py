"""Class polygons from the class raster, strip by strip, merged across strip borders without seams.

The class raster is polygonised (``rasterio.features.shapes``, 4-connected, in pixel coordinates so that
every vertex is an integer and unions are exact) in horizontal strips of block rows. A polygon that does
not reach the strip's lower border is finished and written at once; one that does waits for the next
strip, where it is merged (shapely union) with the polygons of the same class sharing an edge with it.
Memory thus holds one strip of the raster and the polygons touching one border, never the whole layer.

``--min-area`` is a minimum mapping unit: before a strip is polygonised, regions of fewer than
``ceil(min_area / pixel area)`` pixels are merged into their largest neighbour by GDAL's sieve
(``rasterio.features.sieve``, 4-connected like the polygons, nodata excluded), run on the strip plus a
halo of as many rows as the unit has pixels (a region below the unit cannot reach further), so no holes
appear. Only a region below the unit with no valid neighbour (an island in nodata) is dropped.

Finished polygons then optionally go through GEOS's coverage simplification (``shapely.coverage_simplify``)
batch by batch: edges inside a batch are simplified once for both neighbours, and edges shared with
polygons of other batches are kept as they are (``simplify_boundary=False``), so the layer stays a
gap-free, overlap-free coverage. A polygon that simplification would take below ``--min-area`` keeps its
pixel outline (its neighbours keep the edges they share with it), so no polygon ends below the unit.

GeoJSON is written per RFC 7946 (GDAL's ``RFC7946=YES``): WGS84 longitude/latitude, no ``crs`` member,
right-hand winding (exterior rings counter-clockwise).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import shapely
from rasterio.features import shapes, sieve
from rasterio.warp import transform as transform_coords
from rasterio.windows import Window
from tqdm.auto import tqdm

from seglstm.inference.scene.errors import SceneError
from seglstm.inference.scene.plan import BLOCK
from seglstm.utils.io import atomic_layer_path

NODATA = 255
DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON", ".parquet": "Parquet"}
STRIP_BYTES = 64 * 2**20  # class raster rows held at once (uint8)


@dataclass(frozen=True)
class VectorSpec:
    """Where and how to write the polygon layer.

    Args:
        path: ``.gpkg``, ``.geojson`` or ``.parquet`` (when GDAL has the Parquet driver).
        min_area: minimum mapping unit in squared map units: smaller regions are merged into their
            largest neighbour (0 keeps every region).
        simplify: coverage-simplification tolerance in map units (0: exact pixel outlines).
        strip_rows: rows polygonised at once (a multiple of 256; default from a 64 MiB budget).
        batch_vertices: finished polygons are gathered up to about this many vertices before they are
            simplified and written; edges between batches keep their pixel outline, so larger batches
            simplify more of the layer (2M vertices: about 100 MiB of geometry).
    """

    path: Path
    min_area: float = 0.0
    simplify: float = 0.0
    strip_rows: int | None = None
    batch_vertices: int = 2_000_000

    @property
    def driver(self) -> str:
        return DRIVERS[self.path.suffix.lower()]

    def check(self) -> None:
        import pyogrio

        suffix = self.path.suffix.lower()
        if suffix not in DRIVERS:
            raise SceneError(f"--vector {self.path}: unknown format {suffix!r}; use .gpkg, .geojson or .parquet")
        if self.driver not in pyogrio.list_drivers(write=True):
            raise SceneError(
                f"--vector {self.path}: this GDAL ({pyogrio.__gdal_version_string__}) cannot write "
                f"{self.driver}; use .gpkg or .geojson"
            )
        if self.min_area < 0 or self.simplify < 0:
            raise SceneError("--min-area and --simplify must not be negative")
        if self.strip_rows is not None and (self.strip_rows <= 0 or self.strip_rows % BLOCK):
            raise SceneError(f"vector strip rows must be a positive multiple of {BLOCK}, got {self.strip_rows}")


def min_pixels(min_area: float, pixel_area: float) -> int:
    """The minimum mapping unit in pixels: the fewest whole pixels whose area reaches ``min_area``."""
    return max(1, math.ceil(min_area / pixel_area - 1e-9)) if min_area > 0 else 1


def polygonize_strips(
    src: rasterio.io.DatasetReader, strip_rows: int, progress: bool = False, unit: int = 1
) -> Iterator[list[tuple[int, shapely.Polygon]]]:
    """Yield batches of finished ``(class, polygon)`` in pixel coordinates, each polygon whole (merged
    across strip borders); regions below ``unit`` pixels are first sieved into their neighbours."""
    height = src.height
    # a region of fewer than `unit` pixels spans fewer rows, so with this halo every small region touching
    # the strip is seen whole; the halo is capped at a 64 MiB read (beyond it, exact for regions that tall)
    halo = 0 if unit <= 1 else min(unit, max(BLOCK, STRIP_BYTES // max(src.width, 1)))
    pending: list[tuple[int, shapely.Polygon]] = []  # polygons reaching the previous strip's lower border
    bar = tqdm(total=height, unit="row", desc="polygons", disable=not progress)
    with bar:
        for y0 in range(0, height, strip_rows):
            y1 = min(y0 + strip_rows, height)
            top, bottom = max(0, y0 - halo), min(height, y1 + halo)
            data = src.read(1, window=Window(0, top, src.width, bottom - top))
            if unit > 1:
                data = sieve(data, unit, mask=data != NODATA, connectivity=4)
            data = data[y0 - top : y1 - top]
            current = [
                (int(v), shapely.geometry.shape(g))
                for g, v in shapes(data, mask=data != NODATA, connectivity=4,
                                   transform=rasterio.Affine.translation(0, y0))
            ]
            finished, carried = _merge(pending, current, y0)
            pending = []
            for cls, poly in carried:
                (pending if y1 < height and poly.bounds[3] == y1 else finished).append((cls, poly))
            bar.update(y1 - y0)
            yield finished


def _merge(
    pending: list[tuple[int, shapely.Polygon]], current: list[tuple[int, shapely.Polygon]], y0: int
) -> tuple[list[tuple[int, shapely.Polygon]], list[tuple[int, shapely.Polygon]]]:
    """Union the pending polygons with the current strip's polygons of the same class that share an edge
    with them at row ``y0``. Returns (pending polygons that nothing continues: finished, current polygons
    after merging)."""
    if not pending:
        return [], current
    top = [i for i, (_, p) in enumerate(current) if p.bounds[1] == y0]
    parent = list(range(len(pending) + len(current)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    tree = shapely.STRtree([p for _, p in pending])
    linked = set()
    for i in top:
        cls, poly = current[i]
        for j in tree.query(poly):
            other_cls, other = pending[int(j)]
            if other_cls == cls and poly.intersection(other).length > 0:  # a shared edge, not a corner
                parent[find(int(j))] = find(len(pending) + i)
                linked.add(int(j))
    finished = [pending[j] for j in range(len(pending)) if j not in linked]
    groups: dict[int, list[int]] = {}
    for k in list(linked) + list(range(len(pending), len(parent))):
        groups.setdefault(find(k), []).append(k)
    merged = []
    everything = pending + current
    for members in groups.values():
        cls = everything[members[0]][0]
        geoms = [everything[k][1] for k in members]
        merged.append((cls, geoms[0] if len(geoms) == 1 else shapely.union_all(geoms)))
    return finished, merged


def _to_map(batch: list[tuple[int, shapely.Polygon]], transform, spec: VectorSpec, pixel_area: float,
            wgs84_from=None):
    classes = np.array([c for c, _ in batch], np.int64)
    geoms = np.array([p for _, p in batch], dtype=object)
    # after the sieve only islands in nodata can be below the unit: nothing to merge them into
    keep = shapely.area(geoms) * pixel_area >= spec.min_area if spec.min_area > 0 else np.ones(len(geoms), bool)
    classes, geoms = classes[keep], geoms[keep]
    if not len(geoms):
        return classes, geoms
    if spec.simplify > 0:
        # a vertex at every pixel corner: neighbours (here or in other batches) then share their vertices
        # along every edge, as coverage simplification needs; edges it keeps retain them
        geoms = shapely.segmentize(geoms, 1.0)
    a, b, c, d, e, f = transform[:6]
    geoms = shapely.transform(geoms, lambda xy: xy @ np.array([[a, d], [b, e]]) + np.array([c, f]))
    if spec.simplify > 0:
        geoms = _simplify_above(geoms, spec.simplify, spec.min_area)
    if wgs84_from is not None:
        geoms = _to_wgs84(geoms, wgs84_from)
    return classes, geoms


def _to_wgs84(geoms: np.ndarray, crs) -> np.ndarray:
    """RFC 7946 geometries: lon/lat rounded to 7 decimals (about 1 cm, GDAL's RFC 7946 precision; done
    here so every batch of a layer rounds alike and shared edges stay shared), right-hand winding."""

    def project(xy: np.ndarray) -> np.ndarray:
        lon, lat = transform_coords(crs, "EPSG:4326", xy[:, 0], xy[:, 1])
        return np.round(np.column_stack([lon, lat]), 7)

    return np.asarray(shapely.orient_polygons(shapely.transform(geoms, project)), dtype=object)


def _simplify_above(geoms: np.ndarray, tolerance: float, min_area: float) -> np.ndarray:
    """Coverage simplification in which polygons that it would take below ``min_area`` keep their outline:
    they are left out and simplification reruns on the rest, whose edges with them are then its boundary
    (``simplify_boundary=False``), so the result is still a coverage."""
    fixed = np.zeros(len(geoms), bool)
    while True:
        out = geoms.copy()
        if (~fixed).any():
            out[~fixed] = shapely.coverage_simplify(geoms[~fixed], tolerance, simplify_boundary=False)
        shrunk = ~fixed & (shapely.area(out) < min_area)
        if not shrunk.any():
            return out
        fixed |= shrunk


def _batches(strips: Iterator[list], vertices: int) -> Iterator[list]:
    """Gather the strips' finished polygons into batches of about ``vertices`` vertices (the last one
    possibly empty, so that an empty layer is still written)."""
    batch, size = [], 0
    for finished in strips:
        batch += finished
        size += sum(shapely.get_num_coordinates(p) for _, p in finished)
        if size >= vertices:
            yield batch
            batch, size = [], 0
    yield batch


def check_georef(spec: VectorSpec, crs, has_gcps: bool) -> None:
    """Refuse, before any inference, a polygon layer the scene's georeference cannot give."""
    if crs is None and has_gcps:
        raise SceneError(
            f"--vector {spec.path}: the scene is georeferenced by GCPs only and polygons need a grid; "
            "add --dst-crs (e.g. the GCPs' CRS or a UTM zone) to warp it onto one"
        )
    if crs is None and spec.driver == "GeoJSON":
        raise SceneError(
            f"--vector {spec.path}: GeoJSON holds WGS84 longitude/latitude (RFC 7946) and the scene has no "
            "CRS to convert from; write .gpkg instead"
        )


def write_vector(raster: Path, spec: VectorSpec, class_names: Sequence[str], progress: bool = False) -> int:
    """Polygonise the class raster ``raster`` into ``spec.path``; returns the number of polygons written."""
    import pyogrio.raw

    with rasterio.open(raster) as src:
        check_georef(spec, src.crs, bool(src.gcps[0]))
        rows = spec.strip_rows or max(BLOCK, STRIP_BYTES // max(src.width, 1) // BLOCK * BLOCK)
        pixel_area = abs(src.transform.determinant)
        crs = None if src.crs is None else src.crs.to_wkt()
        # RFC 7946: WGS84 lon/lat, right-hand rings (done in _to_wgs84: GDAL reprojects only the first of
        # several appended batches) and no `crs` member (GDAL's RFC7946=YES)
        geojson = spec.driver == "GeoJSON"
        options = {"RFC7946": "YES"} if geojson else {}
        if geojson:
            crs = "EPSG:4326"
        names = np.array(list(class_names) + ["nodata"] * (NODATA + 1 - len(class_names)), dtype=object)
        count, created = 0, False
        with atomic_layer_path(spec.path) as work, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # OGR's notes on the temporary file name
            unit = min_pixels(spec.min_area, pixel_area)
            for batch in _batches(polygonize_strips(src, rows, progress, unit), spec.batch_vertices):
                classes, geoms = _to_map(batch, src.transform, spec, pixel_area, src.crs if geojson else None)
                if not len(geoms) and created:
                    continue
                pyogrio.raw.write(
                    work, shapely.to_wkb(geoms), [classes.astype(np.int32), names[classes]],
                    fields=["class_id", "class_name"], layer=spec.path.stem, driver=spec.driver,
                    geometry_type="Polygon", crs=crs, append=created, layer_options=options,
                )
                count, created = count + len(geoms), True
    return count
