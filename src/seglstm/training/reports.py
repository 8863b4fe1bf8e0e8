"""What people look at after a run: mmseg-style metric tables, the confusion matrix, colour masks, overlays.

Everything here works on plain numpy arrays / metric dicts so the test callback, ``seglstm demo`` and the
prediction writers share it. Figures use matplotlib's object API (no pyplot state), and every file is
written through :func:`seglstm.utils.io.atomic_path`.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from seglstm.data.base import colorize
from seglstm.metrics import MEAN_KEYS, PER_CLASS_KEYS
from seglstm.utils.io import atomic_path, atomic_write_bytes, atomic_write_text


def _pct(value: float) -> str:
    return "nan" if math.isnan(value) else f"{100.0 * value:.2f}"


def _as_list(value: Any) -> list[float]:
    return value.tolist() if isinstance(value, torch.Tensor) else [float(v) for v in value]


def format_metrics_table(results: dict[str, Any], class_names: Sequence[str]) -> str:
    """Markdown per-class table then the means, in percent with 2 decimals as mmseg prints them."""
    per_class = {key: _as_list(results[key]) for key in PER_CLASS_KEYS}
    if len(class_names) != len(per_class["IoU"]):
        raise ValueError(f"{len(class_names)} class names for {len(per_class['IoU'])} classes")
    width = max(len("Class"), *(len(n) for n in class_names))

    def row(first: str | None, cells: Sequence[str], widths: Sequence[int]) -> str:
        parts = ([first.ljust(width)] if first is not None else []) + [c.rjust(w) for c, w in zip(cells, widths)]
        return "| " + " | ".join(parts) + " |"

    def rule(widths: Sequence[int]) -> str:
        return "|" + "|".join("-" * (w + 2) for w in widths) + "|"

    class_widths = [max(len(k), 6) for k in PER_CLASS_KEYS]
    mean_widths = [max(len(k), 6) for k in MEAN_KEYS]
    lines = [row("Class", PER_CLASS_KEYS, class_widths), rule([width, *class_widths])]
    for i, name in enumerate(class_names):
        lines.append(row(name, [_pct(per_class[k][i]) for k in PER_CLASS_KEYS], class_widths))
    lines += [
        "",
        row(None, MEAN_KEYS, mean_widths),
        rule(mean_widths),
        row(None, [_pct(float(results[k])) for k in MEAN_KEYS], mean_widths),
    ]
    return "\n".join(lines)


def _json_number(value: float) -> float | None:
    # JSON has no NaN: an undefined metric (0/0) is written as null.
    return None if math.isnan(value) else float(value)


def metrics_to_dict(results: dict[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
    """JSON-ready metrics as fractions: the means, a per-class block, and the raw confusion matrix."""
    out: dict[str, Any] = {k: _json_number(float(results[k])) for k in MEAN_KEYS}
    out["per_class"] = {
        name: {k: _json_number(_as_list(results[k])[i]) for k in PER_CLASS_KEYS}
        for i, name in enumerate(class_names)
    }
    if "confusion_matrix" in results:
        out["confusion_matrix"] = {
            "rows": "label",
            "columns": "prediction",
            "classes": list(class_names),
            "counts": torch.as_tensor(results["confusion_matrix"]).tolist(),
        }
    return out


def plot_confusion_matrix(
    normalized: np.ndarray | torch.Tensor, class_names: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """Row-normalised confusion matrix (label rows, prediction columns) as a PNG heat map."""
    cm = np.asarray(torch.as_tensor(normalized, dtype=torch.float64))
    k = len(class_names)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix of shape {cm.shape} for {k} class names")
    size = max(4.0, 0.6 * k + 2.0)
    fig = Figure(figsize=(size + 1.0, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown = np.ma.masked_invalid(cm)
    im = ax.imshow(shown, vmin=0.0, vmax=1.0, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), labels=class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), labels=class_names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("label")
    if title:
        ax.set_title(title)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if not math.isnan(cm[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{100 * cm[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if cm[i, j] > 0.5 else "black",
                    )
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def write_metrics_report(
    out_dir: str | Path, results: dict[str, Any], class_names: Sequence[str], title: str = "test"
) -> dict[str, Path]:
    """``metrics.json``, ``metrics.md`` and ``confusion_matrix.png`` under ``out_dir``."""
    out_dir = Path(out_dir)
    paths = {
        "json": out_dir / "metrics.json",
        "markdown": out_dir / "metrics.md",
        "confusion_matrix": out_dir / "confusion_matrix.png",
    }
    atomic_write_text(paths["json"], json.dumps(metrics_to_dict(results, class_names), indent=2) + "\n")
    atomic_write_text(
        paths["markdown"], f"# {title} metrics\n\n{format_metrics_table(results, class_names)}\n"
    )
    plot_confusion_matrix(
        results["confusion_matrix_normalized"], class_names, paths["confusion_matrix"], title
    )
    return paths


def overlay(image: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colour mask over an RGB image, as mmseg's ``--show-dir`` visualisations do."""
    if image.shape != color.shape:
        raise ValueError(f"image {image.shape} and colour mask {color.shape} differ in shape")
    return np.clip((1 - alpha) * image.astype(np.float32) + alpha * color.astype(np.float32), 0, 255).astype(
        np.uint8
    )


def to_display_rgb(
    image: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> np.ndarray:
    """A normalised (C, H, W) tensor back to uint8 RGB for display (first three bands).

    With the data's mean/std the normalisation is undone exactly; without them each band is stretched
    between its 2nd and 98th percentiles, the usual quick look at remote-sensing bands.
    """
    x = image.detach().float().cpu()
    if x.ndim != 3:
        raise ValueError(f"expected one (C, H, W) image, got shape {tuple(x.shape)}")
    x = x[:3] if x.shape[0] >= 3 else x[:1].expand(3, -1, -1)
    if mean is not None and std is not None:
        m = torch.as_tensor(list(mean)[:3], dtype=torch.float32).view(-1, 1, 1)
        s = torch.as_tensor(list(std)[:3], dtype=torch.float32).view(-1, 1, 1)
        x = x * s + m
    else:
        flat = x.reshape(3, -1)
        lo = torch.quantile(flat, 0.02, dim=1).view(3, 1, 1)
        hi = torch.quantile(flat, 0.98, dim=1).view(3, 1, 1)
        x = 255.0 * (x - lo) / (hi - lo).clamp_min(1e-6)
    return x.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (H, W, 3) uint8 image to ``size`` = (H, W)."""
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def save_png(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"PNG writer expects uint8, got {array.dtype} for {path}")
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return Path(path)


def prediction_grid(
    rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    palette: Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: str | Path,
    titles: Sequence[str] | None = None,
) -> Path:
    """A figure with one row per sample: image, ground truth, prediction, and a class legend."""
    if not rows:
        raise ValueError("prediction_grid needs at least one (image, label, prediction) row")
    n = len(rows)
    fig = Figure(figsize=(9.0, 3.0 * n + 0.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 3, squeeze=False)
    for r, (image, label, pred) in enumerate(rows):
        for c, (panel, name) in enumerate(
            (
                (image, "image"),
                (colorize(label, palette), "ground truth"),
                (colorize(pred, palette), "prediction"),
            )
        ):
            ax = axes[r][c]
            ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name)
            if c == 0 and titles is not None:
                ax.set_ylabel(titles[r], fontsize=8)
    from matplotlib.patches import Patch

    handles = [Patch(color=np.asarray(palette[i]) / 255.0, label=name) for i, name in enumerate(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.6 / (3.0 * n + 0.8), 1, 1))
    return save_figure(fig, path)
