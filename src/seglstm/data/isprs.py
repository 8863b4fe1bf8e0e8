"""ISPRS Potsdam and Vaihingen as mmseg's converter lays them out (``seglstm convert`` writes the same)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from seglstm.data.base import SegDataset, pair_files, require_dir
from seglstm.data.io import DEFAULT_MAX_PIXELS, DataError
from seglstm.data.transforms import Sample

ISPRS_CLASSES = ("impervious_surface", "building", "low_vegetation", "tree", "car", "clutter")
ISPRS_PALETTE = [(255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0)]


class _ISPRS(SegDataset):
    """``img_dir/{train,val}`` + ``ann_dir/{train,val}`` patches; stored 0 = boundary/unknown (ignored),
    1..6 = the six classes (mmseg's ``reduce_zero_label``)."""

    classes = ISPRS_CLASSES
    palette = ISPRS_PALETTE
    splits = ("train", "val")

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transforms: Callable[..., Sample] | None = None,
        *,
        img_suffix: str = ".png",
        ann_suffix: str = ".png",
        seed: int = 0,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        verify_sizes: bool = True,
    ) -> None:
        super().__init__(split, transforms, seed=seed, max_pixels=max_pixels, channels=3)
        self.root = Path(root)
        name = type(self).__name__
        require_dir(self.root, f"{name} root")
        img_dir = require_dir(self.root / "img_dir" / split, f"{name} {split} images")
        ann_dir = require_dir(self.root / "ann_dir" / split, f"{name} {split} masks")
        self.files = list(pair_files(img_dir, ann_dir, img_suffix, ann_suffix))
        if not self.files:
            raise DataError(f"{img_dir}: no images")
        if verify_sizes:
            self.verify_sizes()


class Potsdam(_ISPRS):
    """ISPRS Potsdam (RGB or IRRG 512x512 patches, 6 classes).

    Args:
        root: converted root; ``split``: ``train`` or ``val``; ``img_suffix``: ``.png`` (mmseg) or ``.tif``.
    """


class Vaihingen(_ISPRS):
    """ISPRS Vaihingen (IRRG 512x512 patches, 6 classes); arguments as :class:`Potsdam`."""
