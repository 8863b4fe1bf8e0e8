"""Opening what users point at (a file, an ``http(s)://`` / ``s3://`` URL, a ``/vsi*`` path, a STAC item)
as one stack of bands read window by window through GDAL, optionally reprojected on the fly.

Remote rasters are never downloaded whole: GDAL's ``/vsicurl/`` and ``/vsis3/`` fetch the byte ranges a
window needs (a COG's tiles). Validity follows GDAL's dataset mask: a pixel is nodata only when every
band of its dataset is (or the mask / alpha band says so), and a band without a value at a valid pixel is
fed to the model as its mean.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import CRSError, RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform
from rasterio.windows import Window

from seglstm.inference.scene.errors import SceneError

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


class SceneInput:
    """Bands ``1..count`` of one or more same-grid datasets (several for a STAC item's assets), read by
    window as raw values with per-band and per-pixel validity."""

    def __init__(self, datasets: Sequence, name: str, identity: dict, nodata: float | None, alpha: bool) -> None:
        self.datasets, self.name, self.identity, self.nodata = list(datasets), name, identity, nodata
        first = self.datasets[0]
        # the warped view's alpha band is its dataset mask, not an input band
        self._counts = [ds.count - int(alpha) for ds in self.datasets]
        self._bands = [(j, i + 1) for j, n in enumerate(self._counts) for i in range(n)]
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
                    valid = np.ones(raw.shape[1:], bool)
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
                valid &= pixel
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
    return [item.assets[a].get_absolute_href() or item.assets[a].href for a in assets]


def is_stac(href: str) -> bool:
    return href.lower().split("?")[0].endswith(".json")


def _warp_grid(ds, opts: InputOptions) -> tuple[dict, dict]:
    """The source georeference (a grid, or GCPs: GDAL warps from those too) and the output grid."""
    gcps, gcp_crs = ds.gcps
    src_crs = ds.crs or (gcp_crs if gcps else None)
    if src_crs is None:
        raise SceneError(f"--dst-crs/--resolution: input {ds.name} has no CRS or GCPs to reproject from")
    try:
        dst_crs = rasterio.crs.CRS.from_user_input(opts.dst_crs or src_crs)
    except CRSError as err:
        raise SceneError(f"--dst-crs {opts.dst_crs!r} is not a CRS GDAL knows: {err}") from err
    if ds.crs is None:
        transform, width, height = calculate_default_transform(
            src_crs, dst_crs, ds.width, ds.height, gcps=gcps, resolution=opts.resolution
        )
    else:
        transform, width, height = calculate_default_transform(
            src_crs, dst_crs, ds.width, ds.height, *ds.bounds, resolution=opts.resolution
        )
    return {"src_crs": src_crs}, {"crs": dst_crs, "transform": transform, "width": width, "height": height}


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
        first = datasets[0]
        for h, ds in zip(hrefs[1:], datasets[1:]):
            if (ds.height, ds.width, ds.crs, ds.transform) != (first.height, first.width, first.crs, first.transform):
                raise SceneError(
                    f"STAC asset {h} is on another grid ({ds.width}x{ds.height}, {ds.crs}) than {hrefs[0]} "
                    f"({first.width}x{first.height}, {first.crs}); stacked assets must share one grid"
                )
        identity = {"inputs": [_identity(h, ds) for h, ds in zip(hrefs, datasets)], "options": {
            "assets": list(opts.assets or []), "nodata": opts.nodata, "dst_crs": opts.dst_crs,
            "resolution": list(opts.resolution or [])}}
        warp = opts.dst_crs is not None or opts.resolution is not None
        if warp:
            source, grid = _warp_grid(first, opts)
            nodata = {} if opts.nodata is None else {"src_nodata": opts.nodata, "nodata": opts.nodata}
            datasets = [
                stack.enter_context(
                    WarpedVRT(ds, **source, **grid, resampling=Resampling.bilinear, add_alpha=True, **nodata)
                )
                for ds in datasets
            ]
        yield SceneInput(datasets, href, identity, opts.nodata, alpha=warp)
