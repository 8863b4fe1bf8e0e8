"""Datasets, the seed's augmentation pipeline, the synthetic LoveDA-like generator and the DataModule.

``SegDataModule`` is imported on first use so that ``import seglstm.data`` (and ``seglstm synth``) does
not load Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from seglstm.data.base import EpochSampler, SegDataset, collate, pair_files, plot_sample
from seglstm.data.folder import ImageFolder, SegFolder, read_class_file
from seglstm.data.io import DEFAULT_MAX_PIXELS, DataError, DatasetNotFoundError, read_image, read_mask
from seglstm.data.isprs import Potsdam, Vaihingen
from seglstm.data.loveda import LoveDA
from seglstm.data.registry import DATASETS, build_dataset, dataset_class, dataset_kwargs
from seglstm.data.transforms import MEAN, STD, eval_transforms, item_seed, train_transforms

if TYPE_CHECKING:
    from seglstm.data.datamodule import SegDataModule


def __getattr__(name: str) -> Any:
    if name == "SegDataModule":
        from seglstm.data.datamodule import SegDataModule

        return SegDataModule
    raise AttributeError(f"module 'seglstm.data' has no attribute {name!r}")


__all__ = [
    "DATASETS",
    "DEFAULT_MAX_PIXELS",
    "MEAN",
    "STD",
    "DataError",
    "DatasetNotFoundError",
    "EpochSampler",
    "ImageFolder",
    "LoveDA",
    "Potsdam",
    "SegDataModule",
    "SegDataset",
    "SegFolder",
    "Vaihingen",
    "build_dataset",
    "collate",
    "dataset_class",
    "dataset_kwargs",
    "eval_transforms",
    "item_seed",
    "pair_files",
    "plot_sample",
    "read_class_file",
    "read_image",
    "read_mask",
    "train_transforms",
]
