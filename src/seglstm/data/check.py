"""Validate every item of a dataset and summarise it: per-class pixel histogram and per-band statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
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
