"""The scene predictor: checks the arguments, runs the windows strip by strip and hands the chunks to the
writers. Planning, scaling, reading, blending, partial-run state and the products each live in their own
module of this package (see its docstring for the memory bound)."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from torch import nn
from tqdm.auto import tqdm

from seglstm.inference.scene.background import Prefetcher, Writer
from seglstm.inference.scene.blend import StripBuffer, first_argmax
from seglstm.inference.scene.errors import SceneError
from seglstm.inference.scene.outputs import PartialRun, Progress
from seglstm.inference.scene.plan import (
    BLOCK,
    WEIGHT_FLOOR,
    Strip,
    Tile,
    TileGrid,
    plan_run,
    plan_strips,
    plan_tiles,
    window_weight,
)
from seglstm.inference.scene.scaling import Normaliser, ScaleSpec, compute_scaling, parse_scale
from seglstm.inference.scene.source import InputOptions, SceneInput, is_remote, open_input
from seglstm.inference.scene.vector import VectorSpec, check_georef, write_vector
from seglstm.inference.scene.writers import NODATA, Georef, Products, write_rasters
from seglstm.utils.device import InferencePrecision, resolve_device, resolve_inference_precision

log = logging.getLogger(__name__)

GDAL_CACHE_MB = 64
# Host seconds of the last ``predict`` by phase (``ScenePredictor.profile``). Main thread: waiting for the
# reader, the forward, softmax + weighting + adding into the strip buffer, flushing (division, arg-max, uint8
# copy to the host), waiting for the writer, assembling the products. Background threads: the reader
# (reading, stacking, copying to the device and normalising there; ``normalise`` is that last part of it),
# the writer (compressing and writing chunks). On CUDA, kernels run asynchronously: their time shows where
# the host next waits for them (the flush's copy to the host).
PROFILE_PHASES = ("read_wait", "normalise", "forward", "blend", "flush", "write_wait", "assemble", "reader",
                  "writer")
_DTYPE_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


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
    vector: Path | None = None
    polygons: int = 0


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


def _model_digest(model: nn.Module) -> str:
    """Fingerprint of the weights, so that ``--resume`` refuses to mix two models in one scene."""
    digest = getattr(model, "digest", None)
    if callable(digest):  # an exported model fingerprints its own file
        return str(digest())
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().reshape(-1)  # 1-D: a 0-d tensor (BN's num_batches_tracked) has no byte view
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _WindowReader:
    """Reads a strip's whole row of windows at once (one GDAL read per row instead of one per window) and
    cuts the windows out of it: raw values (uint8 as they are, other types as float32, the first step of
    the normalisation), which band values are usable ``(C, h, w)`` and which pixels are valid ``(h, w)``."""

    def __init__(self, source: SceneInput, bands: list[int], grid: TileGrid, strips: list[Strip]) -> None:
        self.source, self.bands, self.grid, self.strips = source, bands, grid, strips
        self._key: tuple[int, int] | None = None
        self._raw = self._ok = self._valid = None

    def __call__(self, tile: Tile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        grid, strip = self.grid, self.strips[tile.strip]
        ex0, ex1 = strip.extent(grid)
        if self._key != (tile.strip, tile.row):
            window = rasterio.windows.Window(ex0, grid.ys[tile.row], ex1 - ex0, grid.tile_h)
            raw, band_valid, valid = self.source.read(self.bands, window=window)
            self._raw = raw if raw.dtype == np.uint8 else raw.astype(np.float32)
            self._key, self._ok, self._valid = (tile.strip, tile.row), band_valid & valid[None], valid
        cols = slice(grid.xs[tile.col] - ex0, grid.xs[tile.col] - ex0 + grid.tile_w)
        return self._raw[:, :, cols], self._ok[:, :, cols], self._valid[:, cols]


@dataclass
class _Batch:
    """One batch of windows as the reader thread hands it over, on the device: the windows with any valid
    pixel (``live``) stacked and normalised for the model, and every window's pixel validity."""

    tiles: list[Tile]
    live: list[int]
    x: torch.Tensor | None
    valid: torch.Tensor


def _host_tensor(array: np.ndarray, pin: bool) -> torch.Tensor:
    """A host tensor for a copy to the device: page-locked (so the copy is asynchronous) on CUDA."""
    t = torch.from_numpy(array)
    return t.pin_memory() if pin else t


def _to_host(t: torch.Tensor) -> np.ndarray:
    """The one place where results cross from the device to the host (uint8 only)."""
    if t.dtype != torch.uint8:
        raise TypeError(f"only uint8 results cross to the host, got {t.dtype}")
    return t.cpu().numpy()


class _Blender:
    """Adds window results into the current strip's buffer (on the device) and hands finished block rows,
    as uint8, to the writer thread, which saves the chunks and then the progress."""

    def __init__(self, partial: PartialRun, start: Progress, grid: TileGrid, strips: list[Strip],
                 num_classes: int, weight: torch.Tensor, with_probs: bool, writer: Writer) -> None:
        self.partial, self.start, self.grid, self.strips = partial, start, grid, strips
        self.num_classes, self.weight, self.with_probs, self.writer = num_classes, weight, with_probs, writer
        self.buffer: StripBuffer | None = None
        self.flush_s = 0.0

    def add(self, tile: Tile, wprobs: torch.Tensor | None, valid: torch.Tensor) -> None:
        strip = self.strips[tile.strip]
        if self.buffer is None or self.buffer.strip.index != strip.index:
            y0 = self.start.buffer_start(strip.index)
            self.buffer = StripBuffer(strip, self.grid, self.num_classes, y0, self.weight.device)
        if wprobs is not None:
            self.buffer.add(self.grid.ys[tile.row], self.grid.xs[tile.col], wprobs, self.weight, valid)
        if tile.col == strip.cols[-1]:
            self._flush(tile.row)

    def _flush(self, row: int) -> None:
        grid, buf, partial = self.grid, self.buffer, self.partial
        target = grid.height if row == len(grid.ys) - 1 else grid.ys[row + 1] // BLOCK * BLOCK
        if target <= buf.y0:
            return
        t0 = time.perf_counter()
        chunks = []
        for y0 in range(buf.y0, target, BLOCK):  # buf.y0 is block-aligned: every chunk is a block row
            p, v = buf.blended(y0, min(y0 + BLOCK, target))
            classes = _to_host(first_argmax(p).masked_fill_(~v, NODATA))
            p8 = _to_host(torch.round(p * 255.0).to(torch.uint8).masked_fill_(~v, 0)) if self.with_probs else None
            chunks.append((y0 // BLOCK, classes, p8))
        buf.slide(target)
        self.flush_s += time.perf_counter() - t0
        strip = buf.strip
        for band, classes, p8 in chunks:
            self.writer.submit(functools.partial(partial.save_chunk, band, strip.index, classes, p8))
        # recorded only after the chunks it counts are on disk: the writer runs its jobs in order
        self.writer.submit(functools.partial(partial.record, Progress.after_flush(grid, self.strips, strip, target)))


class ScenePredictor:
    """Segments GeoTIFF scenes of any size with a segmentor ``(B, C, h, w) -> logits (B, K, h, w)``.

    Args:
        model: the segmentor; it is moved to ``device`` and put in eval mode (or an exported model, see
            :class:`seglstm.inference.scene.onnx.OnnxSegmentor`).
        mean, std: per-band normalisation, in the 0..255 scale the inputs are brought to.
        classes, palette: class names and RGB colours; their count must match the model's output.
        tile, overlap: sliding-window size and overlap in pixels.
        batch_size: windows per forward pass.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``: the autocast dtype of the forward pass
            (:func:`seglstm.utils.device.resolve_inference_precision`). ``auto`` is bf16 on CUDA (fp16 where
            bf16 is unsupported) and on a CPU with native bf16 GEMMs (AVX512-BF16 or AMX), float32 on other
            CPUs, where bf16 is emulated and slower. The mLSTM cell runs in float32 under any of them.
        weight_floor: smallest blending weight per axis, at a window's edge (default 1e-3: no seams).
        buffer_mb: memory for the strip buffer, which sets the strip width (never below two tiles).
        strip_width: force a strip width (multiple of 256) instead of deriving it from ``buffer_mb``.
        progress: show a tqdm progress bar.

    After ``predict``, ``profile`` holds its host seconds per phase (see ``PROFILE_PHASES``), for finding
    where a run's time goes (``benchmarks/scene_pipeline.py``).
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
        precision: InferencePrecision = "auto",
        weight_floor: float = WEIGHT_FLOOR,
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
        try:
            self.device = resolve_device(device, what="--device")
        except ValueError as err:
            raise SceneError(str(err)) from err
        self.model = model.to(self.device).eval()
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.classes = [str(c) for c in classes]
        self.palette = [tuple(int(v) for v in c) for c in palette]
        self.tile, self.overlap, self.batch_size = tile, overlap, batch_size
        try:
            self.amp_dtype = resolve_inference_precision(precision, self.device, what="--precision")
        except ValueError as err:
            raise SceneError(str(err)) from err
        log.info("precision %s on %s (--precision %s)", _DTYPE_NAMES[self.amp_dtype], self.device, precision)
        self.weight_floor, self.buffer_mb = weight_floor, buffer_mb
        self.strip_width, self.progress = strip_width, progress
        self.profile = dict.fromkeys(PROFILE_PHASES, 0.0)
        self._digest_cache: tuple[tuple | None, str] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def model_digest(self) -> str:
        """:func:`_model_digest`, hashed again only when a weight changed (its storage or its in-place version
        counter): hashing vil_s's weights costs about a second, which would count against every scene."""
        key = None
        if isinstance(self.model, nn.Module):
            key = tuple((name, t.data_ptr(), t._version) for name, t in self.model.state_dict().items())
        if key is None or self._digest_cache is None or self._digest_cache[0] != key:
            self._digest_cache = (key, _model_digest(self.model))
        return self._digest_cache[1]

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
        cog: bool = False,
        vector: VectorSpec | str | os.PathLike | None = None,
        input_options: InputOptions | None = None,
    ) -> SceneResult:
        """Segment ``input_path`` into ``output_path`` (uint8 class GeoTIFF, nodata 255).

        Args:
            input_path: a raster file, an ``http(s)://`` or ``s3://`` URL, a ``/vsi*`` path or a STAC item
                (with ``input_options.assets``).
            bands: 1-based bands fed to the model, in order; default the first ``len(mean)``.
            scale: ``auto`` (none for uint8, else ``percentile:2,98``), ``none``, ``range:LO,HI`` or
                ``percentile:PLO,PHI``; brings raw values to 0..255 before normalisation.
            probs_path: also write per-class probabilities (uint8 0..255, one band per class).
            preview_path: also write a colour-coded PNG at most ``preview_size`` pixels a side.
            resume: continue the partial run left beside ``output_path`` by an interrupted call with the
                same arguments (a fresh run discards it).
            allow_no_crs: accept an input with neither a CRS nor GCPs (the output then has none either).
            cog: write the class raster (and the probabilities) as Cloud-Optimized GeoTIFFs.
            vector: also write class polygons (a path, or a :class:`VectorSpec` with min-area and
                simplification).
            input_options: STAC assets, nodata override, reprojection.
        """
        started = time.perf_counter()
        self.profile = dict.fromkeys(PROFILE_PHASES, 0.0)
        in_name, out_path = os.fspath(input_path), Path(output_path)
        spec_vec = VectorSpec(Path(vector)) if isinstance(vector, (str, os.PathLike)) else vector
        products = Products(
            out_path,
            None if probs_path is None else Path(probs_path),
            None if preview_path is None else Path(preview_path),
            preview_size,
            cog,
        )
        self._check_targets(in_name, products, spec_vec)
        scale_spec = parse_scale(scale) if isinstance(scale, str) else scale

        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), open_input(in_name, input_options or InputOptions()) as source:
            bands = self._check_source(source, bands, allow_no_crs)
            if spec_vec is not None:  # before inference, not after it
                check_georef(spec_vec, source.crs, bool(source.gcps[0]))
            scaling = compute_scaling(source, bands, scale_spec)
            grid = plan_tiles(source.height, source.width, self.tile, self.overlap)
            strip_width = self._strip_width(grid, len(bands), np.dtype(source.dtypes[0]).itemsize)
            strips = plan_strips(grid, strip_width)
            partial = PartialRun(out_path, {
                "input": source.identity, "size": [grid.height, grid.width], "bands": bands,
                "scaling": scaling, "mean": self.mean, "std": self.std, "classes": self.classes,
                "tile": self.tile, "overlap": self.overlap, "batch_size": self.batch_size,
                "strip_width": strip_width, "weight_floor": self.weight_floor, "probs": probs_path is not None,
                "device": self.device.type, "precision": _DTYPE_NAMES[self.amp_dtype],
                "model": self.model_digest(),
            })
            progress = partial.start(resume)
            tiles = plan_run(grid, strips)
            if progress.next_tile < len(tiles):
                reader = _WindowReader(source, bands, grid, strips)
                normalise = Normaliser(scaling, self.mean, self.std, self.device)
                self._run(reader, normalise, tiles, partial, grid, strips, with_probs=probs_path is not None)
            gcps, gcp_crs = source.gcps
            georef = Georef(source.crs, source.transform, list(gcps), gcp_crs)
            t0 = time.perf_counter()
            write_rasters(partial, grid, strips, products, georef, self.classes, self.palette)
            self.profile["assemble"] += time.perf_counter() - t0
        polygons = 0
        if spec_vec is not None:
            polygons = write_vector(out_path, spec_vec, self.classes, progress=self.progress)
        partial.discard()
        return SceneResult(
            output=out_path,
            probs=products.probs,
            preview=products.preview,
            height=grid.height,
            width=grid.width,
            tiles=len(tiles),
            strips=len(strips),
            resumed_from_tile=progress.next_tile,
            seconds=time.perf_counter() - started,
            vector=None if spec_vec is None else spec_vec.path,
            polygons=polygons,
        )

    # ----------------------------------------------------------------------------------------- checks
    @staticmethod
    def _check_targets(in_name: str, products: Products, vector: VectorSpec | None) -> None:
        extra = {"probabilities": products.probs, "preview": products.preview,
                 "vector": None if vector is None else vector.path}
        targets = [("output", products.classes)] + [(k, Path(p)) for k, p in extra.items() if p is not None]
        in_resolved = None if is_remote(in_name) else Path(in_name).resolve()
        for what, path in targets:
            if path.resolve() == in_resolved:
                raise SceneError(f"{what} {path} would overwrite the input")
            if what in ("output", "probabilities") and path.suffix.lower() not in (".tif", ".tiff"):
                raise SceneError(f"{what} {path}: predict-scene writes a GeoTIFF there; name it .tif (or .tiff)")
            _check_writable(path, what)
        if len({p.resolve() for _, p in targets}) != len(targets):
            raise SceneError(f"output paths must differ: {[str(p) for _, p in targets]}")
        if products.preview_size < 1:
            raise SceneError(f"preview size must be positive, got {products.preview_size}")
        if vector is not None:
            vector.check()

    def _check_source(self, src: SceneInput, bands: Sequence[int] | None, allow_no_crs: bool) -> list[int]:
        n_in, path = len(self.mean), src.name
        if bands is None:
            if src.count < n_in:
                raise SceneError(
                    f"input {path} has {src.count} band(s) but the model takes {n_in}; choose them with --bands"
                )
            bands = list(range(1, n_in + 1))
            if src.count > n_in:  # never silently: a B,G,R,NIR scene would otherwise run as if it were RGB
                log.warning(
                    "input %s has %d bands and the model takes %d: using bands %s and dropping %s; choose "
                    "others with --bands", path, src.count, n_in, ", ".join(src.band_names[:n_in]),
                    ", ".join(src.band_names[n_in:]),
                )
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
        if src.crs is None and not src.gcps[0] and not allow_no_crs:
            raise SceneError(
                f"input {path} has no CRS and no GCPs, so the output could not be georeferenced; "
                "pass --allow-no-crs to write it anyway"
            )
        return bands

    # --------------------------------------------------------------------------------------- inference
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits ``(B, K, h, w)`` for a normalised batch, on the device, checked."""
        with torch.inference_mode(), torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        ):
            logits = self.model(x)
        expected = (x.shape[0], self.num_classes, x.shape[2], x.shape[3])
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise SceneError(
                f"the model returned logits of shape {got} for a batch of shape {tuple(x.shape)}; expected "
                f"{expected}: {self.num_classes} classes as in the palette ({', '.join(self.classes)}), "
                "at the input resolution"
            )
        return logits

    def _batches(self, read: Callable[[Tile], tuple[np.ndarray, np.ndarray, np.ndarray]], normalise: Normaliser,
                 tiles: list[Tile], start: int, device: torch.device) -> Iterator[_Batch]:
        """The batches from ``start`` on, read, stacked, moved to the device and normalised there (in the
        reader thread: on CUDA its kernels queue on the same default stream as the model's, so they are
        ordered before the forward that uses them)."""
        pin = device.type == "cuda"
        if pin:
            torch.cuda.set_device(device)  # the current device is per thread
        for b0 in range(start, len(tiles), self.batch_size):
            batch = tiles[b0 : b0 + self.batch_size]
            inputs = [read(t) for t in batch]
            live = [i for i, (_, _, v) in enumerate(inputs) if v.any()]  # all-nodata windows add nothing

            def to_device(arrays: list[np.ndarray]) -> torch.Tensor:
                return _host_tensor(np.stack(arrays), pin).to(device, non_blocking=True)

            x = None
            if live:
                raw, ok = to_device([inputs[i][0] for i in live]), to_device([inputs[i][1] for i in live])
                t0 = time.perf_counter()
                x = normalise(raw, ok)
                self.profile["normalise"] += time.perf_counter() - t0
            yield _Batch(batch, live, x, to_device([v for _, _, v in inputs]))

    def _run(
        self,
        read: Callable[[Tile], tuple[np.ndarray, np.ndarray, np.ndarray]],
        normalise: Normaliser,
        tiles: list[Tile],
        partial: PartialRun,
        grid: TileGrid,
        strips: list[Strip],
        *,
        with_probs: bool,
    ) -> None:
        dev, prof = self.device, self.profile
        if dev.type == "cuda" and dev.index is None:  # the reader thread must use the caller's device
            dev = torch.device("cuda", torch.cuda.current_device())
        weight = torch.from_numpy(window_weight(grid.tile_h, grid.tile_w, self.weight_floor)).to(dev)
        progress = partial.progress  # as loaded: what the chunks held when this run started
        start = progress.first_batch(self.batch_size)
        bar = tqdm(total=len(tiles), initial=start, unit="tile", desc="predict-scene", disable=not self.progress)
        produce = functools.partial(self._batches, read, normalise, tiles, start, dev)
        with bar, Writer() as writer, Prefetcher(produce) as batches:
            blender = _Blender(partial, progress, grid, strips, self.num_classes, weight, with_probs, writer)
            waited = time.perf_counter()
            for batch in batches:
                t0 = time.perf_counter()
                prof["read_wait"] += t0 - waited
                results: dict[int, torch.Tensor] = {}
                if batch.live:
                    logits = self._forward(batch.x)
                    t1 = time.perf_counter()
                    batch.x = None
                    probs = torch.softmax(logits.float(), dim=1)
                    del logits  # one batch-sized tensor fewer at the peak
                    results = dict(zip(batch.live, probs.mul_(weight)))
                    prof["forward"] += t1 - t0
                    t0 = t1
                for i, tile in enumerate(batch.tiles):
                    bar.update(1)
                    if not progress.accounted(tile.index):
                        blender.add(tile, results.get(i), batch.valid[i])
                results.clear()
                prof["blend"] += time.perf_counter() - t0
                waited = time.perf_counter()
            closing = time.perf_counter()
        # the flushes (and the hand-overs to the writer in them) ran inside the blend's time
        prof["blend"] -= blender.flush_s + writer.wait_s
        prof["flush"] += blender.flush_s
        prof["write_wait"] += writer.wait_s + time.perf_counter() - closing
        prof["reader"] += batches.busy_s
        prof["writer"] += writer.busy_s


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
    run_keys = {"bands", "scale", "probs_path", "preview_path", "preview_size", "resume", "allow_no_crs",
                "cog", "vector", "input_options"}
    run_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in run_keys}
    predictor = ScenePredictor(model, mean, std, classes, palette, **kwargs)
    return predictor.predict(input_path, output_path, **run_kw)

