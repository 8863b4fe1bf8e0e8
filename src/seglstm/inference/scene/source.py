"""Opening what users point at (a file, an ``http(s)://`` / ``s3://`` URL, a ``/vsi*`` path, a STAC item)
as one stack of bands read window by window through GDAL, optionally reprojected on the fly.

Remote rasters are never downloaded whole: GDAL's ``/vsicurl/`` and ``/vsis3/`` fetch the byte ranges a
window needs (a COG's tiles). Validity follows GDAL's dataset mask: a pixel is nodata only when every
band is (or the masks / alpha bands say so), whether the bands come from one file or from several STAC
assets, and a band without a value at a valid pixel is fed to the model as its mean.

STAC assets on different grids (Sentinel-2's 10 m and 20 m bands) are resampled (bilinear) onto one: the
finest (smallest pixel area; the first listed among equals) or the asset named by ``grid_asset``.

``--resolution`` gives gdalwarp's ``-tr`` grid (GDAL's suggested extent, ``round(extent / res)`` pixels
from its upper-left corner) and ``tap`` gdalwarp's ``-tap`` (the extent first snapped outward to
multiples of the resolution). A scene georeferenced by GCPs is warped through GDAL's GCP transformer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.enums import Resampling
from rasterio.errors import CRSError, RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform
from rasterio.windows import Window

from seglstm.inference.scene.errors import SceneError

log = logging.getLogger(__name__)
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def is_remote(path: str) -> bool:
    """A URL or a GDAL virtual file system path: read through GDAL, never through the local file system."""
    return bool(_URL.match(path)) or path.startswith("/vsi")


@dataclass(frozen=True)
class InputOptions:
    """How to open a scene: STAC assets to stack, a nodata override and an output grid to warp to."""

    assets: tuple[str, ...] | None = None
    nodata: float | None = None
    dst_crs: str | None = None
    resolution: tuple[float, float] | None = None
    tap: bool = False  # gdalwarp -tap: snap the output bounds to multiples of the resolution
    grid_asset: str | None = None  # STAC assets on different grids: resample onto this one (default finest)


class SceneInput:
    """Bands ``1..count`` of one or more same-grid datasets (several for a STAC item's assets), read by
    window as raw values with per-band and per-pixel validity."""

    def __init__(self, datasets: Sequence, name: str, identity: dict, nodata: float | None,
                 alpha: Sequence[bool], labels: Sequence[str] | None = None) -> None:
        self.datasets, self.name, self.identity, self.nodata = list(datasets), name, identity, nodata
        first = self.datasets[0]
        # a warped view's alpha band is its dataset mask, not an input band
        self._counts = [ds.count - int(a) for ds, a in zip(self.datasets, alpha)]
        self._bands = [(j, i + 1) for j, n in enumerate(self._counts) for i in range(n)]
        labels = labels or [None] * len(self.datasets)
        self.band_names = [  # how warnings name a band: its STAC asset, or its number in the file
            f"{i} (asset {labels[j]}{'' if self._counts[j] == 1 else f' band {b}'})" if labels[j] else str(i)
            for i, (j, b) in enumerate(self._bands, 1)
        ]
        self.count = len(self._bands)
        self.height, self.width = first.height, first.width
        self.crs, self.transform = first.crs, first.transform
        self.gcps = first.gcps if first.crs is None else ([], None)
        self.dtypes = [self.datasets[j].dtypes[i - 1] for j, i in self._bands]

    def read(
        self, bands: Sequence[int], window: Window | None = None, out_shape: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw ``(C, h, w)`` values of ``bands`` (1-based), their validity ``(C, h, w)`` and the pixel
        validity ``(h, w)``; ``out_shape`` decimates (nearest), for statistics."""
        groups: dict[int, list[tuple[int, int]]] = {}
        for pos, b in enumerate(bands):
            j, i = self._bands[b - 1]
            groups.setdefault(j, []).append((pos, i))
        kw = {"window": window}
        if out_shape is not None:
            kw.update(out_shape=out_shape, resampling=Resampling.nearest)
        raw = band_valid = valid = None
        try:
            for j, members in groups.items():
                ds, idx = self.datasets[j], [i for _, i in members]
                data = ds.read(idx, **({**kw, "out_shape": (len(idx), *out_shape)} if out_shape else kw))
                if raw is None:
                    raw = np.empty((len(bands), *data.shape[1:]), data.dtype)
                    band_valid = np.empty(raw.shape, bool)
                    valid = np.zeros(raw.shape[1:], bool)
                finite = np.isfinite(data) if data.dtype.kind == "f" else np.ones(data.shape, bool)
                if self.nodata is not None:  # the override replaces the file's own nodata and masks
                    ok = finite & (data != self.nodata)
                    pixel = ok.any(axis=0)
                else:
                    masks = ds.read_masks(idx, **({**kw, "out_shape": (len(idx), *out_shape)} if out_shape else kw))
                    ok = finite & (masks > 0)
                    pixel = ds.dataset_mask(**kw) > 0
                for (pos, _), values, good in zip(members, data, ok):
                    raw[pos], band_valid[pos] = values, good
                valid |= pixel  # nodata only where every dataset (so every band) is
        except RasterioError as err:
            raise SceneError(f"{self.name}: reading window {window} failed: {err}") from err
        return raw, band_valid, valid


def _open_dataset(href: str, what: str):
    local = not is_remote(href)
    if local and not Path(href).is_file():
        raise SceneError(f"{what} {href} does not exist or is not a file")
    try:
        return rasterio.open(href)
    except RasterioError as err:
        raise SceneError(f"{what} {href} is not a readable raster: {err}") from err


def _identity(href: str, ds) -> dict:
    """What ``--resume`` compares to tell that the input did not change."""
    if is_remote(href):
        return {"href": href, "size": [ds.height, ds.width], "transform": list(ds.transform)[:6]}
    st = Path(href).stat()
    return {"href": str(Path(href).resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _stac_assets(href: str, assets: Sequence[str]) -> list[str]:
    """Absolute hrefs of ``assets`` of the STAC item at ``href`` (a local JSON file or a URL)."""
    from seglstm.utils.optional import require

    pystac = require("pystac", "reading STAC documents")

    try:
        item = pystac.Item.from_file(href)
    except (OSError, ValueError, KeyError, json.JSONDecodeError, pystac.STACError) as err:
        raise SceneError(f"input {href} is not a readable STAC item: {err}") from err
    missing = [a for a in assets if a not in item.assets]
    if missing:
        raise SceneError(
            f"--asset(s) {', '.join(missing)} not in STAC item {href}; it has {', '.join(sorted(item.assets))}"
        )
    hrefs = [item.assets[a].get_absolute_href() or item.assets[a].href for a in assets]
    if is_remote(href):  # a remote item must not make us read files of this machine
        for name, h in zip(assets, hrefs):
            if h.lower().startswith("file:") or not is_remote(h):
                raise SceneError(
                    f"STAC item {href}: asset {name} points to a local file ({h}); a remote item's assets "
                    "must be URLs (download the item to use local files)"
                )
    return hrefs


def is_stac(href: str) -> bool:
    return href.lower().split("?")[0].endswith(".json")


def warp_grid(src_crs, dst_crs, width: int, height: int, *, bounds=None, gcps=None,
              resolution: tuple[float, float] | None = None, tap: bool = False) -> tuple[Affine, int, int]:
    """The output grid gdalwarp would choose: GDAL's suggested one (``GDALSuggestedWarpOutput2``), or with
    ``resolution`` (``-tr``) its extent cut into ``int(extent / res + 0.5)`` pixels from the upper-left
    corner (rasterio's ``calculate_default_transform`` rounds up instead: often one more row or column), with
    ``tap`` (``-tap``) after snapping the extent outward to multiples of the resolution."""
    extent = {"gcps": gcps} if gcps else dict(zip(("left", "bottom", "right", "top"), bounds))
    transform, width, height = calculate_default_transform(src_crs, dst_crs, width, height, **extent)
    if resolution is None:
        return transform, width, height
    xres, yres = resolution
    left, top = transform.c, transform.f
    right, bottom = left + transform.a * width, top + transform.e * height
    if tap:
        left, right = math.floor(left / xres) * xres, math.ceil(right / xres) * xres
        bottom, top = math.floor(bottom / yres) * yres, math.ceil(top / yres) * yres
    width, height = int((right - left + xres / 2) / xres), int((top - bottom + yres / 2) / yres)
    return Affine(xres, 0.0, left, 0.0, -yres, top), max(width, 1), max(height, 1)


def _warp_grid(ds, opts: InputOptions) -> dict:
    """The output grid (CRS, transform, size) for ``ds``, georeferenced by a grid or by GCPs."""
    gcps, gcp_crs = ds.gcps
    src_crs = ds.crs or (gcp_crs if gcps else None)
    if src_crs is None:
        raise SceneError(f"--dst-crs/--resolution: input {ds.name} has no CRS or GCPs to reproject from")
    try:
        dst_crs = rasterio.crs.CRS.from_user_input(opts.dst_crs or src_crs)
    except CRSError as err:
        raise SceneError(f"--dst-crs {opts.dst_crs!r} is not a CRS GDAL knows: {err}") from err
    transform, width, height = warp_grid(
        src_crs, dst_crs, ds.width, ds.height, bounds=None if ds.crs is None else ds.bounds,
        gcps=gcps if ds.crs is None else None, resolution=opts.resolution, tap=opts.tap,
    )
    return {"crs": dst_crs, "transform": transform, "width": width, "height": height}


def _gcp_warped_vrt(ds, grid: dict, nodata: dict):
    """A warped view of a GCP-referenced dataset on ``grid``. rasterio's WarpedVRT ignores the GCPs once
    it is given a grid (it builds its transformer from the identity geotransform), so GDAL builds the
    view on its own grid, with the GCP transformer, and the serialised view is moved onto ``grid``."""
    with WarpedVRT(ds, crs=grid["crs"], resampling=Resampling.bilinear, add_alpha=True, **nodata) as auto, \
            tempfile.TemporaryDirectory() as tmp:
        rasterio.shutil.copy(auto, Path(tmp) / "warp.vrt", driver="VRT")
        xml = (Path(tmp) / "warp.vrt").read_text()
    t = grid["transform"]
    gt, inv = ",".join(repr(v) for v in t.to_gdal()), ",".join(repr(v) for v in (~t).to_gdal())
    source = ds.files[0] if ds.files else ds.name
    edits = [
        (r'rasterXSize="\d+" rasterYSize="\d+"', f'rasterXSize="{grid["width"]}" rasterYSize="{grid["height"]}"'),
        (r"<GeoTransform>[^<]*</GeoTransform>", f"<GeoTransform>{gt}</GeoTransform>"),
        (r"<DstGeoTransform>[^<]*</DstGeoTransform>", f"<DstGeoTransform>{gt}</DstGeoTransform>"),
        (r"<DstInvGeoTransform>[^<]*</DstInvGeoTransform>", f"<DstInvGeoTransform>{inv}</DstInvGeoTransform>"),
        (r"<BlockXSize>\d+</BlockXSize>", f"<BlockXSize>{min(grid['width'], 512)}</BlockXSize>"),
        (r"<SourceDataset[^>]*>[^<]*</SourceDataset>",
         f'<SourceDataset relativeToVRT="0">{xml_escape(source)}</SourceDataset>'),
    ]
    for pattern, value in edits:
        xml, n = re.subn(pattern, lambda _m, v=value: v, xml, count=1)
        if n != 1:
            raise SceneError(f"input {ds.name}: GDAL's warped view of the GCPs lacks {pattern}; cannot reproject it")
    return rasterio.open(xml)


def _common_grid(datasets: list, opts: InputOptions) -> int:
    """Index of the dataset whose grid the others are resampled onto: ``opts.grid_asset`` or the finest."""
    if opts.grid_asset is not None:
        if not opts.assets:
            raise SceneError("--asset-grid chooses among stacked STAC assets: add --assets")
        if opts.grid_asset not in opts.assets:
            raise SceneError(
                f"--asset-grid {opts.grid_asset}: not among the stacked assets ({', '.join(opts.assets)})"
            )
        return list(opts.assets).index(opts.grid_asset)
    return min(range(len(datasets)), key=lambda j: abs(datasets[j].transform.determinant))


@contextlib.contextmanager
def open_input(path: str | os.PathLike, opts: InputOptions = InputOptions()) -> Iterator[SceneInput]:
    """Open ``path`` (with ``opts``) for windowed reads; everything is closed on exit."""
    href = os.fspath(path)
    if opts.assets and not is_stac(href):
        raise SceneError(f"--asset/--assets need a STAC item (.json), got input {href}")
    if is_stac(href) and not opts.assets:
        raise SceneError(f"input {href} is a STAC item: choose its bands with --asset NAME or --assets A,B,C")
    hrefs = _stac_assets(href, opts.assets) if is_stac(href) else [href]
    with contextlib.ExitStack() as stack:
        datasets = [stack.enter_context(_open_dataset(h, "input")) for h in hrefs]
        labels = list(opts.assets) if is_stac(href) else None
        identity = {"inputs": [_identity(h, ds) for h, ds in zip(hrefs, datasets)], "options": {
            "assets": list(opts.assets or []), "nodata": opts.nodata, "dst_crs": opts.dst_crs,
            "resolution": list(opts.resolution or []), "tap": opts.tap, "grid_asset": opts.grid_asset}}
        if opts.tap and opts.resolution is None:
            raise SceneError("--tap snaps the output bounds to the resolution: add --resolution")
        ref = _common_grid(datasets, opts) if len(datasets) > 1 or opts.grid_asset else 0
        base = datasets[ref]
        nodata = {} if opts.nodata is None else {"src_nodata": opts.nodata, "nodata": opts.nodata}
        if opts.dst_crs is not None or opts.resolution is not None:
            grid = _warp_grid(base, opts)
        else:
            grid = {"crs": base.crs, "transform": base.transform, "width": base.width, "height": base.height}
            others = [labels[j] for j, ds in enumerate(datasets) if _grid_of(ds) != _grid_of(base)]
            if others:
                log.warning("STAC assets %s resampled (bilinear) onto the %dx%d grid of asset %s",
                            ", ".join(others), base.width, base.height, labels[ref])
        alpha = []
        for j, ds in enumerate(datasets):
            if _grid_of(ds) == (grid["height"], grid["width"], grid["crs"], grid["transform"]):
                alpha.append(False)
                continue
            if ds.crs is None and ds.gcps[0]:
                datasets[j] = stack.enter_context(_gcp_warped_vrt(ds, grid, nodata))
            else:
                datasets[j] = stack.enter_context(
                    WarpedVRT(ds, **grid, resampling=Resampling.bilinear, add_alpha=True, **nodata)
                )
            alpha.append(True)
        yield SceneInput(datasets, href, identity, opts.nodata, alpha, labels)


def _grid_of(ds) -> tuple:
    return ds.height, ds.width, ds.crs, ds.transform
