"""Dataset names -> classes, and the per-dataset keyword arguments shared by the DataModule and
``seglstm check-data`` (which must build exactly the datasets a config trains on)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seglstm.data.base import SegDataset
from seglstm.data.folder import SegFolder, find_class_file, read_class_file
from seglstm.data.io import DEFAULT_MAX_PIXELS
from seglstm.data.isprs import Potsdam, Vaihingen
from seglstm.data.loveda import LoveDA
from seglstm.data.scenes import SceneDataset, read_scenes_file

DATASETS: dict[str, type[SegDataset]] = {
    "loveda": LoveDA,
    "potsdam": Potsdam,
    "vaihingen": Vaihingen,
    "folder": SegFolder,
    "scenes": SceneDataset,
}


def dataset_class(name: str) -> type[SegDataset]:
    """The class registered under ``name`` (case-insensitive)."""
    try:
        return DATASETS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"dataset={name!r} is not one of {sorted(DATASETS)}") from None


def dataset_meta(
    name: str, root: str | Path, classes_file: str | Path | None = None, scenes: str | Path | None = None
) -> dict[str, Any]:
    """``classes`` and ``palette`` of dataset ``name``: the class's own, a ``folder`` dataset's class file
    (``classes_file``, else ``classes.yaml|yml|json`` under ``root``) or a ``scenes.yaml``'s. Reads no images."""
    cls = dataset_class(name)
    if cls is SceneDataset:
        if scenes is None:
            raise ValueError("dataset='scenes' needs data.scenes: the path of a scenes.yaml")
        spec = read_scenes_file(scenes)
        return {"classes": spec.classes, "palette": spec.palette}
    if cls is SegFolder:
        return read_class_file(find_class_file(Path(root), classes_file))
    return {"classes": cls.classes, "palette": cls.palette}


def build_dataset(name: str, root: str | Path, split: str, **kwargs: Any) -> SegDataset:
    """``DATASETS[name](root, split=split, **kwargs)``, e.g. ``build_dataset("loveda", "data/loveDA", "val")``."""
    return dataset_class(name)(root, split=split, **kwargs)


def dataset_kwargs(
    name: str,
    domain: str = "both",
    classes_file: str | None = None,
    bands: Sequence[int] | None = None,
    img_suffix: str | None = None,
    ann_suffix: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    scenes: str | None = None,
    crop_size: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Constructor arguments for dataset ``name`` from DataModule-style settings, rejecting settings that
    the dataset does not have (rather than ignoring them)."""
    cls = dataset_class(name)
    kwargs: dict[str, Any] = {"max_pixels": max_pixels}
    if cls is SceneDataset:
        for arg, value in (("classes_file", classes_file), ("img_suffix", img_suffix), ("ann_suffix", ann_suffix)):
            if value is not None:
                raise ValueError(f"{arg}={value!r} does not apply to dataset='scenes' (scenes.yaml names the files)")
        if domain != "both":
            raise ValueError(f"domain={domain!r} only applies to dataset='loveda', not 'scenes'")
        if scenes is None:
            raise ValueError("dataset='scenes' needs data.scenes: the path of a scenes.yaml")
        kwargs.update(scenes=scenes, bands=None if bands is None else list(bands))
        if crop_size is not None:
            kwargs["crop_size"] = tuple(int(v) for v in crop_size)
        return kwargs
    if scenes is not None:
        raise ValueError(f"scenes={scenes!r} only applies to dataset='scenes', not {name!r}")
    if cls is LoveDA:
        if domain not in LoveDA.domains:
            raise ValueError(f"domain={domain!r} is not one of {LoveDA.domains}")
        kwargs["domain"] = domain
    elif domain != "both":
        raise ValueError(f"domain={domain!r} only applies to dataset='loveda', not {name!r}")
    if cls is SegFolder:
        kwargs.update(classes_file=classes_file, bands=None if bands is None else list(bands))
    else:
        for arg, value in (("classes_file", classes_file), ("bands", bands)):
            if value is not None:
                raise ValueError(f"{arg}={value!r} only applies to dataset='folder', not {name!r}")
    if cls is LoveDA:
        for arg, value in (("img_suffix", img_suffix), ("ann_suffix", ann_suffix)):
            if value is not None:
                raise ValueError(f"{arg}={value!r} does not apply to dataset='loveda' (its files are .png)")
    else:
        if img_suffix is not None:
            kwargs["img_suffix"] = img_suffix
        if ann_suffix is not None:
            kwargs["ann_suffix"] = ann_suffix
    return kwargs
