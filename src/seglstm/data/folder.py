"""Users' own data: a folder dataset with a class list file, and a plain image folder for prediction."""

from __future__ import annotations

import colorsys
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import Dataset

from seglstm.data.base import SegDataset, pair_files, require_dir
from seglstm.data.io import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    TIFF_SUFFIXES,
    DataError,
    item_error,
    list_files,
    read_image,
)
from seglstm.data.transforms import Sample

CLASS_FILE_NAMES = ("classes.yaml", "classes.yml", "classes.json")


def default_palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` well-separated colours (golden-ratio hue steps), for class files that give none."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.95 - 0.25 * (i % 2))
        out.append((round(r * 255), round(g * 255), round(b * 255)))
    return out


def _colour(value: Any, where: str) -> tuple[int, int, int]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)
    ):
        raise DataError(f"{where}: a colour must be three integers 0..255, got {value!r}")
    return (int(value[0]), int(value[1]), int(value[2]))


def read_class_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML/JSON class list.

    Accepted forms: a list of names; a list of ``{name, color}`` mappings; or a mapping with ``classes``
    (names), optional ``palette`` (list of [r, g, b]) and optional ``reduce_zero_label`` (stored 0 = ignore,
    class k stored as k + 1). Returns ``{"classes", "palette", "reduce_zero_label"}``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: class file does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        doc = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise DataError(f"{path}: cannot parse the class file ({err})") from err
    reduce_zero_label = False
    palette: list[tuple[int, int, int]] | None = None
    if isinstance(doc, dict):
        unknown = set(doc) - {"classes", "palette", "reduce_zero_label"}
        if unknown:
            raise DataError(
                f"{path}: unknown keys {sorted(unknown)} (use classes, palette, reduce_zero_label)"
            )
        if "classes" not in doc:
            raise DataError(f"{path}: no 'classes' list")
        reduce_zero_label = doc.get("reduce_zero_label", False)
        if not isinstance(reduce_zero_label, bool):
            raise DataError(f"{path}: reduce_zero_label must be true or false, got {reduce_zero_label!r}")
        if doc.get("palette") is not None:
            if not isinstance(doc["palette"], list):
                raise DataError(f"{path}: palette must be a list of [r, g, b]")
            palette = [_colour(c, f"{path} palette[{i}]") for i, c in enumerate(doc["palette"])]
        doc = doc["classes"]
    if not isinstance(doc, list) or not doc:
        raise DataError(f"{path}: the class list must be a non-empty list")
    names: list[str] = []
    colours: list[tuple[int, int, int]] = []
    for i, entry in enumerate(doc):
        if isinstance(entry, dict):
            if "name" not in entry:
                raise DataError(f"{path}: class #{i} has no 'name'")
            names.append(entry["name"])
            col = entry.get("color", entry.get("colour"))
            if col is not None:
                colours.append(_colour(col, f"{path} class {entry['name']!r}"))
        else:
            names.append(entry)
    if not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{path}: class names must be non-empty strings, got {names!r}")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: duplicate class names in {names!r}")
    limit = 254 if reduce_zero_label else 255
    if len(names) > limit:
        raise DataError(f"{path}: {len(names)} classes; at most {limit} fit in 8-bit masks with 255 = ignore")
    if colours:
        if palette is not None:
            raise DataError(f"{path}: give colours either per class or in 'palette', not both")
        if len(colours) != len(names):
            raise DataError(f"{path}: only {len(colours)} of {len(names)} classes have a colour")
        palette = colours
    if palette is not None and len(palette) != len(names):
        raise DataError(f"{path}: palette has {len(palette)} colours for {len(names)} classes")
    return {
        "classes": tuple(names),
        "palette": palette if palette is not None else default_palette(len(names)),
        "reduce_zero_label": reduce_zero_label,
    }


def find_class_file(root: Path, classes_file: str | Path | None) -> Path:
    """``classes_file`` if given, else ``classes.yaml|yml|json`` at the dataset root."""
    if classes_file is not None:
        return Path(classes_file)
    for name in CLASS_FILE_NAMES:
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root}: no classes_file given and none of {', '.join(CLASS_FILE_NAMES)} exists there")


class SegFolder(SegDataset):
    """Images and masks in mmseg's layout (``img_dir/<split>``, ``ann_dir/<split>``, same key).

    Args:
        root: dataset root.
        split: any sub-folder of ``img_dir``.
        classes_file: YAML/JSON class list (see :func:`read_class_file`); default ``root/classes.yaml``.
        img_suffix / ann_suffix: file-name endings after the shared key (mmseg's suffix rule).
        bands: 0-based bands to keep from multi-band images (TIFF), in order.
        transforms: joint transform on each sample dict.
        channels: channels every image must have; default ``len(bands)``, else 3 for non-TIFF files, else
            any.
        seed, max_pixels, verify_sizes: as :class:`~seglstm.data.LoveDA`.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        classes_file: str | Path | None = None,
        img_suffix: str = ".png",
        ann_suffix: str = ".png",
        bands: Sequence[int] | None = None,
        transforms: Callable[..., Sample] | None = None,
        *,
        channels: int | None = None,
        seed: int = 0,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        verify_sizes: bool = True,
    ) -> None:
        self.root = Path(root)
        require_dir(self.root, "SegFolder root")
        img_root = require_dir(self.root / "img_dir", "SegFolder images (img_dir)")
        self.splits = tuple(sorted(p.name for p in img_root.iterdir() if p.is_dir()))
        if bands is not None and (not bands or any(int(b) < 0 for b in bands)):
            raise ValueError(f"bands must be a non-empty list of 0-based band indices, got {bands!r}")
        if channels is None:
            channels = (
                len(bands) if bands is not None else (None if img_suffix.lower() in TIFF_SUFFIXES else 3)
            )
        super().__init__(split, transforms, seed=seed, max_pixels=max_pixels, channels=channels, bands=bands)
        meta = read_class_file(find_class_file(self.root, classes_file))
        self.classes = meta["classes"]
        self.palette = meta["palette"]
        self.reduce_zero_label = meta["reduce_zero_label"]
        ann_dir = require_dir(self.root / "ann_dir" / split, f"SegFolder {split} masks")
        self.files = list(pair_files(img_root / split, ann_dir, img_suffix, ann_suffix))
        if verify_sizes:
            self.verify_sizes()


class ImageFolder(Dataset):
    """Every image directly inside ``root`` (for ``predict``): items have ``image``, ``path``, ``ori_shape``."""

    def __init__(
        self,
        root: str | Path,
        transforms: Callable[..., Sample] | None = None,
        *,
        channels: int | None = 3,
        bands: Sequence[int] | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.root = require_dir(Path(root), "prediction image folder")
        self.files = list_files(self.root, IMAGE_SUFFIXES)
        if not self.files:
            raise DataError(f"{self.root}: no images ({', '.join(IMAGE_SUFFIXES)})")
        self.transforms = transforms
        self.channels = channels
        self.bands = None if bands is None else list(bands)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        path = self.files[index]
        try:
            image = read_image(path, channels=self.channels, bands=self.bands, max_pixels=self.max_pixels)
            sample: Sample = {
                "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32)),
                "path": str(path),
                "ori_shape": (int(image.shape[0]), int(image.shape[1])),
            }
            return sample if self.transforms is None else self.transforms(sample)
        except Exception as err:
            raise item_error(err, path, index) from err
