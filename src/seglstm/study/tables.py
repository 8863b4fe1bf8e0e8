"""The comparison's outputs: one row per model from its ``result.json``, rendered as Markdown and CSV next to
the JSON payload and two plots.

Rows are plain dicts keyed by :func:`table_columns`; metrics are mmseg's, in percent
(docs/design.md, section 8).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from seglstm.study.measure import finite_or_none
from seglstm.utils.io import atomic_write_text

__all__ = ["build_row", "csv_text", "markdown_table", "model_dir_name", "table_columns", "write_outputs"]


def table_columns(class_names: Sequence[str], sizes: Sequence[int], flops_size: int = 512) -> list[str]:
    """Column keys of the comparison table, in order (CSV header, JSON row keys)."""
    cols = ["model", "overrides", "status", "steps", "train_min"]
    cols += [f"IoU.{c}" for c in class_names]
    cols += ["mIoU", "mF1", "OA", "params_M", f"GFLOPs_{flops_size}", "train_img_s"]
    cols += [f"infer_img_s_{s}" for s in sizes]
    cols += ["train_mem_MiB"]
    cols += [f"infer_mem_MiB_{s}" for s in sizes]
    return cols


def _label(col: str) -> str:
    """Markdown header for a column key."""
    fixed = {"train_min": "train min", "params_M": "params (M)", "train_img_s": "train img/s",
             "train_mem_MiB": "train peak MiB", "OA": "OA (aAcc)", "mF1": "mF1 (mFscore)"}  # fmt: skip
    if col in fixed:
        return fixed[col]
    if col.startswith("GFLOPs_"):
        return f"GFLOPs@{col[7:]}"
    if col.startswith("infer_img_s_"):
        return f"infer img/s@{col[12:]}"
    if col.startswith("infer_mem_MiB_"):
        return f"infer peak MiB@{col[14:]}"
    return col


def _pct(value: Any) -> float | None:
    value = finite_or_none(value)
    return None if value is None else 100.0 * value


def _short(message: str, limit: int = 100) -> str:
    line = str(message).splitlines()[0] if str(message).strip() else "unknown error"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _status(result: Mapping[str, Any]) -> str:
    errors = dict(result.get("errors") or {})
    if result.get("pending"):
        return "pending"
    if not errors:
        return "ok"
    return "; ".join(f"{stage} failed: {_short(msg)}" for stage, msg in errors.items())


def _run_cells(run: Mapping[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
    """Steps, training time and the test-split metrics of a training or evaluation run."""
    cells: dict[str, Any] = {}
    train = run.get("train") or {}
    if train:
        seconds = finite_or_none(train.get("train_seconds"))
        cells["steps"] = train.get("steps")
        cells["train_min"] = None if seconds is None else seconds / 60
    metrics = run.get("metrics") or {}
    if metrics:
        per_class = metrics.get("per_class") or {}
        cells.update({f"IoU.{c}": _pct((per_class.get(c) or {}).get("IoU")) for c in class_names})
        cells.update({col: _pct(metrics.get(key)) for col, key in (("mIoU", "mIoU"), ("mF1", "mFscore"), ("OA", "aAcc"))})
    return cells


def _cost_cells(result: Mapping[str, Any], sizes: Sequence[int], flops_size: int) -> dict[str, Any]:
    """Size, FLOPs, training and inference speed and peak memory."""
    cells: dict[str, Any] = {}
    cost = result.get("complexity") or {}
    if cost:
        cells["params_M"] = cost["params"] / 1e6
        cells[f"GFLOPs_{flops_size}"] = cost["flops"] / 1e9
    speed = result.get("train_speed") or {}
    cells["train_img_s"] = finite_or_none(speed.get("images_per_s"))
    cells["train_mem_MiB"] = finite_or_none(speed.get("peak_mib"))
    for s in sizes:
        infer = (result.get("inference") or {}).get(str(s)) or {}
        cells[f"infer_img_s_{s}"] = finite_or_none(infer.get("images_per_s"))
        cells[f"infer_mem_MiB_{s}"] = finite_or_none(infer.get("peak_mib"))
    return cells


def build_row(name: str, result: Mapping[str, Any], class_names: Sequence[str], sizes: Sequence[int],
              flops_size: int = 512) -> dict[str, Any]:
    """One table row from a model's ``result`` (what ``<out>/<model>/result.json`` holds)."""
    row: dict[str, Any] = dict.fromkeys(table_columns(class_names, sizes, flops_size))
    overrides = result.get("overrides") or {}
    row["model"] = name
    row["overrides"] = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items()) or None
    row["status"] = _status(result)
    row.update(_run_cells(result.get("run") or {}, class_names))
    row.update(_cost_cells(result, sizes, flops_size))
    return row


def _fmt(col: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value.replace("|", "\\|")
    if isinstance(value, int):
        return str(value)
    if col.startswith(("IoU.", "mIoU", "mF1", "OA")):
        return f"{value:.2f}"
    if col in ("params_M", "train_min") or col.startswith("GFLOPs_"):
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    if col.endswith("MiB") or "_MiB_" in col:
        return f"{value:.0f}"
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """The comparison as one Markdown table (metrics in percent, as mmseg prints them)."""
    lines = ["| " + " | ".join(_label(c) for c in columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(c, r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """The rows as CSV with ``columns`` as header; missing values are empty cells."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    return buf.getvalue()


def model_dir_name(name: str) -> str:
    """The folder name of a model's outputs under ``--out`` (anything but ``[A-Za-z0-9_.-]`` becomes ``_``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _settings_lines(settings: Mapping[str, Any]) -> list[str]:
    data = settings["data"]
    lines = [
        f"- **data**: `{settings['data_config']}` -> dataset `{data.get('dataset')}` at `{data.get('root')}`"
        + (f", **{settings['synthetic']}**, not real imagery" if settings.get("synthetic") else "")
        + f"; {settings['split_sizes']}",
        f"- **training**: {settings['budget']} per model, crop {data.get('crop_size')}, batch "
        f"{data.get('batch_size')}, seed {settings['seed']}, recipe {settings['recipe']} with warm-up over "
        f"{settings['warmup_fraction']:.0%} of the steps then poly to 0",
        f"- **evaluation**: split `{data.get('test_split', 'val')}`, test_scale {data.get('test_scale')}, "
        f"test_cfg {settings['recipe'].get('test_cfg', {'mode': 'whole'})}",
        f"- **device**: {settings['device']}, precision {settings['precision']}; inference timed on random "
        f"input, batch 1, median of {settings['repeats']} calls after one warm-up",
    ]
    for name, kw in settings["overrides"].items():
        lines.append(f"- **{name}** overrides: `{json.dumps(kw)}`")
    for name, path in settings["ckpts"].items():
        lines.append(f"- **{name}**: evaluated from `{path}` (not trained here)")
    m = settings["machine"]
    lines.append(
        f"- **machine**: {m.get('cpu')}, {m.get('cores')} cores, {m.get('torch_threads')} torch threads, "
        f"{m.get('memory_gib')} GiB RAM" + (f", {m['gpu']}" if m.get("gpu") else "")
        + f", load average {m.get('load_average_1m')} at start; torch {m.get('torch')}, commit {m.get('git')}"
    )
    return lines


NOTES = """\
Metrics are mmseg's IoUMetric over the whole split, in percent: per-class IoU, mIoU, mF1 = mFscore,
OA = aAcc. FLOPs are 2 x MACs of one forward pass (halve them to compare with mmseg/fvcore "FLOPs").
Training img/s is measured during the run itself (data loading included, first step excluded); for a model
evaluated from a checkpoint it comes from timed training steps on random data. Peak memory is the CUDA
allocator's peak, or on a CPU the growth of the process's resident-set high-water mark above what was in
use before the model was built (weights, optimiser state, activations, allocator caches)."""


def write_outputs(out: Path, payload: dict[str, Any]) -> dict[str, Path]:
    """Write ``compare.md``, ``compare.json``, ``compare.csv`` and the two plots (each file atomically)."""
    from seglstm.study.plots import plot_miou_vs_time, plot_time_vs_size

    columns, rows, settings = payload["columns"], payload["rows"], payload["settings"]
    paths = {
        "markdown": out / "compare.md",
        "json": out / "compare.json",
        "csv": out / "compare.csv",
        "miou_vs_time": out / "miou_vs_time.png",
        "time_vs_size": out / "time_vs_size.png",
    }
    errors = [
        f"- **{name}** {stage}: `{msg.splitlines()[0]}` (see `{model_dir_name(name)}/error_{stage}.txt`)"
        for name, res in payload["models"].items()
        for stage, msg in (res.get("errors") or {}).items()
    ]
    text = "\n".join(
        [
            "# Model comparison (`seglstm compare`)",
            "",
            *_settings_lines(settings),
            "",
            markdown_table(rows, columns),
            "",
            NOTES,
            *(["", "Failures:", *errors] if errors else []),
            "",
        ]
    )
    atomic_write_text(paths["markdown"], text)
    atomic_write_text(paths["json"], json.dumps(payload, indent=2, default=str) + "\n")
    atomic_write_text(paths["csv"], csv_text(rows, columns))
    plot_miou_vs_time(rows, settings["plot_size"], paths["miou_vs_time"])
    plot_time_vs_size(rows, settings["sizes"], paths["time_vs_size"])
    return paths
