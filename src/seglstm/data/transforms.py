"""Joint image/mask transforms on sample dicts, reproducing the seed's mmseg pipeline.

A sample is ``{"image": float32 C x H x W, "mask": int64 H x W (optional), "path": str, ...}``. Geometric
ops call ``torchvision.transforms.v2.functional`` on ``tv_tensors.Image`` / ``tv_tensors.Mask`` (bilinear
without antialiasing for images, which is OpenCV's INTER_LINEAR that mmcv uses; nearest for masks, which
is OpenCV's INTER_NEAREST). ``RandomCrop`` with ``cat_max_ratio`` and ``PhotoMetricDistortion`` have no
torchvision counterpart and are written here.

Randomness: every random transform draws only from the ``torch.Generator`` passed to ``__call__``. The
datasets build one generator per item from ``item_seed(seed, epoch, index)``, so an item's augmentation
depends on nothing but those three numbers: not on the worker that loads it, the number of workers, the
rank, or what was loaded before. The epoch reaches DataLoader workers inside the sampled index (see
``seglstm.data.base.EpochSampler``), which stays correct with persistent workers and under DDP.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from seglstm.data.io import DataError

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)

Sample = dict[str, Any]


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one item of one epoch (SeedSequence hashing, not ``seed + index``)."""
    if min(seed, epoch, index) < 0:
        raise ValueError(f"item_seed needs non-negative seed/epoch/index, got {seed}, {epoch}, {index}")
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Integer in ``[low, high)`` (numpy's ``randint`` convention, which mmseg's transforms use)."""
    return int(torch.randint(low, high, (1,), generator=generator))


def _path(sample: Sample) -> str:
    return str(sample.get("path", "<sample>"))


class Transform:
    """A joint transform; random subclasses draw only from ``generator`` (``None``: torch's global RNG)."""

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Compose(Transform):
    """Apply transforms in order with one shared generator; plain callables get the sample only."""

    def __init__(self, transforms: Sequence[Callable[..., Sample]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        for t in self.transforms:
            sample = t(sample, generator) if isinstance(t, Transform) else t(sample)
        return sample

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"Compose([{inner}\n])"


def rescale_size(height: int, width: int, scale: Sequence[float]) -> tuple[int, int]:
    """Output ``(h, w)`` of mmcv's keep-ratio rescale: fit the long edge in ``max(scale)`` and the short
    edge in ``min(scale)``, rounding half up; never below one pixel (a thin strip would otherwise round
    to an empty image, which no resize accepts)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def _resize(sample: Sample, size: tuple[int, int], resize_mask: bool = True) -> Sample:
    out = dict(sample)
    if tuple(sample["image"].shape[-2:]) == size:
        return out
    image = tv_tensors.Image(sample["image"])
    out["image"] = F.resize(image, list(size), InterpolationMode.BILINEAR, antialias=False).as_subclass(
        torch.Tensor
    )
    if resize_mask and "mask" in sample:
        out["mask"] = F.resize(tv_tensors.Mask(sample["mask"]), list(size)).as_subclass(torch.Tensor)
    return out


def _check_scale(scale: Sequence[int], name: str) -> tuple[int, int]:
    if len(scale) != 2 or min(scale) <= 0:
        raise ValueError(f"{name} must be two positive integers, got {scale!r}")
    return int(scale[0]), int(scale[1])


class Resize(Transform):
    """Deterministic resize; with ``keep_ratio`` the image fits in ``scale`` as mmseg's test ``Resize``.

    Masks use "nearest" as OpenCV's INTER_NEAREST does (source pixel ``floor(dst * scale)``), half a source
    pixel off the bilinear image grid, exactly like the seed's mmcv pipeline.

    Args:
        scale: ``(long, short)`` bounds with ``keep_ratio``, else the exact ``(w, h)`` (mmcv's order).
        keep_ratio: keep the aspect ratio.
        resize_mask: also resize the mask; the seed's test pipeline loads the mask after resizing, so
            evaluation keeps it at the original size (``eval_transforms`` passes ``False``).
    """

    def __init__(self, scale: Sequence[int], keep_ratio: bool = True, resize_mask: bool = True) -> None:
        self.scale = _check_scale(scale, "Resize.scale")
        self.keep_ratio = keep_ratio
        self.resize_mask = resize_mask

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        h, w = sample["image"].shape[-2:]
        size = rescale_size(h, w, self.scale) if self.keep_ratio else (self.scale[1], self.scale[0])
        return _resize(sample, size, self.resize_mask)


class RandomResize(Transform):
    """mmseg's ``RandomResize``: scale ``scale`` by a ratio drawn uniformly from ``ratio_range``."""

    def __init__(
        self,
        scale: Sequence[int] = (2048, 512),
        ratio_range: Sequence[float] = (0.5, 2.0),
        keep_ratio: bool = True,
    ) -> None:
        self.scale = _check_scale(scale, "RandomResize.scale")
        if len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(
                f"RandomResize.ratio_range must be (low, high) with 0 < low <= high, got {ratio_range}"
            )
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        self.keep_ratio = keep_ratio

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        ratio = _uniform(*self.ratio_range, generator)
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        h, w = sample["image"].shape[-2:]
        size = rescale_size(h, w, target) if self.keep_ratio else (target[1], target[0])
        return _resize(sample, size)


class RandomCrop(Transform):
    """mmseg's ``RandomCrop``: a random window of ``crop_size`` (h, w), clipped to the image.

    With ``cat_max_ratio < 1`` a window is redrawn (up to 10 times, as mmseg) while its mask has a single
    non-ignored class or one class covers ``cat_max_ratio`` or more of its non-ignored pixels; after 10
    rejections the 11th draw is kept.
    """

    def __init__(self, crop_size: Sequence[int], cat_max_ratio: float = 1.0, ignore_index: int = 255) -> None:
        self.crop_size = _check_scale(crop_size, "RandomCrop.crop_size")
        if not 0 < cat_max_ratio <= 1:
            raise ValueError(f"RandomCrop.cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = ignore_index

    def _draw(self, h: int, w: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
        top = _randint(0, max(h - self.crop_size[0], 0) + 1, generator)
        left = _randint(0, max(w - self.crop_size[1], 0) + 1, generator)
        return top, left, min(self.crop_size[0], h - top), min(self.crop_size[1], w - left)

    def _acceptable(self, mask: torch.Tensor, box: tuple[int, int, int, int]) -> bool:
        top, left, ch, cw = box
        window = mask[top : top + ch, left : left + cw]
        counts = torch.bincount(window.reshape(-1), minlength=self.ignore_index + 1)
        counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < self.cat_max_ratio

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        h, w = sample["image"].shape[-2:]
        box = self._draw(h, w, generator)
        if self.cat_max_ratio < 1.0 and "mask" in sample:
            for _ in range(10):
                if self._acceptable(sample["mask"], box):
                    break
                box = self._draw(h, w, generator)
        out = dict(sample)
        out["image"] = F.crop(tv_tensors.Image(sample["image"]), *box).as_subclass(torch.Tensor)
        if "mask" in sample:
            out["mask"] = F.crop(tv_tensors.Mask(sample["mask"]), *box).as_subclass(torch.Tensor)
        return out


class RandomFlip(Transform):
    """Flip image and mask together with probability ``prob`` (mmseg default: horizontal)."""

    def __init__(self, prob: float = 0.5, direction: str = "horizontal") -> None:
        if not 0 <= prob <= 1:
            raise ValueError(f"RandomFlip.prob must be in [0, 1], got {prob}")
        if direction not in ("horizontal", "vertical"):
            raise ValueError(f"RandomFlip.direction must be 'horizontal' or 'vertical', got {direction!r}")
        self.prob = prob
        self.direction = direction

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        if not _uniform(0.0, 1.0, generator) < self.prob:
            return sample
        flip = F.horizontal_flip if self.direction == "horizontal" else F.vertical_flip
        out = dict(sample)
        out["image"] = flip(tv_tensors.Image(sample["image"])).as_subclass(torch.Tensor)
        if "mask" in sample:
            out["mask"] = flip(tv_tensors.Mask(sample["mask"])).as_subclass(torch.Tensor)
        return out


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """``3 x H x W`` RGB in [0, 1] -> HSV with hue in degrees [0, 360), saturation and value in [0, 1]."""
    r, g, b = rgb.unbind(0)
    value, _ = rgb.max(0)
    chroma = value - rgb.min(0).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(
        value == r,
        torch.remainder((g - b) / safe, 6.0),
        torch.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    hue = torch.where(chroma > 0, hue * 60.0, torch.zeros_like(hue))
    sat = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)), 0.0)
    return torch.stack([hue, sat, value])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    hue, sat, value = hsv.unbind(0)
    h6 = hue / 60.0
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + h6, 6.0)
        weight = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
        channels.append(value - value * sat * weight)
    return torch.stack(channels)


class PhotoMetricDistortion(Transform):
    """mmseg's ``PhotoMetricDistortion`` on the RGB bands (values in 0..255) of an image with any number of
    bands: ``rgb_bands`` (0-based, default the first three) are distorted, the others (near-infrared,
    elevation, ...) pass through unchanged, since colour jitter has no meaning for them.

    Order and coin flips as mmseg: brightness (50%), then contrast (50%) either right after brightness or
    after the HSV steps (a 50% coin picks which), saturation (50%), hue (50%). Brightness adds
    U(-delta, delta); contrast and saturation multiply by U(low, high); hue shifts by an integer in
    [-hue_delta, hue_delta) in OpenCV's 2-degree units. Each step clips to 0..255; with ``quantize`` the
    result is brought back to integers as mmseg's uint8 round trips do (truncation after brightness and
    contrast, rounding after the HSV steps), otherwise values stay fractional.
    """

    def __init__(
        self,
        brightness_delta: float = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
        quantize: bool = True,
        rgb_bands: Sequence[int] = (0, 1, 2),
    ) -> None:
        if len(rgb_bands) != 3 or len(set(rgb_bands)) != 3 or min(rgb_bands) < 0:
            raise ValueError(f"rgb_bands must be three distinct 0-based band indices, got {list(rgb_bands)}")
        self.rgb_bands = [int(b) for b in rgb_bands]
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = int(hue_delta)
        self.quantize = quantize

    def sample_params(self, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Draw the parameters in mmseg's call order; ``None`` marks a step whose coin said no."""
        params: dict[str, Any] = {"brightness": None, "contrast": None, "saturation": None, "hue": None}
        if _randint(0, 2, generator):
            params["brightness"] = _uniform(-self.brightness_delta, self.brightness_delta, generator)
        params["contrast_first"] = bool(_randint(0, 2, generator))
        if params["contrast_first"] and _randint(0, 2, generator):
            params["contrast"] = _uniform(*self.contrast_range, generator)
        if _randint(0, 2, generator):
            params["saturation"] = _uniform(*self.saturation_range, generator)
        if _randint(0, 2, generator):
            params["hue"] = _randint(-self.hue_delta, self.hue_delta, generator)
        if not params["contrast_first"] and _randint(0, 2, generator):
            params["contrast"] = _uniform(*self.contrast_range, generator)
        return params

    def brightness(self, img: torch.Tensor, delta: float) -> torch.Tensor:
        out = torch.clamp(img + delta, 0.0, 255.0)
        return torch.floor(out) if self.quantize else out

    def contrast(self, img: torch.Tensor, alpha: float) -> torch.Tensor:
        out = torch.clamp(img * alpha, 0.0, 255.0)
        return torch.floor(out) if self.quantize else out

    def _through_hsv(self, img: torch.Tensor, edit: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        out = torch.clamp(hsv_to_rgb(edit(rgb_to_hsv(img / 255.0))) * 255.0, 0.0, 255.0)
        return torch.round(out) if self.quantize else out

    def saturation(self, img: torch.Tensor, alpha: float) -> torch.Tensor:
        def edit(hsv: torch.Tensor) -> torch.Tensor:
            return torch.stack([hsv[0], torch.clamp(hsv[1] * alpha, 0.0, 1.0), hsv[2]])

        return self._through_hsv(img, edit)

    def hue(self, img: torch.Tensor, delta: int) -> torch.Tensor:
        def edit(hsv: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.remainder(hsv[0] + 2.0 * delta, 360.0), hsv[1], hsv[2]])

        return self._through_hsv(img, edit)

    def apply(self, img: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        if params["brightness"] is not None:
            img = self.brightness(img, params["brightness"])
        if params["contrast_first"] and params["contrast"] is not None:
            img = self.contrast(img, params["contrast"])
        if params["saturation"] is not None:
            img = self.saturation(img, params["saturation"])
        if params["hue"] is not None:
            img = self.hue(img, params["hue"])
        if not params["contrast_first"] and params["contrast"] is not None:
            img = self.contrast(img, params["contrast"])
        return img

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        img = sample["image"]
        if max(self.rgb_bands) >= img.shape[0]:
            raise DataError(
                f"{_path(sample)}: PhotoMetricDistortion distorts bands {self.rgb_bands} (rgb_bands) but the "
                f"image has {img.shape[0]} band(s) (turn photometric distortion off for this data)"
            )
        rgb = img[self.rgb_bands]
        if float(rgb.max()) > 255.5 or float(rgb.min()) < -0.5:  # bilinear resizing can overshoot by ~1e-5
            raise DataError(
                f"{_path(sample)}: PhotoMetricDistortion expects 8-bit values in its RGB bands, 0..255, got "
                f"{float(rgb.min()):g}..{float(rgb.max()):g} (turn photometric distortion off for this data)"
            )
        out = dict(sample)
        distorted = self.apply(rgb.to(torch.float32).clamp(0.0, 255.0), self.sample_params(generator))
        if img.shape[0] == 3 and self.rgb_bands == [0, 1, 2]:
            out["image"] = distorted
        else:
            image = img.to(torch.float32).clone()
            image[self.rgb_bands] = distorted
            out["image"] = image
        return out


class Normalize(Transform):
    """``(image - mean) / std`` per channel (the seed's mean/std by default)."""

    def __init__(self, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> None:
        if len(mean) != len(std):
            raise ValueError(f"Normalize: mean has {len(mean)} values but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"Normalize: std values must be positive, got {list(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        img = sample["image"]
        if img.shape[0] != len(self.mean):
            raise DataError(
                f"{_path(sample)}: image has {img.shape[0]} channel(s) but mean/std have {len(self.mean)} values"
            )
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        out = dict(sample)
        out["image"] = (img.to(torch.float32) - mean) / std
        return out


class PadTo(Transform):
    """Pad bottom/right to at least ``size`` (h, w) and/or a multiple of ``size_divisor``.

    The image is padded with ``pad_val`` (0, after normalization as mmseg's data preprocessor) and the
    mask with ``seg_pad_val`` (255 = ignored).
    """

    def __init__(
        self,
        size: Sequence[int] | None = None,
        size_divisor: int | None = None,
        pad_val: float = 0.0,
        seg_pad_val: int = 255,
    ) -> None:
        if size is None and size_divisor is None:
            raise ValueError("PadTo needs size and/or size_divisor")
        self.size = None if size is None else _check_scale(size, "PadTo.size")
        if size_divisor is not None and size_divisor <= 0:
            raise ValueError(f"PadTo.size_divisor must be positive, got {size_divisor}")
        self.size_divisor = size_divisor
        self.pad_val = pad_val
        self.seg_pad_val = seg_pad_val

    def target(self, height: int, width: int) -> tuple[int, int]:
        if self.size is not None:
            height, width = max(height, self.size[0]), max(width, self.size[1])
        if self.size_divisor is not None:
            d = self.size_divisor
            height, width = math.ceil(height / d) * d, math.ceil(width / d) * d
        return height, width

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        h, w = sample["image"].shape[-2:]
        th, tw = self.target(h, w)
        if (th, tw) == (h, w):
            return sample
        padding = [0, 0, tw - w, th - h]
        out = dict(sample)
        out["image"] = F.pad(tv_tensors.Image(sample["image"]), padding, fill=self.pad_val).as_subclass(
            torch.Tensor
        )
        if "mask" in sample:
            out["mask"] = F.pad(tv_tensors.Mask(sample["mask"]), padding, fill=self.seg_pad_val).as_subclass(
                torch.Tensor
            )
        return out


def train_transforms(
    crop_size: Sequence[int] = (512, 512),
    scale: Sequence[int] = (2048, 512),
    ratio_range: Sequence[float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
    photometric: bool = True,
    ignore_index: int = 255,
) -> Compose:
    """The seed's training pipeline, then normalization and padding to ``crop_size``."""
    steps: list[Transform] = [
        RandomResize(scale, ratio_range, keep_ratio=True),
        RandomCrop(crop_size, cat_max_ratio=cat_max_ratio, ignore_index=ignore_index),
        RandomFlip(flip_prob),
    ]
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps += [Normalize(mean, std), PadTo(size=crop_size, seg_pad_val=ignore_index)]
    return Compose(steps)


def eval_transforms(
    scale: Sequence[int] | None = (1024, 1024),
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
) -> Compose:
    """The seed's test pipeline: keep-ratio resize of the image only (masks stay at the original size, as
    mmseg loads them after resizing), then normalization. ``scale=None`` keeps the image size."""
    steps: list[Transform] = []
    if scale is not None:
        steps.append(Resize(scale, keep_ratio=True, resize_mask=False))
    steps.append(Normalize(mean, std))
    return Compose(steps)
