"""Shared machinery of the segmentation datasets: file pairing, validated loading, label mapping,
per-item seeding, batching and plotting."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from seglstm.data.io import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    DataError,
    DatasetNotFoundError,
    image_size,
    item_error,
    read_image,
    read_mask,
)
from seglstm.data.transforms import Sample, Transform, item_seed

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_LIST_LIMIT = 10


def _some(items: Sequence[Any]) -> str:
    shown = ", ".join(str(i) for i in items[:_LIST_LIMIT])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _LIST_LIMIT else "")


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a directory, else a :class:`DatasetNotFoundError` that says what was expected."""
    if not path.is_dir():
        raise DatasetNotFoundError(f"{what} not found: {path} is not a directory")
    return path


def _by_key(folder: Path, suffix: str) -> dict[str, Path]:
    """Files of ``folder`` named ``<key><suffix>`` (suffix matched case-insensitively), keyed by ``key``."""
    low = suffix.lower()
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name.lower().endswith(low) and len(p.name) > len(suffix):
            found[p.name[: -len(suffix)]] = p
    return found


def _warn_unmatched(folder: Path, suffix: str, kind: str) -> None:
    """Other image files in a data folder are reported, never skipped without a word."""
    low = suffix.lower()
    others = sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.lower().endswith(low)
    )
    if others:
        warnings.warn(
            f"{folder}: {len(others)} {kind} file(s) do not end with {suffix!r} and are not used: {_some(others)}",
            stacklevel=3,
        )


def pair_files(
    img_dir: Path, ann_dir: Path, img_suffix: str = ".png", ann_suffix: str = ".png"
) -> list[tuple[Path, Path]]:
    """Pair ``<key><img_suffix>`` images with ``<key><ann_suffix>`` masks (mmseg's suffix rule).

    Raises :class:`DataError` listing every image without a mask and every mask without an image.
    """
    images, masks = _by_key(img_dir, img_suffix), _by_key(ann_dir, ann_suffix)
    _warn_unmatched(img_dir, img_suffix, "image")
    _warn_unmatched(ann_dir, ann_suffix, "mask")
    if not images:
        raise DataError(f"{img_dir}: no images ending with {img_suffix!r}")
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    problems = []
    if no_mask:
        problems.append(
            f"{len(no_mask)} image(s) in {img_dir} have no mask in {ann_dir}: "
            + _some([images[k].name for k in no_mask])
        )
    if no_image:
        problems.append(
            f"{len(no_image)} mask(s) in {ann_dir} have no image in {img_dir}: "
            + _some([masks[k].name for k in no_image])
        )
    if problems:
        raise DataError("; ".join(problems))
    return [(images[k], masks[k]) for k in sorted(images)]


def collate(samples: Sequence[Sample]) -> dict[str, Any]:
    """Batch sample dicts; images of different sizes are padded bottom/right (image 0, mask 255).

    Returns ``image`` (B, C, H, W), ``mask`` (B, H, W) when every sample has one, ``path`` (list),
    ``ori_shape`` (list of the files' (H, W)) and ``img_shape`` (list of each image's (H, W) before
    batch padding, to crop predictions back).
    """
    if not samples:
        raise ValueError("collate: empty batch")
    images = [s["image"] for s in samples]
    img_shapes = [tuple(int(v) for v in im.shape[-2:]) for im in images]
    height = max(h for h, _ in img_shapes)
    width = max(w for _, w in img_shapes)
    batch: dict[str, Any] = {}
    if all(s == (height, width) for s in img_shapes):
        batch["image"] = torch.stack(images)
    else:
        batch["image"] = images[0].new_zeros((len(images), images[0].shape[0], height, width))
        for i, im in enumerate(images):
            batch["image"][i, :, : im.shape[-2], : im.shape[-1]] = im
    with_mask = ["mask" in s for s in samples]
    if any(with_mask) and not all(with_mask):
        raise ValueError("collate: some samples have a mask and others do not")
    if all(with_mask):
        masks = [s["mask"] for s in samples]
        mh = max(m.shape[-2] for m in masks)
        mw = max(m.shape[-1] for m in masks)
        batch["mask"] = masks[0].new_full((len(masks), mh, mw), 255)
        for i, m in enumerate(masks):
            batch["mask"][i, : m.shape[-2], : m.shape[-1]] = m
    batch["path"] = [str(s["path"]) for s in samples]
    batch["ori_shape"] = [tuple(s["ori_shape"]) for s in samples]
    batch["img_shape"] = img_shapes
    return batch


class EpochSampler(Sampler):
    """Seeded shuffling that hands the epoch to the dataset inside every index: yields ``(epoch, index)``.

    Lightning calls ``set_epoch`` before each training epoch (and forwards it through the
    ``DistributedSamplerWrapper`` it puts around this sampler under DDP), so each item's augmentation seed
    ``item_seed(seed, epoch, index)`` changes every epoch and differs between the ranks' disjoint shards,
    while workers, persistent or not, receive the epoch with the index instead of through shared state.
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True) -> None:
        if length <= 0:
            raise ValueError(f"EpochSampler needs a non-empty dataset, got length {length}")
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, 0) ^ 0x5EED)
            order = torch.randperm(self.length, generator=gen).tolist()
        else:
            order = range(self.length)
        epoch = self.epoch
        return ((epoch, i) for i in order)

    def __len__(self) -> int:
        return self.length


class SegDataset(Dataset):
    """Base class: a list of (image, mask-or-None) files plus the label conventions of one dataset.

    Subclasses set the class attributes and fill ``self.files`` in ``__init__``. Indexing accepts an ``int``
    (uses ``self.epoch``) or an ``(epoch, index)`` pair from :class:`EpochSampler`.
    """

    classes: tuple[str, ...] = ()
    palette: list[tuple[int, int, int]] = []  # noqa: RUF012 - overridden per dataset, never mutated
    splits: tuple[str, ...] = ()
    ignore_index: int = 255
    reduce_zero_label: bool = True
    """Stored value 0 means "no data" (ignored) and class k is stored as k + 1, as in mmseg's datasets."""

    def __init__(
        self,
        split: str,
        transforms: Callable[..., Sample] | None = None,
        seed: int = 0,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        channels: int | None = 3,
        bands: Sequence[int] | None = None,
    ) -> None:
        if split not in self.splits:
            raise ValueError(
                f"split={split!r} is not a split of {type(self).__name__}; choose one of {self.splits}"
            )
        if max_pixels is not None and max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive or None, got {max_pixels}")
        self.split = split
        self.transforms = transforms
        self.seed = int(seed)
        self.epoch = 0
        self.max_pixels = max_pixels
        self.channels = channels
        self.bands = None if bands is None else [int(b) for b in bands]
        self.files: list[tuple[Path, Path | None]] = []
        self._lut: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, items={len(self)}, classes={self.num_classes})"

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for plain ``int`` indices (``(epoch, index)`` keys carry their own)."""
        self.epoch = int(epoch)

    def verify_sizes(self) -> None:
        """Compare image and mask sizes from the file headers; raise naming every mismatched pair."""
        bad = []
        for img, ann in self.files:
            if ann is None:
                continue
            a, b = image_size(img, self.max_pixels), image_size(ann, self.max_pixels)
            if a != b:
                bad.append(f"{ann} is {b[1]}x{b[0]} but {img.name} is {a[1]}x{a[0]}")
        if bad:
            raise DataError(f"{len(bad)} mask(s) differ in size from their image: {_some(bad)}")

    def label_lut(self) -> np.ndarray:
        """Stored value -> train id (``ignore_index`` for ignored), -1 for values outside the range."""
        if self._lut is None:
            lut = np.full(256, -1, dtype=np.int16)
            n = self.num_classes
            if self.reduce_zero_label:
                lut[0] = self.ignore_index
                lut[1 : n + 1] = np.arange(n)
            else:
                lut[:n] = np.arange(n)
            lut[self.ignore_index] = self.ignore_index
            self._lut = lut
        return self._lut

    def map_labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Map stored values to train ids, raising on values the dataset does not define."""
        lut = self.label_lut()
        if raw.size and (int(raw.min()) < 0 or int(raw.max()) >= lut.size):
            bad = np.unique(raw[(raw < 0) | (raw >= lut.size)])
        else:
            mapped = lut[raw]
            if not (mapped < 0).any():
                return mapped.astype(np.int64)
            bad = np.unique(raw[mapped < 0])
        valid = np.flatnonzero(lut >= 0)
        raise DataError(
            f"{path}: label values {_some(bad.tolist())} are outside this dataset's range "
            f"(stored values {valid[0]}..{valid[-2]} and {self.ignore_index} = ignore)"
        )

    def load(self, index: int) -> Sample:
        """Read, check and convert one item, before any transform."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {self!r}")
        img_path, ann_path = self.files[index]
        image = read_image(img_path, channels=self.channels, bands=self.bands, max_pixels=self.max_pixels)
        sample: Sample = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32)),
            "path": str(img_path),
            "ori_shape": (int(image.shape[0]), int(image.shape[1])),
        }
        if ann_path is not None:
            raw = read_mask(ann_path, max_pixels=self.max_pixels)
            if raw.shape != image.shape[:2]:
                raise DataError(
                    f"{ann_path}: mask is {raw.shape[1]}x{raw.shape[0]} but its image {img_path.name} is "
                    f"{image.shape[1]}x{image.shape[0]}"
                )
            sample["mask"] = torch.from_numpy(self.map_labels(raw, ann_path))
        return sample

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {self!r}")
        try:
            return self._get(epoch, index)
        except Exception as err:
            raise item_error(err, self.item_path(index), index) from err

    def item_path(self, index: int) -> str | Path:
        """The file an error while loading item ``index`` names."""
        return self.files[index][0]

    def load_item(self, epoch: int, index: int) -> Sample:
        """Item ``index`` of ``epoch`` before any transform (file datasets: the same in every epoch)."""
        return self.load(index)

    def _get(self, epoch: int, index: int) -> Sample:
        sample = self.load_item(epoch, index)
        if self.transforms is None:
            return sample
        seed = item_seed(self.seed, epoch, index % len(self))
        if isinstance(self.transforms, Transform):
            return self.transforms(sample, torch.Generator().manual_seed(seed))
        with torch.random.fork_rng(devices=[]):  # foreign transforms use torch's global RNG
            torch.manual_seed(seed)
            return self.transforms(sample)

    def plot(self, sample: Sample, alpha: float = 0.5, title: str | None = None) -> Figure:
        """Image, and (when present) its mask and an overlay coloured with the dataset's palette."""
        return plot_sample(sample, self.classes, self.palette, self.ignore_index, alpha=alpha, title=title)


def _display_image(image: torch.Tensor) -> np.ndarray:
    """``C x H x W`` in any range -> ``H x W x 3`` floats in [0, 1] (first three bands)."""
    arr = image.detach().cpu().to(torch.float32).numpy()
    arr = arr[:3] if arr.shape[0] >= 3 else np.repeat(arr[:1], 3, axis=0)
    arr = arr.transpose(1, 2, 0)
    if arr.min() >= 0 and arr.max() <= 255 and arr.max() > 1.5:
        return arr / 255.0
    lo, hi = np.percentile(arr, 2, axis=(0, 1)), np.percentile(arr, 98, axis=(0, 1))
    return np.clip((arr - lo) / np.maximum(hi - lo, 1e-6), 0.0, 1.0)


def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int = 255) -> np.ndarray:
    """Train-id mask -> ``H x W x 3`` uint8 colours; ignored pixels and ids beyond the palette black."""
    mask = np.asarray(mask)
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"mask values must be in 0..255 to colourise, got {mask.min()}..{mask.max()}")
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    table[ignore_index] = 0
    return table[mask.astype(np.int64)]


def plot_sample(
    sample: Sample,
    classes: Sequence[str],
    palette: Sequence[Sequence[int]],
    ignore_index: int = 255,
    alpha: float = 0.5,
    title: str | None = None,
) -> Figure:
    """Matplotlib figure of a sample (and of ``sample["prediction"]`` when present)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image = _display_image(sample["image"])
    layers = [(k, sample[k]) for k in ("mask", "prediction") if k in sample]
    fig = Figure(figsize=(4 * (1 + 2 * len(layers)) if layers else 4, 4.4), layout="constrained")
    axes = fig.subplots(1, 1 + 2 * len(layers), squeeze=False)[0]
    axes[0].imshow(image)
    axes[0].set_title("image")
    for i, (name, layer) in enumerate(layers):
        lab = layer.detach().cpu().numpy() if isinstance(layer, torch.Tensor) else np.asarray(layer)
        if lab.shape != image.shape[:2]:  # eval samples keep masks at the original size
            idx_h = (np.arange(image.shape[0]) * lab.shape[0] // image.shape[0])[:, None]
            idx_w = (np.arange(image.shape[1]) * lab.shape[1] // image.shape[1])[None, :]
            lab = lab[idx_h, idx_w]
        colours = colorize(lab, palette, ignore_index).astype(np.float32) / 255.0
        valid = (lab != ignore_index)[..., None]
        overlay = np.where(valid, (1 - alpha) * image + alpha * colours, image)
        axes[1 + 2 * i].imshow(colours)
        axes[1 + 2 * i].set_title(name)
        axes[2 + 2 * i].imshow(overlay)
        axes[2 + 2 * i].set_title(f"{name} overlay")
    for ax in axes:
        ax.set_axis_off()
    if layers:
        handles = [Patch(color=np.asarray(c) / 255.0, label=n) for n, c in zip(classes, palette)]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 7), fontsize=8)
    fig.suptitle(title if title is not None else Path(str(sample.get("path", ""))).name, fontsize=9)
    return fig
