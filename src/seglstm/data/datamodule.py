"""LightningDataModule over the datasets, with the seed's training and test pipelines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from seglstm.data.base import EpochSampler, SegDataset, collate
from seglstm.data.folder import ImageFolder, SegFolder
from seglstm.data.io import DEFAULT_MAX_PIXELS, DatasetNotFoundError
from seglstm.data.registry import build_dataset, dataset_class, dataset_kwargs, dataset_meta
from seglstm.data.transforms import MEAN, STD, eval_transforms, train_transforms


def _pair(value: Any, name: str, kind: type, positive: bool = True) -> tuple:
    if value is None or len(value) != 2:
        raise ValueError(f"{name} must be two numbers, got {value!r}")
    out = tuple(kind(v) for v in value)
    if positive and min(out) <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return out


class SegDataModule(L.LightningDataModule):
    """Train / val / test / predict loaders for one dataset.

    Batches are dicts: ``image`` (B, C, H, W) normalized float32, ``mask`` (B, H, W) int64 with 255 =
    ignore (absent for predict), ``path`` (list[str]), ``ori_shape`` (list of the files' (H, W)) and
    ``img_shape`` (list of each image's (H, W) inside the batch). In val/test batches the image is resized
    by ``test_scale`` while the mask keeps the file's size, as mmseg evaluates: resize logits to
    ``mask.shape[-2:]`` (or ``ori_shape``) before scoring.

    Training items are augmented by generators seeded from ``(seed, epoch, index)``: the train sampler
    hands the epoch to the dataset with every index, Lightning calls its ``set_epoch`` each epoch (and
    forwards it through the distributed wrapper under DDP), so augmentations change every epoch, differ
    across ranks (whose indices are disjoint) and do not depend on the number of workers.

    Args:
        dataset: ``loveda``, ``potsdam``, ``vaihingen``, ``folder`` or ``scenes``.
        root: dataset root.
        batch_size: training batch size per device.
        val_batch_size: batch size for val/test/predict (images of different size are padded).
        num_workers: DataLoader worker processes (persistent when > 0).
        crop_size: training crop (h, w); batches are padded to it.
        train_scale: RandomResize scale (long, short) before the ``ratio_range`` factor.
        ratio_range: RandomResize ratio range.
        cat_max_ratio: RandomCrop's largest share of one class (1.0 disables the check).
        test_scale: keep-ratio resize bounds for val/test/predict images; ``None`` keeps the size.
        domain: LoveDA domain (``urban``, ``rural`` or ``both``).
        classes_file: class list for ``folder`` (default ``root/classes.yaml``).
        bands: 0-based bands of multi-band ``folder`` images.
        mean, std: per-channel normalization; ``None`` = the seed's RGB statistics (required with ``bands``).
        predict_root: folder of images for ``predict``.
        seed: seed of shuffling and augmentation.
        max_pixels: decompression-bomb cap per file (``None`` disables it).
        test_split: split used by ``test`` (the seed tests on ``val``; LoveDA's ``test`` has no masks).
        photometric: use PhotoMetricDistortion on the first three bands (8-bit RGB; other bands untouched).
        flip_prob: horizontal flip probability.
        img_suffix, ann_suffix: file-name endings for ``potsdam``/``vaihingen``/``folder`` (default ``.png``).
        scenes: the ``scenes.yaml`` of dataset ``scenes`` (GeoTIFF scenes with vector or raster labels; see
            :mod:`seglstm.data.scenes`); ``root`` is then unused and ``test_scale`` must be ``None``.
    """

    def __init__(
        self,
        dataset: str = "loveda",
        root: str = "data/synthetic",
        batch_size: int = 8,
        val_batch_size: int = 1,
        num_workers: int = 2,
        crop_size: tuple[int, int] = (512, 512),
        train_scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        test_scale: tuple[int, int] | None = (1024, 1024),
        domain: str = "both",
        classes_file: str | None = None,
        bands: list[int] | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        predict_root: str | None = None,
        seed: int = 0,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        test_split: str = "val",
        photometric: bool = True,
        flip_prob: float = 0.5,
        img_suffix: str | None = None,
        ann_suffix: str | None = None,
        scenes: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.dataset_cls = dataset_class(dataset)
        self.dataset = dataset.lower()
        self.root = Path(root)
        if self.dataset == "scenes" and test_scale is not None:
            raise ValueError(
                f"test_scale={list(test_scale)!r}: set data.test_scale: null for dataset 'scenes' (val/test "
                "windows are scored at the scene's resolution, as predict-scene maps it)"
            )
        if self.dataset != "scenes" and not self.root.is_dir():
            hint = (
                f" (for the synthetic stand-in run `seglstm synth --out {root}`)"
                if self.dataset == "loveda"
                else ""
            )
            raise DatasetNotFoundError(f"root={root!r} is not a directory{hint}")
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("val_batch_size", val_batch_size, 1),
            ("num_workers", num_workers, 0),
        ):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.crop_size = _pair(crop_size, "crop_size", int)
        self.train_scale = _pair(train_scale, "train_scale", int)
        self.ratio_range = _pair(ratio_range, "ratio_range", float)
        if self.ratio_range[0] > self.ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with low <= high, got {ratio_range!r}")
        if not 0 < cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        self.cat_max_ratio = cat_max_ratio
        self.test_scale = None if test_scale is None else _pair(test_scale, "test_scale", int)
        if not 0 <= flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.flip_prob = flip_prob
        if max_pixels is not None and max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive or None, got {max_pixels}")
        self.kwargs = dataset_kwargs(
            self.dataset, domain, classes_file, bands, img_suffix, ann_suffix, max_pixels, scenes,
            self.crop_size if self.dataset == "scenes" else None,
        )
        self.bands = None if bands is None else [int(b) for b in bands]
        self.mean, self.std = self._normalization(mean, std)
        if self.bands is not None and photometric and len(self.bands) < 3:
            raise ValueError(f"photometric=True needs 3 bands (RGB), got bands={bands}; set photometric: false")
        self.photometric = photometric
        if test_split not in self.dataset_cls.splits and self.dataset_cls is not SegFolder:
            raise ValueError(f"test_split={test_split!r} is not one of {self.dataset_cls.splits}")
        self.test_split = test_split
        if predict_root is not None and not Path(predict_root).is_dir():
            raise DatasetNotFoundError(f"predict_root={predict_root!r} is not a directory")
        self.predict_root = predict_root
        self.seed = seed
        self._meta = dataset_meta(self.dataset, self.root, classes_file, scenes)
        self.datasets: dict[str, Dataset] = {}

    def _normalization(self, mean: list[float] | None, std: list[float] | None) -> tuple[tuple, tuple]:
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither (the seed's RGB statistics)")
        if mean is None or std is None:
            if self.bands is not None and len(self.bands) != 3:
                raise ValueError(
                    f"bands={self.bands} needs a per-band mean and std of {len(self.bands)} values each "
                    "(`seglstm check-data CONFIG` prints them for your data)"
                )
            return MEAN, STD
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} values but std has {len(std)}")
        channels = (
            len(self.bands) if self.bands is not None else (3 if self.dataset_cls is not SegFolder else None)
        )
        if channels is not None and len(mean) != channels:
            raise ValueError(f"mean/std have {len(mean)} values but the images have {channels} channels")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be positive, got {std}")
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)

    # ------------------------------------------------------------------ metadata
    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self._meta["classes"])

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        return [tuple(c) for c in self._meta["palette"]]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def ignore_index(self) -> int:
        return self.dataset_cls.ignore_index

    # ------------------------------------------------------------------ datasets
    def build_split(self, split: str, train: bool = False) -> SegDataset:
        """The dataset of ``split`` with the training or the evaluation pipeline."""
        transforms = (
            train_transforms(
                self.crop_size,
                self.train_scale,
                self.ratio_range,
                self.cat_max_ratio,
                self.flip_prob,
                self.mean,
                self.std,
                photometric=self.photometric,
                ignore_index=self.ignore_index,
            )
            if train
            else eval_transforms(self.test_scale, self.mean, self.std)
        )
        return build_dataset(
            self.dataset, self.root, split, transforms=transforms, seed=self.seed, **self.kwargs
        )

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and "train" not in self.datasets:
            self.datasets["train"] = self.build_split("train", train=True)
        if stage in ("fit", "validate", None) and "val" not in self.datasets:
            self.datasets["val"] = self.build_split("val")
        if stage in ("test", None) and "test" not in self.datasets:
            self.datasets["test"] = self.build_split(self.test_split)
        if stage == "predict" and "predict" not in self.datasets:
            if self.predict_root is None:
                raise ValueError("predict needs predict_root (a folder of images)")
            self.datasets["predict"] = ImageFolder(
                self.predict_root,
                eval_transforms(self.test_scale, self.mean, self.std),
                channels=len(self.bands) if self.bands is not None else 3,
                bands=self.bands,
                max_pixels=self.kwargs["max_pixels"],
            )

    def scan(self, split: str = "val", progress: bool = True) -> None:
        """Check ``split`` cheaply before any work (:func:`seglstm.data.check.scan_dataset`: headers, truncated
        files, mask sizes and label values), so a bad val file fails now rather than at the first validation.

        Raises:
            DataError listing the first problems (``seglstm check-data`` lists all of them).
        """
        from seglstm.data.check import scan_dataset
        from seglstm.data.io import DataError

        if self.dataset == "scenes":  # building the split opens every image and label file and plans its windows
            self.build_split(split)
            return

        problems = scan_dataset(self.build_split(split), num_workers=self.num_workers, progress=progress)
        if problems:
            shown = "; ".join(problems[:3]) + (f"; ... ({len(problems) - 3} more)" if len(problems) > 3 else "")
            raise DataError(f"the {split} split has {len(problems)} bad file(s): {shown}")

    def _get(self, name: str) -> Dataset:
        if name not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test", "predict": "predict"}[name])
        return self.datasets[name]

    def _loader(self, data: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
        return DataLoader(
            data,
            batch_size=batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate,
            pin_memory=torch.cuda.is_available(),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        data = self._get("train")
        if len(data) < self.batch_size:
            raise ValueError(
                f"the train split has {len(data)} items, fewer than batch_size={self.batch_size} (drop_last would "
                "leave no batch)"
            )
        sampler = EpochSampler(len(data), seed=self.seed, shuffle=True)
        return self._loader(data, self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._get("val"), self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._get("test"), self.val_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._get("predict"), self.val_batch_size, shuffle=False)
