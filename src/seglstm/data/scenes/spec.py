"""The ``scenes.yaml`` file: a class list, the scenes (image + labels), how to split them and how to sample.

::

    classes: classes.yaml            # a class file (or the same content inline)
    priority: [building, road]       # overlaps: earlier in this list wins (default: later class wins)
    split: {val: 0.15, test: 0.15, block: 2048, seed: 0}
    sampling: {samples_per_epoch: 2000, class_balanced: false}
    scenes:
      - image: scene.tif             # file, URL, /vsi* path or STAC item (.json, with assets)
        labels: labels.gpkg          # vector file, or a label raster (.tif, .vrt, ...)
        label_field: class           # attribute holding class names or ids
        # label_class: building      # ... or one class for every feature of the file
        # areas: {val: val.gpkg, test: test.gpkg, train: train.gpkg}   # per-split polygons
        # split: val                 # ... or the whole scene in one split

Relative paths are relative to the folder of ``scenes.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from seglstm.data.folder import read_class_file
from seglstm.data.io import DataError, DatasetNotFoundError
from seglstm.inference.scene.source import is_remote

SPLITS = ("train", "val", "test")
RASTER_LABEL_SUFFIXES = (".tif", ".tiff", ".vrt", ".img", ".jp2")


@dataclass(frozen=True)
class SplitSpec:
    """Automatic block splits: fractions of ``block`` x ``block`` pixel blocks per scene for val and test."""

    val: float = 0.15
    test: float = 0.15
    block: int = 2048
    seed: int = 0


@dataclass(frozen=True)
class SceneSpec:
    """One scene: its image, its labels and, optionally, its split areas or whole-scene split."""

    name: str
    image: str
    labels: str
    assets: tuple[str, ...] | None = None
    layer: str | None = None
    label_field: str | None = None
    label_class: str | None = None
    areas: tuple[tuple[str, str], ...] = ()
    split: str | None = None

    @property
    def raster_labels(self) -> bool:
        return self.labels.lower().split("?")[0].endswith(RASTER_LABEL_SUFFIXES)


@dataclass(frozen=True)
class ScenesFile:
    """A parsed ``scenes.yaml``."""

    path: Path
    classes: tuple[str, ...]
    palette: list[tuple[int, int, int]]
    scenes: tuple[SceneSpec, ...]
    priority: tuple[str, ...] = ()
    split: SplitSpec | None = None
    samples_per_epoch: int = 1000
    class_balanced: bool = False

    def paint_order(self) -> list[int]:
        """Class ids from lowest to highest priority: rasterised in this order, so later ones win overlaps.

        Classes named in ``priority`` beat every class not named, earlier names beating later ones; among
        the classes not named, the later class in the class file wins."""
        listed = [self.classes.index(c) for c in self.priority]
        rest = [k for k in range(len(self.classes)) if k not in listed]
        return rest + listed[::-1]


def _resolve(value: Any, base: Path, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise DataError(f"{where} must be a path or URL, got {value!r}")
    if is_remote(value) or Path(value).is_absolute():
        return value
    return str(base / value)


def _fraction(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise DataError(f"{where} must be a fraction in [0, 1), got {value!r}")
    return float(value)


def _split_spec(doc: Any, where: str) -> SplitSpec:
    if not isinstance(doc, dict):
        raise DataError(f"{where}: split must be a mapping like {{val: 0.15, test: 0.15, block: 2048}}")
    unknown = set(doc) - {"val", "test", "block", "seed"}
    if unknown:
        raise DataError(f"{where}: split has unknown keys {sorted(unknown)} (use val, test, block, seed)")
    val = _fraction(doc.get("val", 0.15), f"{where}: split.val")
    test = _fraction(doc.get("test", 0.15), f"{where}: split.test")
    if val + test >= 1:
        raise DataError(f"{where}: split.val + split.test = {val + test:g} leaves nothing to train on")
    block = doc.get("block", 2048)
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
        raise DataError(f"{where}: split.block must be a positive number of pixels, got {block!r}")
    seed = doc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DataError(f"{where}: split.seed must be a non-negative integer, got {seed!r}")
    return SplitSpec(val, test, block, seed)


_SCENE_KEYS = {"name", "image", "assets", "labels", "layer", "label_field", "label_class", "areas", "split"}


def _scene_spec(i: int, doc: Any, base: Path, where: str, classes: tuple[str, ...]) -> SceneSpec:
    at = f"{where}: scenes[{i}]"
    if not isinstance(doc, dict):
        raise DataError(f"{at} must be a mapping with image and labels")
    unknown = set(doc) - _SCENE_KEYS
    if unknown:
        raise DataError(f"{at}: unknown keys {sorted(unknown)} (use {', '.join(sorted(_SCENE_KEYS))})")
    for key in ("image", "labels"):
        if key not in doc:
            raise DataError(f"{at}: no '{key}' (each scene needs an image and its labels)")
    image = _resolve(doc["image"], base, f"{at}.image")
    labels = _resolve(doc["labels"], base, f"{at}.labels")
    assets = doc.get("assets")
    if assets is not None:
        if isinstance(assets, str):
            assets = [assets]
        if not isinstance(assets, list) or not assets or not all(isinstance(a, str) for a in assets):
            raise DataError(f"{at}.assets must be a list of STAC asset names, got {assets!r}")
        assets = tuple(assets)
    field_, one = doc.get("label_field"), doc.get("label_class")
    spec = SceneSpec(
        name=str(doc.get("name") or Path(str(doc["image"]).split("?")[0]).stem or f"scene{i}"),
        image=image,
        labels=labels,
        assets=assets,
        layer=doc.get("layer"),
        label_field=field_,
        label_class=one,
        split=doc.get("split"),
    )
    if spec.raster_labels:
        if field_ is not None or one is not None:
            raise DataError(f"{at}: label_field/label_class apply to vector labels, not the raster {labels}")
    elif (field_ is None) == (one is None):
        raise DataError(
            f"{at}: give label_field (the attribute of {labels} holding class names or ids) or label_class "
            "(one class for the whole file), not both or neither"
        )
    if one is not None and one not in classes:
        raise DataError(f"{at}: label_class {one!r} is not in the class file ({', '.join(classes)})")
    if spec.split is not None and spec.split not in SPLITS:
        raise DataError(f"{at}: split must be one of {SPLITS}, got {spec.split!r}")
    areas = doc.get("areas") or {}
    if not isinstance(areas, dict) or set(areas) - set(SPLITS):
        raise DataError(f"{at}.areas must map train/val/test to polygon files, got {areas!r}")
    if areas and spec.split is not None:
        raise DataError(f"{at}: give areas or split, not both")
    resolved = tuple((s, _resolve(areas[s], base, f"{at}.areas.{s}")) for s in SPLITS if s in areas)
    return SceneSpec(**{**spec.__dict__, "areas": resolved})


def read_scenes_file(path: str | Path) -> ScenesFile:
    """Parse and check ``scenes.yaml`` (no image or label file is opened here)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: scenes file does not exist (data.scenes names it)")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise DataError(f"{path}: cannot parse the scenes file ({err})") from err
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a mapping with classes and scenes")
    unknown = set(doc) - {"classes", "priority", "split", "sampling", "scenes"}
    if unknown:
        raise DataError(f"{path}: unknown keys {sorted(unknown)} (use classes, priority, split, sampling, scenes)")
    base = path.parent
    if "classes" not in doc:
        raise DataError(f"{path}: no 'classes' (a class file path, or its content inline)")
    if isinstance(doc["classes"], str):
        meta = read_class_file(_resolve(doc["classes"], base, f"{path}: classes"))
    else:  # inline: write it through the class-file parser, which owns the format
        meta = _inline_classes(doc["classes"], path)
    if meta["reduce_zero_label"]:
        raise DataError(f"{path}: reduce_zero_label does not apply to scenes (labels are class names or ids 0..K-1)")
    classes = tuple(meta["classes"])
    priority = doc.get("priority") or []
    if not isinstance(priority, list) or any(p not in classes for p in priority) or len(set(priority)) != len(priority):
        raise DataError(f"{path}: priority must list distinct class names from {list(classes)}, got {priority!r}")
    split = _split_spec(doc["split"], str(path)) if doc.get("split") is not None else None
    sampling = doc.get("sampling") or {}
    if not isinstance(sampling, dict) or set(sampling) - {"samples_per_epoch", "class_balanced"}:
        raise DataError(f"{path}: sampling takes samples_per_epoch and class_balanced, got {sampling!r}")
    n = sampling.get("samples_per_epoch", 1000)
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise DataError(f"{path}: sampling.samples_per_epoch must be a positive integer, got {n!r}")
    balanced = sampling.get("class_balanced", False)
    if not isinstance(balanced, bool):
        raise DataError(f"{path}: sampling.class_balanced must be true or false, got {balanced!r}")
    scenes = doc.get("scenes")
    if not isinstance(scenes, list) or not scenes:
        raise DataError(f"{path}: 'scenes' must be a non-empty list of {{image, labels, ...}} entries")
    specs = tuple(_scene_spec(i, s, base, str(path), classes) for i, s in enumerate(scenes))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise DataError(f"{path}: scene names repeat ({names}); give each scene a distinct 'name'")
    for s in specs:
        if not s.areas and s.split is None and split is None:
            raise DataError(
                f"{path}: scene {s.name!r} has no areas and no split, and the file has no 'split:' "
                "(add e.g. split: {val: 0.15, test: 0.15, block: 2048})"
            )
    return ScenesFile(path, classes, list(meta["palette"]), specs, tuple(priority), split, n, balanced)


def _inline_classes(value: Any, path: Path) -> dict[str, Any]:
    """An inline class list, parsed by the class-file reader (which owns the format)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "classes.yaml"
        file.write_text(yaml.safe_dump(value), encoding="utf-8")
        try:
            return read_class_file(file)
        except DataError as err:
            raise DataError(f"{path}: classes: {str(err).split(': ', 1)[-1]}") from err
