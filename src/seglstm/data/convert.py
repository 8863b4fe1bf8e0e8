"""Convert the official ISPRS Potsdam / Vaihingen tiles into mmseg's patch layout.

Reproduces mmseg's ``tools/dataset_converters/{potsdam,vaihingen}.py``: the same train/val tile lists,
the same window grid and file names (``{i}_{j}_{x0}_{y0}_{x1}_{y1}.png`` for Potsdam,
``area{k}_{x0}_{y0}_{x1}_{y1}.png`` for Vaihingen) and the same label values (0 = boundary / unknown colour,
1..6 = impervious surface, building, low vegetation, tree, car, clutter), which the ``Potsdam`` and
``Vaihingen`` datasets reduce to 0..5 with 255 ignored.

Window grid: mmseg counts ``n`` windows per axis from the stride (``ceil((L - clip) / stride)``, plus one
when that falls short), but places window ``k`` at ``k * clip`` and shifts windows that overrun back to
``L - clip``; duplicates collapse onto one file. With a 6000-pixel Potsdam tile that is 12 x 12 = 144
patches (3456 train / 2016 val patches overall). ``true_stride=True`` places windows at ``k * stride``
instead (overlapping patches), which is what the converter's ``--stride`` suggests but not what it does.
"""

from __future__ import annotations

import io
import math
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seglstm.data.io import DataError, mark_incomplete, write_png

POTSDAM_SPLITS = {
    "train": ["2_10", "2_11", "2_12", "3_10", "3_11", "3_12", "4_10", "4_11", "4_12", "5_10", "5_11", "5_12",
              "6_10", "6_11", "6_12", "6_7", "6_8", "6_9", "7_10", "7_11", "7_12", "7_7", "7_8", "7_9"],
    "val": ["5_15", "6_15", "6_13", "3_13", "4_14", "6_14", "5_14", "2_13", "4_15", "2_14", "5_13", "4_13",
            "3_14", "7_13"],
}  # fmt: skip
VAIHINGEN_SPLITS = {
    "train": ["area1", "area11", "area13", "area15", "area17", "area21", "area23", "area26", "area28", "area3",
              "area30", "area32", "area34", "area37", "area5", "area7"],
    "val": ["area6", "area24", "area35", "area16", "area14", "area22", "area10", "area4", "area2", "area20",
            "area8", "area31", "area33", "area27", "area38", "area12", "area29"],
}  # fmt: skip
SPLITS = {"potsdam": POTSDAM_SPLITS, "vaihingen": VAIHINGEN_SPLITS}

# ISPRS colour code -> stored label value (0 = boundary, black in the eroded labels)
LABEL_COLOURS = {
    (0, 0, 0): 0,
    (255, 255, 255): 1,  # impervious surface
    (0, 0, 255): 2,  # building
    (0, 255, 255): 3,  # low vegetation
    (0, 255, 0): 4,  # tree
    (255, 255, 0): 5,  # car
    (255, 0, 0): 6,  # clutter
}

_POTSDAM_IMAGE = re.compile(r"^top_potsdam_(\d+)_(\d+)_(RGB|IRRG|RGBIR)\.tiff?$", re.IGNORECASE)
_POTSDAM_LABEL = re.compile(r"^top_potsdam_(\d+)_(\d+)_label(_noBoundary)?\.tiff?$", re.IGNORECASE)
_VAIHINGEN_TILE = re.compile(r"^top_mosaic_09cm_area(\d+)\.tiff?$", re.IGNORECASE)
_VAIHINGEN_ERODED = re.compile(r"^top_mosaic_09cm_area(\d+)_noBoundary\.tiff?$", re.IGNORECASE)


@dataclass
class _Source:
    """A TIFF on disk or inside a zip; ``where`` names it in messages."""

    name: str
    where: str
    read_bytes: Callable[[], bytes]


@dataclass
class ConvertReport:
    """What a conversion did: tiles and patches per split, files not used, unknown label colours."""

    tiles: dict[str, list[str]] = field(default_factory=lambda: {"train": [], "val": []})
    patches: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    skipped: list[str] = field(default_factory=list)
    unknown_colour_pixels: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"{split}: {len(self.tiles[split])} tiles -> {self.patches[split]} patches"
            for split in ("train", "val")
        ]
        if self.skipped:
            lines.append(f"not used ({len(self.skipped)}): " + "; ".join(self.skipped[:10]))
        if self.unknown_colour_pixels:
            total = sum(self.unknown_colour_pixels.values())
            lines.append(
                f"{total} label pixels had colours outside the ISPRS code and were stored as 0 (ignored): "
                + ", ".join(f"{k}: {v}" for k, v in sorted(self.unknown_colour_pixels.items()))
            )
        return "\n".join(lines)


def window_starts(length: int, clip: int, stride: int, true_stride: bool = False) -> list[int]:
    """Start offsets of the windows along one axis, mmseg's grid unless ``true_stride``."""
    if length < clip:
        raise ValueError(f"a tile side of {length} pixels is smaller than the clip size {clip}")
    if clip <= 0 or stride <= 0:
        raise ValueError(f"clip size and stride must be positive, got {clip} and {stride}")
    n = math.ceil((length - clip) / stride)
    if n * stride + clip < length:
        n += 1
    step = stride if true_stride else clip
    return sorted({min(k * step, length - clip) for k in range(n + 1)})


def _discover(sources: Sequence[str | Path]) -> list[_Source]:
    found: list[_Source] = []

    def from_zip(path: Path) -> None:
        try:
            with zipfile.ZipFile(path) as zf:
                members = [m for m in zf.namelist() if m.lower().endswith((".tif", ".tiff"))]
        except (OSError, zipfile.BadZipFile) as err:
            raise DataError(f"{path}: not a readable zip archive ({err})") from err
        for member in members:

            def read(path: Path = path, member: str = member) -> bytes:
                with zipfile.ZipFile(path) as zf:
                    return zf.read(member)

            found.append(_Source(Path(member).name, f"{path}:{member}", read))

    for src in map(Path, sources):
        if src.is_dir():
            for p in sorted(src.rglob("*")):
                if p.is_file() and p.suffix.lower() == ".zip":
                    from_zip(p)
                elif p.is_file() and p.suffix.lower() in (".tif", ".tiff"):
                    found.append(_Source(p.name, str(p), p.read_bytes))
        elif src.is_file() and src.suffix.lower() == ".zip":
            from_zip(src)
        elif src.is_file() and src.suffix.lower() in (".tif", ".tiff"):
            found.append(_Source(src.name, str(src), src.read_bytes))
        else:
            raise DataError(f"{src}: not a directory, .zip or .tif file")
    return found


def _classify(dataset: str, src: _Source, bands: str, eroded: bool) -> tuple[str, str] | str:
    """``(tile_id, "image" | "label")`` for a file to use, else the reason it is not used."""
    if dataset == "potsdam":
        if m := _POTSDAM_IMAGE.match(src.name):
            if m.group(3).upper() != bands:
                return f"{src.where} ({m.group(3)} tile; converting {bands})"
            return f"{m.group(1)}_{m.group(2)}", "image"
        if m := _POTSDAM_LABEL.match(src.name):
            if bool(m.group(3)) != eroded:
                return (
                    f"{src.where} ({'eroded' if m.group(3) else 'full'} labels; converting {_kind(eroded)})"
                )
            return f"{m.group(1)}_{m.group(2)}", "label"
        return f"{src.where} (not a Potsdam tile or label name)"
    if m := _VAIHINGEN_ERODED.match(src.name):
        if not eroded:
            return f"{src.where} (eroded labels; converting full labels)"
        return f"area{m.group(1)}", "label"
    if m := _VAIHINGEN_TILE.match(src.name):
        # the full ground truth uses the tiles' own file names: tell them apart by the archive / folder
        is_label = re.search(r"ground_?truth|gts", src.where, re.IGNORECASE) is not None
        if is_label and eroded:
            return f"{src.where} (full labels; converting eroded labels)"
        return f"area{m.group(1)}", "label" if is_label else "image"
    return f"{src.where} (not a Vaihingen tile or label name)"


def _kind(eroded: bool) -> str:
    return "eroded" if eroded else "full"


def _read_tiff(src: _Source) -> np.ndarray:
    import tifffile

    try:
        data = tifffile.imread(io.BytesIO(src.read_bytes()))
    except Exception as err:
        raise DataError(f"{src.where}: corrupt or truncated TIFF ({type(err).__name__}: {err})") from err
    if data is None or data.ndim != 3 or data.shape[2] not in (3, 4) or data.dtype != np.uint8:
        shape = None if data is None else (data.shape, data.dtype)
        raise DataError(f"{src.where}: expected an 8-bit H x W x 3 TIFF, got {shape}")
    return data[:, :, :3]


def colour_to_label(rgb: np.ndarray) -> tuple[np.ndarray, int]:
    """ISPRS colour label (H x W x 3 uint8) -> stored values 0..6, and the count of unknown-colour pixels
    (stored as 0, like mmseg's converter)."""
    code = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    keys = np.array([(r << 16) | (g << 8) | b for r, g, b in LABEL_COLOURS], dtype=np.uint32)
    values = np.array(list(LABEL_COLOURS.values()), dtype=np.uint8)
    order = np.argsort(keys)
    keys, values = keys[order], values[order]
    pos = np.clip(np.searchsorted(keys, code), 0, len(keys) - 1)
    known = keys[pos] == code
    return np.where(known, values[pos], 0).astype(np.uint8), int((~known).sum())


def convert_isprs(
    dataset: str,
    sources: Sequence[str | Path],
    out: str | Path,
    clip_size: int = 512,
    stride: int = 256,
    eroded: bool = False,
    true_stride: bool = False,
    bands: str = "RGB",
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> ConvertReport:
    """Convert official tiles (folders, zips or TIFFs) of ``potsdam`` or ``vaihingen`` to mmseg's layout.

    Args:
        dataset: ``potsdam`` or ``vaihingen``.
        sources: folders (searched recursively for .zip/.tif), zip archives or TIFF files.
        out: output root; ``img_dir/{train,val}`` and ``ann_dir/{train,val}`` are written there.
        clip_size, stride: patch size and stride (see the module docstring for mmseg's grid).
        eroded: use the eroded-boundary labels (``*_noBoundary``; mmseg's documented choice) instead of
            the full ones.
        true_stride: place windows every ``stride`` pixels instead of mmseg's grid.
        bands: Potsdam tile kind to convert, ``RGB`` or ``IRRG`` (Vaihingen tiles are IRRG).
        overwrite: replace existing ``img_dir``/``ann_dir`` under ``out``.
    """
    from tqdm.auto import tqdm

    dataset = dataset.lower()
    if dataset not in SPLITS:
        raise ValueError(f"dataset={dataset!r} is not 'potsdam' or 'vaihingen'")
    bands = bands.upper()
    if dataset == "potsdam" and bands not in ("RGB", "IRRG"):
        raise ValueError(f"bands={bands!r} is not 'RGB' or 'IRRG'")
    window_starts(clip_size, clip_size, stride)  # validates clip size and stride
    out = Path(out)
    existing = [d for d in (out / "img_dir", out / "ann_dir") if d.exists() and any(d.rglob("*.png"))]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} already holds patches; pass overwrite=True (--overwrite) to replace"
        )
    report = ConvertReport()
    tiles: dict[str, dict[str, _Source]] = {}
    for src in _discover(sources):
        got = _classify(dataset, src, bands, eroded)
        if isinstance(got, str):
            report.skipped.append(got)
            continue
        tile, kind = got
        if kind in tiles.setdefault(tile, {}):
            raise DataError(f"two {kind} files for tile {tile}: {tiles[tile][kind].where} and {src.where}")
        tiles[tile][kind] = src
    splits = SPLITS[dataset]
    known = {t: s for s, ids in splits.items() for t in ids}
    for tile in sorted(set(tiles) - set(known)):
        report.skipped.append(f"tile {tile}: in neither mmseg's train nor val list")
        del tiles[tile]
    no_label = sorted(t for t, kinds in tiles.items() if "image" in kinds and "label" not in kinds)
    if no_label:
        raise DataError(
            f"no {_kind(eroded)} label for tile(s) {', '.join(no_label)}; pass the label archive too"
        )
    for tile in sorted(t for t, kinds in tiles.items() if "image" not in kinds):
        report.skipped.append(f"{tiles[tile]['label'].where} (label without an image tile)")
        del tiles[tile]
    if not tiles:
        raise DataError(f"no {dataset} tiles found in {', '.join(map(str, sources))}")
    missing = sorted(set(known) - set(tiles))
    if missing:
        warnings.warn(
            f"{dataset}: {len(missing)} of mmseg's tiles are missing: {', '.join(missing)}", stacklevel=2
        )
    # Patches go to a staging folder beside the output, moved into place only when every tile converted:
    # a bad tile later in the list leaves the previous dataset (or nothing), never a partial one.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.convert-", dir=out.parent))
    # A kill skips the cleanup below: the markers name the command that completes the dataset.
    command = command or f"seglstm convert {dataset} {' '.join(map(str, sources))} --out {out}"
    mark_incomplete(staging, command)
    try:
        for tile in tqdm(sorted(tiles), desc=f"convert {dataset}", unit="tile", disable=not progress):
            split = known[tile]
            image = _read_tiff(tiles[tile]["image"])
            label, unknown = colour_to_label(_read_tiff(tiles[tile]["label"]))
            if image.shape[:2] != label.shape:
                raise DataError(
                    f"{tiles[tile]['label'].where}: label is {label.shape[1]}x{label.shape[0]} but the tile "
                    f"{tiles[tile]['image'].where} is {image.shape[1]}x{image.shape[0]}"
                )
            if unknown:
                report.unknown_colour_pixels[tile] = unknown
            h, w = label.shape
            for y0 in window_starts(h, clip_size, stride, true_stride):
                for x0 in window_starts(w, clip_size, stride, true_stride):
                    name = f"{tile}_{x0}_{y0}_{x0 + clip_size}_{y0 + clip_size}.png"
                    window = (slice(y0, y0 + clip_size), slice(x0, x0 + clip_size))
                    write_png(staging / "img_dir" / split / name, np.ascontiguousarray(image[window]))
                    write_png(staging / "ann_dir" / split / name, np.ascontiguousarray(label[window]))
                    report.patches[split] += 1
            report.tiles[split].append(tile)
        out.mkdir(exist_ok=True)
        marker = mark_incomplete(out, command)
        for name in ("img_dir", "ann_dir"):
            if not (staging / name).exists():
                continue
            if (out / name).exists():
                shutil.rmtree(out / name)
            os.replace(staging / name, out / name)
        marker.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report
