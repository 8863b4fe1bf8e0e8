"""LoveDA (Wang et al., NeurIPS 2021 datasets track) in mmseg's layout or the official release layout."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from seglstm.data.base import SegDataset, pair_files, require_dir
from seglstm.data.io import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, DataError, DatasetNotFoundError, list_files
from seglstm.data.transforms import Sample

# Official file ids (the release numbers tiles 0..5986 across splits and domains): the ranges let a merged
# mmseg-layout tree be filtered by domain.
OFFICIAL_ID_RANGES = {
    "train": {"rural": (0, 1365), "urban": (1366, 2521)},
    "val": {"rural": (2522, 3513), "urban": (3514, 4190)},
    "test": {"rural": (4191, 5166), "urban": (5167, 5986)},
}
_OFFICIAL_SPLIT_DIRS = {"train": "Train", "val": "Val", "test": "Test"}
_OFFICIAL_DOMAIN_DIRS = {"urban": "Urban", "rural": "Rural"}


def _child(parent: Path, name: str) -> Path | None:
    """``parent/name`` matched case-insensitively (the release uses Train/Urban, users sometimes lower-case)."""
    if not parent.is_dir():
        return None
    for p in parent.iterdir():
        if p.is_dir() and p.name.lower() == name.lower():
            return p
    return None


def detect_layout(root: Path) -> str:
    """``"mmseg"`` (img_dir/ann_dir) or ``"official"`` (Train|Val|Test/Urban|Rural/...)."""
    mmseg = (root / "img_dir").is_dir()
    official = any(_child(root, d) is not None for d in _OFFICIAL_SPLIT_DIRS.values())
    if mmseg and official:
        raise DataError(
            f"{root}: holds both mmseg's img_dir/ and the official Train|Val|Test/ folders; pass "
            "layout='mmseg' or layout='official'"
        )
    if not (mmseg or official):
        raise DatasetNotFoundError(
            f"LoveDA root {root}: found neither img_dir/{{train,val,test}} (mmseg layout) nor "
            "Train|Val|Test/Urban|Rural/images_png (official layout)"
        )
    return "mmseg" if mmseg else "official"


class LoveDA(SegDataset):
    """LoveDA land-cover segmentation: 7 classes, stored values 1..7 (0 = no data, ignored).

    Args:
        root: dataset root in mmseg's layout (``img_dir/{train,val,test}``, ``ann_dir/{train,val}``) or the
            official one (``Train|Val|Test/Urban|Rural/images_png|masks_png``), detected automatically.
        split: ``train``, ``val`` or ``test`` (no masks: items have no ``mask``, unless an annotation
            folder for the split exists).
        domain: ``urban``, ``rural`` or ``both``. In the mmseg layout the domain of a file comes from the
            root's ``meta.json`` (``domains``, written by ``seglstm synth``) or else from LoveDA's official
            file-id ranges.
        transforms: joint transform applied to each sample dict.
        layout: ``auto``, ``mmseg`` or ``official``.
        seed: seed of the per-item augmentation generators.
        max_pixels: decompression-bomb cap per file (``None`` disables it).
        verify_sizes: compare image and mask sizes from file headers when the dataset is built.
    """

    classes = ("background", "building", "road", "water", "barren", "forest", "agricultural")
    palette = [  # noqa: RUF012 - mmseg's LoveDA palette
        (255, 255, 255),
        (255, 0, 0),
        (255, 255, 0),
        (0, 0, 255),
        (159, 129, 183),
        (0, 255, 0),
        (255, 195, 128),
    ]
    splits = ("train", "val", "test")
    domains = ("urban", "rural", "both")

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        domain: str = "both",
        transforms: Callable[..., Sample] | None = None,
        *,
        layout: str = "auto",
        seed: int = 0,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        verify_sizes: bool = True,
    ) -> None:
        super().__init__(split, transforms, seed=seed, max_pixels=max_pixels, channels=3)
        if domain not in self.domains:
            raise ValueError(f"domain={domain!r} is not one of {self.domains}")
        if layout not in ("auto", "mmseg", "official"):
            raise ValueError(f"layout={layout!r} is not one of ('auto', 'mmseg', 'official')")
        self.root = Path(root)
        require_dir(self.root, "LoveDA root")
        self.domain = domain
        self.layout = detect_layout(self.root) if layout == "auto" else layout
        if self.layout == "mmseg":
            self.files = self._mmseg_files()
        else:
            self.files = self._official_files()
        if not self.files:
            raise DataError(f"{self.root}: no {domain} images in the {split} split")
        if verify_sizes:
            self.verify_sizes()

    def _mmseg_files(self) -> list[tuple[Path, Path | None]]:
        img_dir = require_dir(self.root / "img_dir" / self.split, f"LoveDA {self.split} images")
        ann_dir = self.root / "ann_dir" / self.split
        if ann_dir.is_dir():
            files: list[tuple[Path, Path | None]] = list(pair_files(img_dir, ann_dir))
        elif self.split == "test":
            files = [(p, None) for p in list_files(img_dir, IMAGE_SUFFIXES)]
        else:
            raise DatasetNotFoundError(f"LoveDA {self.split} masks not found: {ann_dir} is not a directory")
        if self.domain == "both":
            return files
        domain_of = self._domain_lookup()
        return [f for f in files if domain_of(f[0]) == self.domain]

    def _domain_lookup(self) -> Callable[[Path], str]:
        meta = self.root / "meta.json"
        if meta.is_file():
            try:
                table = json.loads(meta.read_text())["domains"][self.split]
            except (ValueError, KeyError, TypeError) as err:
                raise DataError(f"{meta}: no readable 'domains' -> '{self.split}' table ({err})") from err

            def from_meta(path: Path) -> str:
                if path.stem not in table:
                    raise DataError(f"{path}: not listed in {meta} 'domains' -> '{self.split}'")
                return table[path.stem]

            return from_meta
        ranges = OFFICIAL_ID_RANGES[self.split]

        def from_id(path: Path) -> str:
            if path.stem.isdigit():
                for name, (lo, hi) in ranges.items():
                    if lo <= int(path.stem) <= hi:
                        return name
            raise DataError(
                f"{path}: cannot tell its domain: the name is not an official LoveDA {self.split} id "
                f"({ranges}) and {meta} does not exist; use domain='both'"
            )

        return from_id

    def _official_files(self) -> list[tuple[Path, Path | None]]:
        split_dir = _child(self.root, _OFFICIAL_SPLIT_DIRS[self.split])
        if split_dir is None:
            raise DatasetNotFoundError(
                f"LoveDA {self.split} split not found: {self.root / _OFFICIAL_SPLIT_DIRS[self.split]} is missing"
            )
        wanted = ("urban", "rural") if self.domain == "both" else (self.domain,)
        files: list[tuple[Path, Path | None]] = []
        for dom in wanted:
            dom_dir = _child(split_dir, _OFFICIAL_DOMAIN_DIRS[dom])
            if dom_dir is None:
                raise DatasetNotFoundError(
                    f"LoveDA {self.split}/{dom} not found: {split_dir / _OFFICIAL_DOMAIN_DIRS[dom]} is missing"
                )
            img_dir = require_dir(dom_dir / "images_png", f"LoveDA {self.split}/{dom} images")
            ann_dir = dom_dir / "masks_png"
            if ann_dir.is_dir():
                files += pair_files(img_dir, ann_dir)
            elif self.split == "test":
                files += [(p, None) for p in list_files(img_dir, IMAGE_SUFFIXES)]
            else:
                raise DatasetNotFoundError(f"LoveDA {self.split}/{dom} masks not found: {ann_dir} is missing")
        return files
