"""From raw band values to the model's input: 0..255 scaling (as the training images were) then mean/std.

Percentile bounds come from one decimated read, so their cost does not grow with the scene.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from seglstm.inference.scene.errors import SceneError
from seglstm.inference.scene.source import SceneInput

log = logging.getLogger(__name__)

TRAIN_RANGE = 255.0  # inputs are scaled to 0..TRAIN_RANGE, the scale the normalisation stats were taken in


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
    source: SceneInput, bands: Sequence[int], spec: ScaleSpec, max_side: int = 1024
) -> tuple[list[float], list[float]] | None:
    """Per-band ``(low, high)`` mapped to 0..255, or None to pass values through.

    Percentiles come from a decimated read (at most ``max_side`` pixels a side; GDAL uses overviews when
    the file has them). A band without any valid pixel (an all-nodata scene) gets ``(0, 1)``: none of its
    pixels reaches the model, so the bounds only need to be finite.
    """
    mode = spec.mode
    if mode == "auto":
        mode = "none" if source.dtypes[bands[0] - 1] == "uint8" else "percentile"
        spec = ScaleSpec("percentile", 2.0, 98.0) if mode == "percentile" else spec
    if mode == "none":
        return None
    if mode == "range":
        return [spec.low] * len(bands), [spec.high] * len(bands)
    factor = max(1, -(-max(source.height, source.width) // max_side))
    shape = (-(-source.height // factor), -(-source.width // factor))
    data, band_valid, valid = source.read(bands, out_shape=shape)
    lows, highs = [], []
    for band, values, ok in zip(bands, data.astype(np.float64), band_valid):
        sample = values[ok & valid]
        if sample.size == 0:
            log.warning("%s: band %d has no valid pixel; its scaling is a placeholder", source.name, band)
            lows.append(0.0)
            highs.append(1.0)
            continue
        low, high = np.percentile(sample, [spec.low, spec.high])
        lows.append(float(low))
        highs.append(float(high) if high > low else float(low) + 1.0)
    return lows, highs


class Normaliser:
    """Scaling to 0..255 then ``(x - mean) / std``; bands without a value at a pixel get 0 (the mean).

    It runs as torch ops on ``device`` (the model's), on a batch ``(B, C, h, w)`` of raw values, so only
    the raw values and the validity masks cross to the device; the constants are computed in NumPy float32
    as the host arithmetic always was, so the result is the same float32 on any device.
    """

    def __init__(
        self,
        scaling: tuple[list[float], list[float]] | None,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str = "cpu",
    ) -> None:
        def put(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(device)

        self.low = self.gain = None
        if scaling is not None:
            low, high = (np.asarray(v, np.float32)[:, None, None] for v in scaling)
            self.low, self.gain = put(low), put(np.float32(TRAIN_RANGE) / (high - low))
        self.mean = put(np.asarray(mean, np.float32)[:, None, None])
        self.inv_std = put((1.0 / np.asarray(std, np.float64)).astype(np.float32)[:, None, None])

    def __call__(self, raw: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """``raw`` values and ``ok`` (the band has a value at a valid pixel), both ``(..., C, h, w)``."""
        x = raw.to(torch.float32)
        if self.low is not None:
            x = ((x - self.low) * self.gain).clamp_(0.0, TRAIN_RANGE)
        x = (x - self.mean) * self.inv_std
        return x.masked_fill_(~ok, 0.0)
