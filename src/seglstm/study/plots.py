"""The two figures of a comparison: accuracy against inference time, and inference time against input size.

Both read the table rows that :mod:`seglstm.study.compare` writes (``mIoU``, ``infer_img_s_<size>``), so a
figure can be redrawn from ``compare.json`` alone. A model without the needed numbers (failed, or pending)
is left out of the figure and named in its caption; it stays in the table with its error. A model built
with preset overrides is marked with ``*``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

__all__ = ["plot_miou_vs_time", "plot_time_vs_size"]


def _ms(row: Mapping[str, Any], size: int) -> float | None:
    rate = row.get(f"infer_img_s_{size}")
    return None if not rate else 1000.0 / float(rate)


def _name(row: Mapping[str, Any]) -> str:
    return str(row["model"]) + ("*" if row.get("overrides") else "")


def _caption(fig: Figure, rows: Sequence[Mapping[str, Any]], left_out: Sequence[str]) -> None:
    parts = []
    if any(row.get("overrides") for row in rows):
        parts.append("* preset overrides (see the table)")
    if left_out:
        parts.append("not shown (no numbers): " + ", ".join(left_out))
    if parts:
        fig.text(0.01, 0.01, "; ".join(parts), fontsize=8, color="0.35")


def _save(fig: Figure, path: str | Path) -> Path:
    from seglstm.training.reports import save_figure

    return save_figure(fig, path)


def plot_miou_vs_time(rows: Sequence[Mapping[str, Any]], size: int, path: str | Path) -> Path:
    """Scatter of mIoU (%) against inference time per image at ``size`` x ``size``, one labelled point per model."""
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.subplots()
    left_out = []
    for row in rows:
        ms, miou = _ms(row, size), row.get("mIoU")
        if ms is None or miou is None:
            left_out.append(_name(row))
            continue
        ax.scatter([ms], [miou], s=40)
        ax.annotate(_name(row), (ms, miou), xytext=(5, 4), textcoords="offset points", fontsize=8)
    ax.set_xlabel(f"inference time per image at {size}x{size} (ms, batch 1)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("accuracy vs inference time")
    ax.grid(True, alpha=0.3)
    if len(left_out) == len(rows):
        ax.text(0.5, 0.5, "no model has both numbers yet", ha="center", va="center", transform=ax.transAxes)
    _caption(fig, rows, left_out)
    return _save(fig, path)


def plot_time_vs_size(rows: Sequence[Mapping[str, Any]], sizes: Sequence[int], path: str | Path) -> Path:
    """Inference time per image against the input side, one line per model (log-log axes)."""
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.subplots()
    left_out = []
    ordered = sorted(sizes)
    for row in rows:
        points = [(s, _ms(row, s)) for s in ordered]
        points = [(s, ms) for s, ms in points if ms is not None]
        if not points:
            left_out.append(_name(row))
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=_name(row))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ordered, [str(s) for s in ordered])
    ax.set_xlabel("input side (pixels, square input)")
    ax.set_ylabel("inference time per image (ms, batch 1)")
    ax.set_title("inference time vs input size")
    ax.grid(True, which="both", alpha=0.3)
    if len(left_out) < len(rows):
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no timings yet", ha="center", va="center", transform=ax.transAxes)
    _caption(fig, rows, left_out)
    return _save(fig, path)
