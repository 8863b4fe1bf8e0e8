"""Validate every item of a dataset and summarise it: per-class pixel histogram and per-band statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from seglstm.data.base import SegDataset
from seglstm.data.io import DataError


def _unbatched(item: dict[str, Any]) -> dict[str, Any]:
    """Collate for ``batch_size=None``: keep the numpy arrays as they are."""
    return item


class _Stats(Dataset):
    """Loads raw items (no transforms) and returns their statistics or the error that stopped them."""

    def __init__(self, dataset: SegDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            sample = self.dataset.load(index)
        except (DataError, OSError) as err:
            return {"error": str(err)}
        image = sample["image"].to(torch.float64)
        stats: dict[str, Any] = {
            "pixels": image.shape[1] * image.shape[2],
            "sum": image.sum(dim=(1, 2)).numpy(),
            "sumsq": (image * image).sum(dim=(1, 2)).numpy(),
        }
        if "mask" in sample:
            counts = torch.bincount(sample["mask"].reshape(-1), minlength=256)
            stats["counts"] = counts.numpy()
        return stats


@dataclass
class DataReport:
    """Outcome of :func:`check_dataset`."""

    name: str
    split: str
    classes: tuple[str, ...]
    items: int = 0
    checked: int = 0
    class_pixels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ignored_pixels: int = 0
    band_mean: list[float] = field(default_factory=list)
    band_std: list[float] = field(default_factory=list)
    has_masks: bool = False
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        """Per-class pixel histogram (and ignored pixels), then per-band mean / std."""
        lines = [f"{self.name} {self.split}: {self.checked}/{self.items} items readable"]
        if self.has_masks:
            total = int(self.class_pixels.sum()) + self.ignored_pixels
            width = max(len(c) for c in (*self.classes, "ignored (255)"))
            lines.append(f"  {'class':<{width}}  {'pixels':>14}  {'share':>7}")
            rows = [*zip(self.classes, self.class_pixels.tolist()), ("ignored (255)", self.ignored_pixels)]
            for name, count in rows:
                share = 100.0 * count / total if total else 0.0
                lines.append(f"  {name:<{width}}  {count:>14,d}  {share:>6.2f}%")
        if self.band_mean:
            mean = ", ".join(f"{m:.3f}" for m in self.band_mean)
            std = ", ".join(f"{s:.3f}" for s in self.band_std)
            lines.append(f"  band mean: [{mean}]  std: [{std}]")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def check_dataset(dataset: SegDataset, num_workers: int = 0, progress: bool = True) -> DataReport:
    """Load every item of ``dataset`` as training would (pairing, sizes, label range, decoding) and
    collect statistics. Problems are listed in the report, not raised, so one run shows all of them.
    Classes that never occur are noted (a class list / data mismatch, or just a small split)."""
    from tqdm.auto import tqdm

    report = DataReport(type(dataset).__name__, dataset.split, tuple(dataset.classes), items=len(dataset))
    n = dataset.num_classes
    counts = np.zeros(256, dtype=np.int64)
    band_sum: np.ndarray | None = None
    band_sq: np.ndarray | None = None
    pixels = 0
    loader = DataLoader(_Stats(dataset), batch_size=None, num_workers=num_workers, collate_fn=_unbatched)
    for index, stats in enumerate(
        tqdm(loader, total=len(dataset), desc=f"check {report.split}", disable=not progress)
    ):
        if "error" in stats:
            report.problems.append(stats["error"])
            continue
        if band_sum is not None and len(stats["sum"]) != len(band_sum):
            report.problems.append(
                f"{dataset.files[index][0]}: {len(stats['sum'])} bands where earlier images have {len(band_sum)}"
            )
            continue
        report.checked += 1
        band_sum = stats["sum"] if band_sum is None else band_sum + stats["sum"]
        band_sq = stats["sumsq"] if band_sq is None else band_sq + stats["sumsq"]
        pixels += stats["pixels"]
        if "counts" in stats:
            report.has_masks = True
            counts += stats["counts"]
    report.class_pixels = counts[:n].copy()
    report.ignored_pixels = int(counts[dataset.ignore_index])
    if band_sum is not None and band_sq is not None and pixels:
        mean = band_sum / pixels
        report.band_mean = mean.tolist()
        report.band_std = np.sqrt(np.maximum(band_sq / pixels - mean**2, 0.0)).tolist()
    if report.has_masks and report.checked == report.items:
        absent = [c for c, k in zip(dataset.classes, report.class_pixels) if k == 0]
        if absent:
            report.notes.append(f"classes never labelled in this split: {', '.join(absent)}")
    return report


def file_complete(path: str | Path) -> bool:
    """Whether an image file holds all its bytes, judged from its end: PNG's ``IEND`` chunk, JPEG's end-of-image
    marker, or every TIFF strip/tile inside the file. Other formats are assumed complete.

    Cheap (reads a few bytes, or the TIFF tags), so a copy cut short is found before training rather than
    when the loader first decodes the file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        fh.seek(max(size - 1024, 0))
        tail = fh.read()
    if suffix == ".png":
        return tail[-12:-4].endswith(b"IEND")
    if suffix in (".jpg", ".jpeg"):
        return b"\xff\xd9" in tail[-16:]
    if suffix in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                for page in tif.pages:
                    ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts)]
                    if ends and max(ends) > size:
                        return False
        except Exception:  # unreadable tags: the loader reports it with its own message
            return False
    return True


class _Scan(Dataset):
    """Per item: the image header and completeness, and the mask's value set and size; errors as text."""

    def __init__(self, dataset: SegDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> str | None:
        from seglstm.data.io import image_size, read_mask

        img_path, ann_path = self.dataset.files[index]
        try:
            height, width = image_size(img_path, self.dataset.max_pixels)
            if not file_complete(img_path):
                return f"{img_path}: truncated image (the file ends before its data does)"
            if ann_path is None:
                return None
            if not file_complete(ann_path):
                return f"{ann_path}: truncated label map (the file ends before its data does)"
            raw = read_mask(ann_path, max_pixels=self.dataset.max_pixels)
            if raw.shape != (height, width):
                return (
                    f"{ann_path}: mask is {raw.shape[1]}x{raw.shape[0]} but its image {img_path.name} is "
                    f"{width}x{height}"
                )
            self.dataset.map_labels(np.unique(raw), ann_path)  # the value set is enough to check the range
        except (DataError, OSError) as err:
            return str(err)
        return None


def scan_dataset(dataset: SegDataset, num_workers: int = 0, progress: bool = True) -> list[str]:
    """The problems of ``dataset`` found cheaply, without decoding images: headers, truncation (file ends),
    mask sizes and label values (masks are decoded: their value set is needed). Run before training so a bad
    val file fails in seconds, not at the first validation hours later; :func:`check_dataset` reads
    everything."""
    from tqdm.auto import tqdm

    loader = DataLoader(_Scan(dataset), batch_size=None, num_workers=num_workers, collate_fn=_unbatched)
    found = tqdm(loader, total=len(dataset), desc=f"scan {dataset.split}", disable=not progress, leave=False)
    return [problem for problem in found if problem is not None]


def band_statistics(report: DataReport) -> dict[str, list[float]]:
    """Per-band ``mean`` / ``std`` of a checked split (raw values over every pixel), rounded for a config:
    the per-band normalisation a multispectral dataset needs in ``data.mean`` / ``data.std``."""
    if not report.band_mean:
        raise DataError(f"{report.name} {report.split}: no readable image to take band statistics from")
    return {
        "mean": [round(float(m), 3) for m in report.band_mean],
        "std": [round(max(float(s), 1e-3), 3) for s in report.band_std],
    }


def statistics_yaml(stats: dict[str, list[float]]) -> str:
    """The ``data:`` lines to paste into a training config."""
    return "data:\n" + "".join(f"  {key}: [{', '.join(f'{v:g}' for v in stats[key])}]\n" for key in ("mean", "std"))
