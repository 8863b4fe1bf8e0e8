"""Whole-scene GeoTIFF inference: windowed reads, blended sliding windows, bounded memory, resumable.

A scene can be far larger than memory, so nothing here ever holds a full-resolution raster:

* The scene is cut into a fixed grid of ``tile x tile`` windows with ``overlap`` (mmseg's ``slide`` grid:
  the last window in each axis is snapped to the scene edge, so every window has the same shape and can be
  batched).
* Output columns are split into *strips* whose width is a multiple of the 256-pixel GeoTIFF block. A strip
  runs every window that touches it (windows straddling a strip border run once per strip, which costs
  about one extra window column per strip) and blends them in a rolling buffer of ``tile + 256`` rows.
  Rows are flushed, a 256-row block row at a time, as soon as no later window can reach them.
* Each window's softmax probabilities are multiplied by a separable Hann window with a floor (so pixels on
  the scene edge, seen by a single window, still count) and divided by the summed weights at flush time.
  A pixel's result therefore depends only on the windows covering it, not on strips or batches (up to
  the float rounding of batched kernels).
* Flushed rows go to compressed per-block-row chunk files in a partial directory beside the output, with a
  JSON progress sidecar. The GeoTIFF is assembled from the chunks at the end in one deterministic pass, so
  ``--resume`` after Ctrl-C gives the same bytes as an uninterrupted run, and the final name only ever
  holds a complete file (``atomic_path``).

Memory bound, whatever the scene size: ``buffer_mb`` (default 512 MiB; the strip buffer of
``(K + 1) x (tile + 256) x strip_width`` float32 plus one ``bands x tile x strip_width`` read, from which the
strip width is derived, so a 100k-pixel-wide scene just gets more strips) + ``batch_size x (bands + K) x
tile^2`` float32 for a batch's inputs and probabilities + the model's own activations (logits included) for
that batch + GDAL's block cache (64 MiB). Disk: the partial run holds the compressed class (and probability) chunks
until the final GeoTIFF is assembled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from PIL import Image
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window
from torch import nn
from tqdm.auto import tqdm

from seglstm.utils.io import atomic_path, atomic_write_text

__all__ = [
    "BLOCK",
    "NODATA",
    "ScaleSpec",
    "SceneError",
    "ScenePredictor",
    "SceneResult",
    "Strip",
    "TileGrid",
    "compute_scaling",
    "parse_bands",
    "parse_scale",
    "plan_strips",
    "plan_tiles",
    "predict_scene",
    "window_weight",
]

log = logging.getLogger(__name__)

BLOCK = 256  # GeoTIFF block side; strips, flushes and chunks are aligned to it
NODATA = 255  # class value written where the input has no data
TRAIN_RANGE = 255.0  # inputs are scaled to 0..TRAIN_RANGE, the scale the normalisation stats were taken in
GDAL_CACHE_MB = 64
_FORMAT_VERSION = 1


class SceneError(ValueError):
    """Bad scene input, arguments or partial state; the message names the file or argument."""


# --------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class TileGrid:
    """Top-left corners of equally sized windows covering a ``height x width`` scene."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]


def _axis_origins(length: int, tile: int, stride: int) -> tuple[int, ...]:
    if length <= tile:
        return (0,)
    n = -(-(length - tile) // stride) + 1
    return tuple(min(i * stride, length - tile) for i in range(n))


def plan_tiles(height: int, width: int, tile: int, overlap: int) -> TileGrid:
    """mmseg's slide grid: stride ``tile - overlap``, last window snapped to the edge, windows clipped to
    the scene when it is smaller than a tile (so all windows share one shape and batch together)."""
    if tile <= 0:
        raise SceneError(f"--tile must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise SceneError(f"--overlap must be in [0, tile={tile}), got {overlap}")
    if height <= 0 or width <= 0:
        raise SceneError(f"scene size must be positive, got {height}x{width}")
    th, tw = min(tile, height), min(tile, width)
    stride = tile - overlap
    return TileGrid(
        height, width, th, tw, _axis_origins(height, th, stride), _axis_origins(width, tw, stride)
    )


@dataclass(frozen=True)
class Strip:
    """Output columns ``[x0, x1)`` and the grid columns of every window that touches them."""

    index: int
    x0: int
    x1: int
    cols: tuple[int, ...]

    def extent(self, grid: TileGrid) -> tuple[int, int]:
        """Columns spanned by this strip's windows (what its buffer and reads cover)."""
        return grid.xs[self.cols[0]], grid.xs[self.cols[-1]] + grid.tile_w


def plan_strips(grid: TileGrid, strip_width: int) -> list[Strip]:
    """Split output columns into block-aligned strips of ``strip_width`` (a multiple of 256)."""
    if strip_width <= 0 or strip_width % BLOCK:
        raise SceneError(f"strip width must be a positive multiple of {BLOCK}, got {strip_width}")
    strips = []
    for k, x0 in enumerate(range(0, grid.width, strip_width)):
        x1 = min(x0 + strip_width, grid.width)
        cols = tuple(c for c, x in enumerate(grid.xs) if x < x1 and x + grid.tile_w > x0)
        strips.append(Strip(k, x0, x1, cols))
    return strips


def window_weight(h: int, w: int, floor: float = 0.1) -> np.ndarray:
    """Separable Hann window ``floor + (1 - floor) sin^2(pi (i + 0.5) / n)``, float32 ``(h, w)``.

    It falls smoothly towards a window's border, so overlapping windows hand over without seams, and the
    floor keeps it positive where a single window covers the scene edge.
    """
    if not 0.0 < floor <= 1.0:
        raise SceneError(f"window weight floor must be in (0, 1], got {floor}")

    def axis(n: int) -> np.ndarray:
        return floor + (1.0 - floor) * np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2

    return np.outer(axis(h), axis(w)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- scaling
@dataclass(frozen=True)
class ScaleSpec:
    """How raw band values are brought to 0..255 before normalisation."""

    mode: str  # "auto" | "none" | "range" | "percentile"
    low: float = 0.0
    high: float = 0.0


def parse_scale(spec: str) -> ScaleSpec:
    """Parse ``auto``, ``none``, ``range:LO,HI`` or ``percentile:PLO,PHI``."""
    text = spec.strip().lower()
    if text in {"auto", "none"}:
        return ScaleSpec(text)
    mode, _, rest = text.partition(":")
    parts = rest.split(",")
    if mode not in {"range", "percentile"} or len(parts) != 2:
        raise SceneError(f"--scale {spec!r}: expected auto, none, range:LO,HI or percentile:PLO,PHI")
    try:
        low, high = (float(p) for p in parts)
    except ValueError as err:
        raise SceneError(f"--scale {spec!r}: bounds must be numbers") from err
    if not low < high:
        raise SceneError(f"--scale {spec!r}: the lower bound must be below the upper bound")
    if mode == "percentile" and not (0.0 <= low and high <= 100.0):
        raise SceneError(f"--scale {spec!r}: percentiles must lie in [0, 100]")
    return ScaleSpec(mode, low, high)


def parse_bands(spec: str) -> list[int]:
    """Parse a 1-based, comma-separated band list such as ``3,2,1`` (repeats allowed)."""
    try:
        bands = [int(b) for b in spec.split(",") if b.strip()]
    except ValueError as err:
        raise SceneError(f"--bands {spec!r}: expected comma-separated 1-based band numbers") from err
    if not bands:
        raise SceneError(f"--bands {spec!r}: no band given")
    return bands


def compute_scaling(
    src: rasterio.io.DatasetReader, bands: Sequence[int], spec: ScaleSpec, max_side: int = 1024
) -> tuple[list[float], list[float]] | None:
    """Per-band ``(low, high)`` mapped to 0..255, or None to pass values through.

    Percentiles come from a decimated read (at most ``max_side`` pixels a side; GDAL uses overviews when
    the file has them), so their cost in memory does not grow with the scene.
    """
    mode = spec.mode
    if mode == "auto":
        mode = "none" if src.dtypes[bands[0] - 1] == "uint8" else "percentile"
        spec = ScaleSpec("percentile", 2.0, 98.0) if mode == "percentile" else spec
    if mode == "none":
        return None
    if mode == "range":
        return [spec.low] * len(bands), [spec.high] * len(bands)
    factor = max(1, math.ceil(max(src.height, src.width) / max_side))
    shape = (len(bands), -(-src.height // factor), -(-src.width // factor))
    data = src.read(list(bands), out_shape=shape, resampling=Resampling.nearest).astype(np.float64)
    masks = src.read_masks(list(bands), out_shape=shape, resampling=Resampling.nearest)
    valid = np.all(masks > 0, axis=0) & np.all(np.isfinite(data), axis=0)
    lows, highs = [], []
    for band, values in zip(bands, data):
        sample = values[valid]
        if sample.size == 0:
            raise SceneError(f"{src.name}: band {band} has no valid pixel to compute percentiles from")
        low, high = np.percentile(sample, [spec.low, spec.high])
        lows.append(float(low))
        highs.append(float(high) if high > low else float(low) + 1.0)
    return lows, highs


# ---------------------------------------------------------------------------------------------- reading
class _SceneSource:
    """An open raster with the band selection, scaling and normalisation applied on windowed reads."""

    def __init__(self, src: rasterio.io.DatasetReader, bands: list[int], scaling, mean, std) -> None:
        self.src, self.bands, self.path = src, bands, src.name
        self.low = self.gain = None
        if scaling is not None:
            low, high = (np.asarray(v, np.float32)[:, None, None] for v in scaling)
            self.low, self.gain = low, np.float32(TRAIN_RANGE) / (high - low)
        self.mean = np.asarray(mean, np.float32)[:, None, None]
        self.inv_std = (1.0 / np.asarray(std, np.float64)).astype(np.float32)[:, None, None]

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Normalised float32 ``(C, h, w)`` (0 where invalid) and the validity mask ``(h, w)``."""
        try:
            raw = self.src.read(self.bands, window=window)
            masks = self.src.read_masks(self.bands, window=window)
        except RasterioError as err:
            raise SceneError(f"{self.path}: reading window {window} failed: {err}") from err
        x = raw.astype(np.float32)
        valid = np.all(masks > 0, axis=0) & np.all(np.isfinite(x), axis=0)
        if self.low is not None:
            x = np.clip((x - self.low) * self.gain, 0.0, TRAIN_RANGE)
        x = (x - self.mean) * self.inv_std
        x[:, ~valid] = 0.0
        return x, valid


def _open_raster(path: Path) -> rasterio.io.DatasetReader:
    if not path.is_file():
        raise SceneError(f"input {path} does not exist or is not a file")
    try:
        return rasterio.open(path)
    except RasterioError as err:
        raise SceneError(f"input {path} is not a readable raster: {err}") from err


# ------------------------------------------------------------------------------------------- blending
class _StripBuffer:
    """Running weighted-probability sums for rows ``[y0, y0 + cap)`` of one strip's window extent."""

    def __init__(self, strip: Strip, grid: TileGrid, num_classes: int, y0: int) -> None:
        self.strip, self.y0 = strip, y0
        self.ex0, ex1 = strip.extent(grid)
        self.cap = grid.tile_h + BLOCK
        width = ex1 - self.ex0
        self.acc = np.zeros((num_classes, self.cap, width), np.float32)
        self.wsum = np.zeros((self.cap, width), np.float32)
        self.valid = np.zeros((self.cap, width), bool)

    def add(self, y: int, x: int, wprobs: np.ndarray, weight: np.ndarray, valid: np.ndarray) -> None:
        top = max(y, self.y0)  # rows above y0 were flushed already (only on resume can a window reach them)
        skip = top - y
        r0, r1 = top - self.y0, y + wprobs.shape[1] - self.y0
        c0, c1 = x - self.ex0, x - self.ex0 + wprobs.shape[2]
        self.acc[:, r0:r1, c0:c1] += wprobs[:, skip:]
        self.wsum[r0:r1, c0:c1] += weight[skip:]
        self.valid[r0:r1, c0:c1] = valid[skip:]

    def blended(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
        """Blended probabilities ``(K, h, w)`` and validity of rows ``[y0, y1)`` in the output columns."""
        r0, r1 = y0 - self.y0, y1 - self.y0
        c0, c1 = self.strip.x0 - self.ex0, self.strip.x1 - self.ex0
        acc, wsum = self.acc[:, r0:r1, c0:c1], self.wsum[r0:r1, c0:c1]
        return np.divide(acc, wsum, out=np.zeros_like(acc), where=wsum > 0), self.valid[r0:r1, c0:c1]

    def slide(self, y1: int) -> None:
        """Drop the rows above ``y1`` (flushed) so that the buffer starts there."""
        n = y1 - self.y0
        for arr in (self.acc, self.wsum[None], self.valid[None]):
            arr[:, : self.cap - n] = arr[:, n:]
            arr[:, self.cap - n :] = 0
        self.y0 = y1


# ------------------------------------------------------------------------------------------ partial I/O
def _partial_dir(output: Path) -> Path:
    return output.parent / f".{output.name}.partial"


def _chunk_path(partial: Path, band: int, strip: int) -> Path:
    return partial / f"b{band:06d}_s{strip:04d}.npz"


def _save_chunk(path: Path, classes: np.ndarray, probs: np.ndarray | None) -> None:
    """An ``.npz`` that ``np.load`` reads, deflated at level 1: savez_compressed's level 6 costs more time
    than the model on noisy probabilities, for little space."""
    arrays = {"classes": classes} if probs is None else {"classes": classes, "probs": probs}
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(array), allow_pickle=False)


def _model_digest(model: nn.Module) -> str:
    """Fingerprint of the weights, so that ``--resume`` refuses to mix two models in one scene."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().reshape(-1)  # 1-D: a 0-d tensor (BN's num_batches_tracked) has no byte view
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class _Progress:
    next_tile: int  # first window whose contribution is not yet flushed
    strip: int  # strip of that window
    rows_done: int  # rows of that strip already flushed to chunks


@dataclass
class SceneResult:
    """What a run produced, for scripts and logs."""

    output: Path
    probs: Path | None
    preview: Path | None
    height: int
    width: int
    tiles: int
    strips: int
    resumed_from_tile: int
    seconds: float


# -------------------------------------------------------------------------------------------- predictor
def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SceneError(f"--device {device}: CUDA is not available on this machine")
    return dev


def _check_writable(path: Path, what: str) -> None:
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SceneError(f"{what} {path}: cannot create directory {parent}: {err.strerror}") from err
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SceneError(f"{what} {path}: directory {parent} is not writable")
    if path.is_dir():
        raise SceneError(f"{what} {path} is a directory")


class ScenePredictor:
    """Segments GeoTIFF scenes of any size with a segmentor ``(B, C, h, w) -> logits (B, K, h, w)``.

    Args:
        model: the segmentor; it is moved to ``device`` and put in eval mode.
        mean, std: per-band normalisation, in the 0..255 scale the inputs are brought to.
        classes, palette: class names and RGB colours; their count must match the model's output.
        tile, overlap: sliding-window size and overlap in pixels.
        batch_size: windows per forward pass.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        amp: autocast (bfloat16, or float16 where bf16 is unsupported) on CUDA; ignored on CPU.
        weight_floor: smallest blending weight, at a window's corner.
        buffer_mb: memory for the strip buffer, which sets the strip width (never below two tiles).
        strip_width: force a strip width (multiple of 256) instead of deriving it from ``buffer_mb``.
        progress: show a tqdm progress bar.
    """

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        classes: Sequence[str],
        palette: Sequence[Sequence[int]],
        *,
        tile: int = 1024,
        overlap: int = 256,
        batch_size: int = 4,
        device: str | torch.device = "auto",
        amp: bool = True,
        weight_floor: float = 0.1,
        buffer_mb: float = 512.0,
        strip_width: int | None = None,
        progress: bool = True,
    ) -> None:
        if len(mean) != len(std) or not len(mean):
            raise SceneError(f"mean ({len(mean)} values) and std ({len(std)} values) must have one per band")
        if any(s <= 0 for s in std):
            raise SceneError(f"std must be positive, got {list(std)}")
        if len(classes) != len(palette):
            raise SceneError(f"{len(classes)} class names but {len(palette)} palette colours")
        if not 0 < len(classes) < NODATA:
            raise SceneError(
                f"need 1..{NODATA - 1} classes (value {NODATA} marks nodata), got {len(classes)}"
            )
        if any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in palette):
            raise SceneError("palette entries must be (R, G, B) triples in 0..255")
        if batch_size < 1:
            raise SceneError(f"--batch-size must be at least 1, got {batch_size}")
        if buffer_mb <= 0:
            raise SceneError(f"buffer_mb must be positive, got {buffer_mb}")
        plan_tiles(tile, tile, tile, overlap)  # validates tile and overlap up front
        window_weight(1, 1, weight_floor)
        self.device = _resolve_device(device)
        self.model = model.to(self.device).eval()
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.classes = [str(c) for c in classes]
        self.palette = [tuple(int(v) for v in c) for c in palette]
        self.tile, self.overlap, self.batch_size = tile, overlap, batch_size
        self.amp = amp and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.amp and torch.cuda.is_bf16_supported() else torch.float16
        self.weight_floor, self.buffer_mb = weight_floor, buffer_mb
        self.strip_width, self.progress = strip_width, progress

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _strip_width(self, grid: TileGrid, n_bands: int, itemsize: int) -> int:
        if self.strip_width is not None:
            return self.strip_width
        cap = grid.tile_h + BLOCK
        per_column = 4 * (self.num_classes + 1) * cap + cap + n_bands * grid.tile_h * (8 + itemsize)
        # a strip's windows reach less than a tile beyond it on either side; strips narrower than two
        # tiles would mostly recompute their neighbours' windows, so the budget does not go below that
        columns = int(self.buffer_mb * 2**20) // per_column - 2 * grid.tile_w
        narrowest = -(-2 * grid.tile_w // BLOCK) * BLOCK
        full = -(-grid.width // BLOCK) * BLOCK
        return min(full, max(narrowest, columns // BLOCK * BLOCK))

    # ------------------------------------------------------------------------------------------- public
    def predict(
        self,
        input_path: str | os.PathLike,
        output_path: str | os.PathLike,
        *,
        bands: Sequence[int] | None = None,
        scale: str | ScaleSpec = "auto",
        probs_path: str | os.PathLike | None = None,
        preview_path: str | os.PathLike | None = None,
        preview_size: int = 1024,
        resume: bool = False,
        allow_no_crs: bool = False,
    ) -> SceneResult:
        """Segment ``input_path`` into ``output_path`` (uint8 class GeoTIFF, nodata 255).

        Args:
            bands: 1-based bands fed to the model, in order; default the first ``len(mean)``.
            scale: ``auto`` (none for uint8, else ``percentile:2,98``), ``none``, ``range:LO,HI`` or
                ``percentile:PLO,PHI``; brings raw values to 0..255 before normalisation.
            probs_path: also write per-class probabilities (uint8 0..255, one band per class).
            preview_path: also write a colour-coded PNG at most ``preview_size`` pixels a side.
            resume: continue the partial run left beside ``output_path`` by an interrupted call with the
                same arguments (a fresh run discards it).
            allow_no_crs: accept an input without a CRS (the output then has none either).
        """
        started = time.perf_counter()
        in_path, out_path = Path(input_path), Path(output_path)
        extra = {"probabilities": probs_path, "preview": preview_path}
        targets = [("output", out_path)] + [(k, Path(p)) for k, p in extra.items() if p is not None]
        for what, path in targets:
            if path.resolve() == in_path.resolve():
                raise SceneError(f"{what} {path} would overwrite the input")
            _check_writable(path, what)
        if len({p.resolve() for _, p in targets}) != len(targets):
            raise SceneError(f"output paths must differ: {[str(p) for _, p in targets]}")
        if preview_size < 1:
            raise SceneError(f"preview size must be positive, got {preview_size}")
        spec = parse_scale(scale) if isinstance(scale, str) else scale

        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), _open_raster(in_path) as src:
            bands = self._check_source(src, in_path, bands, allow_no_crs)
            try:
                scaling = compute_scaling(src, bands, spec)
            except RasterioError as err:
                raise SceneError(f"input {in_path}: reading an overview for --scale failed: {err}") from err
            source = _SceneSource(src, bands, scaling, self.mean, self.std)
            grid = plan_tiles(src.height, src.width, self.tile, self.overlap)
            strip_width = self._strip_width(grid, len(bands), np.dtype(src.dtypes[0]).itemsize)
            strips = plan_strips(grid, strip_width)
            partial = _partial_dir(out_path)
            fingerprint = {
                "format": _FORMAT_VERSION,
                "input": str(in_path.resolve()),
                "input_bytes": in_path.stat().st_size,
                "input_mtime_ns": in_path.stat().st_mtime_ns,
                "size": [grid.height, grid.width],
                "bands": bands,
                "scaling": scaling,
                "mean": self.mean,
                "std": self.std,
                "classes": self.classes,
                "tile": self.tile,
                "overlap": self.overlap,
                "batch_size": self.batch_size,
                "strip_width": strip_width,
                "weight_floor": self.weight_floor,
                "probs": probs_path is not None,
                "device": self.device.type,
                "amp": self.amp,
                "model": _model_digest(self.model),
            }
            fingerprint = json.loads(
                json.dumps(fingerprint)
            )  # as the sidecar will read back (tuples -> lists)
            state = self._start_state(partial, fingerprint, resume)
            n_tiles = sum(len(s.cols) for s in strips) * len(grid.ys)
            if state.next_tile < n_tiles:
                self._run(
                    source, grid, strips, partial, fingerprint, state, with_probs=probs_path is not None
                )
            self._assemble(
                src,
                grid,
                strips,
                partial,
                out_path,
                None if probs_path is None else Path(probs_path),
                None if preview_path is None else Path(preview_path),
                preview_size,
            )
        shutil.rmtree(partial)
        return SceneResult(
            output=out_path,
            probs=None if probs_path is None else Path(probs_path),
            preview=None if preview_path is None else Path(preview_path),
            height=grid.height,
            width=grid.width,
            tiles=n_tiles,
            strips=len(strips),
            resumed_from_tile=state.next_tile,
            seconds=time.perf_counter() - started,
        )

    # ----------------------------------------------------------------------------------------- checks
    def _check_source(
        self, src: rasterio.io.DatasetReader, path: Path, bands: Sequence[int] | None, allow_no_crs: bool
    ) -> list[int]:
        n_in = len(self.mean)
        if bands is None:
            if src.count < n_in:
                raise SceneError(
                    f"input {path} has {src.count} band(s) but the model takes {n_in}; choose them with --bands"
                )
            bands = list(range(1, n_in + 1))
        bands = [int(b) for b in bands]
        bad = [b for b in bands if not 1 <= b <= src.count]
        if bad:
            raise SceneError(
                f"--bands: band(s) {bad} out of range; input {path} has {src.count} band(s), numbered 1..{src.count}"
            )
        if len(bands) != n_in:
            raise SceneError(
                f"--bands selects {len(bands)} band(s) but the model's normalisation has {n_in} (mean/std)"
            )
        if len({src.dtypes[b - 1] for b in bands}) != 1:
            raise SceneError(f"input {path}: the selected bands {bands} have different data types")
        if src.crs is None and not allow_no_crs:
            raise SceneError(
                f"input {path} has no CRS, so the output could not be georeferenced; "
                "pass --allow-no-crs to write it anyway"
            )
        return bands

    def _start_state(self, partial: Path, fingerprint: dict, resume: bool) -> _Progress:
        sidecar = partial / "progress.json"
        if not resume:
            if partial.exists():
                log.warning("discarding the partial run in %s (pass --resume to continue it)", partial)
                shutil.rmtree(partial)
            return _Progress(0, 0, 0)
        if not sidecar.is_file():
            log.warning("nothing to resume in %s; starting from the first tile", partial)
            return _Progress(0, 0, 0)
        try:
            saved = json.loads(sidecar.read_text())
            old, progress = saved["fingerprint"], _Progress(**saved["progress"])
        except (ValueError, KeyError, TypeError) as err:
            raise SceneError(
                f"--resume: progress file {sidecar} is unreadable ({err}); rerun without --resume"
            ) from err
        changed = sorted(k for k in fingerprint.keys() | old.keys() if fingerprint.get(k) != old.get(k))
        if changed:
            raise SceneError(
                f"--resume: the partial run in {partial} was made with different {', '.join(changed)}; "
                "rerun with the original arguments, or without --resume to start over"
            )
        return progress

    # --------------------------------------------------------------------------------------- inference
    def _forward(self, batch: np.ndarray, weight: torch.Tensor) -> np.ndarray:
        x = torch.from_numpy(batch).to(self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            logits = self.model(x)
        expected = (x.shape[0], self.num_classes, x.shape[2], x.shape[3])
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise SceneError(
                f"the model returned logits of shape {got} for a batch of shape {tuple(x.shape)}; expected "
                f"{expected}: {self.num_classes} classes as in the palette ({', '.join(self.classes)}), "
                "at the input resolution"
            )
        probs = torch.softmax(logits.float(), dim=1)
        del logits  # one batch-sized tensor fewer at the peak
        return probs.mul_(weight).cpu().numpy()

    def _tiles(self, grid: TileGrid, strips: list[Strip]) -> list[tuple[int, int, int]]:
        return [(s.index, r, c) for s in strips for r in range(len(grid.ys)) for c in s.cols]

    def _run(
        self,
        source: _SceneSource,
        grid: TileGrid,
        strips: list[Strip],
        partial: Path,
        fingerprint: dict,
        state: _Progress,
        *,
        with_probs: bool,
    ) -> None:
        tiles = self._tiles(grid, strips)
        first_of_strip = np.cumsum([0] + [len(s.cols) * len(grid.ys) for s in strips]).tolist()
        weight_np = window_weight(grid.tile_h, grid.tile_w, self.weight_floor)
        weight = torch.from_numpy(weight_np).to(self.device)
        # Batches are fixed groups of the global tile order, so a resumed run feeds the model exactly the
        # batches an uninterrupted run does (results cannot depend on batch composition).
        start = state.next_tile // self.batch_size * self.batch_size
        buffer: _StripBuffer | None = None
        cached: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None

        def read_tile(k: int, r: int, c: int) -> tuple[np.ndarray, np.ndarray]:
            nonlocal cached
            if cached is None or cached[0] != (k, r):
                ex0, ex1 = strips[k].extent(grid)
                cached = ((k, r), *source.read(Window(ex0, grid.ys[r], ex1 - ex0, grid.tile_h)))
            c0 = grid.xs[c] - strips[k].extent(grid)[0]
            return cached[1][:, :, c0 : c0 + grid.tile_w], cached[2][:, c0 : c0 + grid.tile_w]

        def flush(buf: _StripBuffer, r: int) -> None:
            last_row = r == len(grid.ys) - 1
            target = grid.height if last_row else grid.ys[r + 1] // BLOCK * BLOCK
            if target <= buf.y0:
                return
            partial.mkdir(exist_ok=True)
            for y0 in range(buf.y0, target, BLOCK):  # buf.y0 is block-aligned: every chunk is a block row
                p, v = buf.blended(y0, min(y0 + BLOCK, target))
                classes = np.where(v, p.argmax(axis=0), NODATA).astype(np.uint8)
                p8 = np.where(v, np.rint(p * 255.0), 0).astype(np.uint8) if with_probs else None
                _save_chunk(_chunk_path(partial, y0 // BLOCK, buf.strip.index), classes, p8)
            buf.slide(target)
            k = buf.strip.index
            if last_row:
                nxt = _Progress(first_of_strip[k + 1], k + 1, 0)
            else:
                row = next(i for i, y in enumerate(grid.ys) if y + grid.tile_h > target)
                nxt = _Progress(first_of_strip[k] + row * len(buf.strip.cols), k, target)
            atomic_write_text(
                partial / "progress.json", json.dumps({"fingerprint": fingerprint, "progress": asdict(nxt)})
            )

        bar = tqdm(
            total=len(tiles), initial=start, unit="tile", desc="predict-scene", disable=not self.progress
        )
        with bar:
            for b0 in range(start, len(tiles), self.batch_size):
                batch = tiles[b0 : b0 + self.batch_size]
                inputs = [read_tile(*t) for t in batch]
                live = [i for i, (_, v) in enumerate(inputs) if v.any()]  # all-nodata windows add nothing
                out = self._forward(np.stack([inputs[i][0] for i in live]), weight) if live else None
                results = dict(zip(live, out)) if out is not None else {}
                for i, (k, r, c) in enumerate(batch):
                    index = b0 + i
                    bar.update(1)
                    if index < state.next_tile:  # flushed before the interruption: recomputed for the batch
                        continue
                    if buffer is None or buffer.strip.index != k:
                        buffer = _StripBuffer(
                            strips[k], grid, self.num_classes, state.rows_done if k == state.strip else 0
                        )
                    if i in results:
                        buffer.add(grid.ys[r], grid.xs[c], results[i], weight_np, inputs[i][1])
                    if c == strips[k].cols[-1]:
                        flush(buffer, r)

    # ---------------------------------------------------------------------------------------- assembly
    def _assemble(
        self,
        src: rasterio.io.DatasetReader,
        grid: TileGrid,
        strips: list[Strip],
        partial: Path,
        out_path: Path,
        probs_path: Path | None,
        preview_path: Path | None,
        preview_size: int,
    ) -> None:
        """Write the GeoTIFF(s) from the chunks in one pass, block row by block row."""
        profile = {
            "driver": "GTiff",
            "height": grid.height,
            "width": grid.width,
            "crs": src.crs,
            "transform": src.transform,
            "dtype": "uint8",
            "tiled": True,
            "blockxsize": BLOCK,
            "blockysize": BLOCK,
            "compress": "deflate",
            "BIGTIFF": "IF_SAFER",
        }
        step = max(1, math.ceil(max(grid.height, grid.width) / preview_size))
        preview = (
            np.zeros((-(-grid.height // step), -(-grid.width // step)), np.uint8) if preview_path else None
        )
        with contextlib.ExitStack() as stack:
            # the probabilities' nodata mask goes inside the file, not into a .msk sidecar
            stack.enter_context(rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True))
            tmp_out = stack.enter_context(atomic_path(out_path))
            tmp_probs = stack.enter_context(atomic_path(probs_path)) if probs_path else None
            dst = stack.enter_context(rasterio.open(tmp_out, "w", count=1, nodata=NODATA, **profile))
            dst.write_colormap(1, {i: (*c, 255) for i, c in enumerate(self.palette)} | {NODATA: (0, 0, 0, 0)})
            dst.set_band_description(1, "class index")
            dst.update_tags(classes=json.dumps(self.classes), nodata_class=str(NODATA))
            pdst = None
            if tmp_probs is not None:
                pdst = stack.enter_context(rasterio.open(tmp_probs, "w", count=self.num_classes, **profile))
                for i, name in enumerate(self.classes):
                    pdst.set_band_description(i + 1, f"P({name}) x 255")
            for band in range(-(-grid.height // BLOCK)):
                y0 = band * BLOCK
                for strip in strips:
                    path = _chunk_path(partial, band, strip.index)
                    try:
                        with np.load(path) as chunk:
                            classes = chunk["classes"]
                            probs = chunk["probs"] if pdst is not None else None
                    except (OSError, KeyError, ValueError) as err:
                        raise SceneError(
                            f"partial run {partial}: chunk {path.name} is missing or damaged ({err}); "
                            "rerun without --resume"
                        ) from err
                    window = Window(strip.x0, y0, strip.x1 - strip.x0, classes.shape[0])
                    dst.write(classes, 1, window=window)
                    if pdst is not None:
                        pdst.write(probs, window=window)
                        pdst.write_mask(np.where(classes == NODATA, 0, 255).astype(np.uint8), window=window)
                    if preview is not None:
                        ry = np.arange(-(-y0 // step) * step, y0 + classes.shape[0], step)
                        rx = np.arange(-(-strip.x0 // step) * step, strip.x1, step)
                        preview[np.ix_(ry // step, rx // step)] = classes[np.ix_(ry - y0, rx - strip.x0)]
        if preview_path is not None:
            lut = np.zeros((256, 4), np.uint8)
            lut[: self.num_classes, :3] = self.palette
            lut[: self.num_classes, 3] = 255
            with atomic_path(preview_path) as tmp:
                Image.fromarray(lut[preview], "RGBA").save(tmp, format="PNG")


def predict_scene(
    model: nn.Module,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    classes: Sequence[str],
    palette: Sequence[Sequence[int]],
    **kwargs,
) -> SceneResult:
    """One-call form of :class:`ScenePredictor`: constructor keywords and ``predict`` keywords together."""
    run_keys = {"bands", "scale", "probs_path", "preview_path", "preview_size", "resume", "allow_no_crs"}
    run_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in run_keys}
    predictor = ScenePredictor(model, mean, std, classes, palette, **kwargs)
    return predictor.predict(input_path, output_path, **run_kw)
