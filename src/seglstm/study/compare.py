"""The comparison study as one function: train (or evaluate) several segmentors under one data config, recipe,
budget and seed, measure their cost, and write one table (Markdown, JSON, CSV) with two plots.

Every model runs in its own child process and its own folder ``<out>/<model>/`` (checkpoints, logs,
``result.json``, ``error.txt``), so a model that crashes, or is killed for memory, becomes a row that says so
while the others go on; the tables are rewritten after every model. A budget is either a number of training
steps or minutes of training per model. With minutes, the step time measured over the first steps fixes how
many steps fit, and the warm-up/poly schedule is laid over exactly those steps, so every model ends its
schedule (learning rate 0) when its time is up; a hard stop at the time limit stays as a guard.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.callbacks import Callback
from tqdm.auto import tqdm

from seglstm.study.measure import (
    complexity,
    finite_or_none,
    inference_speed,
    machine_info,
    memory_baseline,
    peak_memory_mib,
    resolve_device,
    run_isolated,
    training_speed,
)
from seglstm.utils.io import atomic_write_text

__all__ = [
    "RECIPE_KEYS",
    "Budget",
    "BudgetCallback",
    "CompareConfig",
    "StudyData",
    "evaluate_job",
    "load_study_data",
    "parse_budget",
    "parse_ckpts",
    "parse_devices",
    "parse_key_values",
    "parse_model_overrides",
    "parse_sizes",
    "run_compare",
    "table_columns",
    "train_job",
]

# SegmentationTask arguments that a data/training config may set for every compared model.
RECIPE_KEYS = (
    "lr",
    "betas",
    "weight_decay",
    "no_decay_keys",
    "warmup_iters",
    "warmup_ratio",
    "power",
    "eta_min",
    "test_cfg",
    "ignore_index",
    "compile",
)
SEED_WARMUP_FRACTION = 1500 / 15000  # the seed warms up over the first 10% of its schedule


# -- arguments ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """Training budget per model: ``steps`` optimiser steps, or ``minutes`` of training."""

    steps: int | None = None
    minutes: float | None = None

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.minutes is None):
            raise ValueError("a budget is either steps or minutes")

    def __str__(self) -> str:
        return f"{self.steps} steps" if self.steps is not None else f"{self.minutes:g} min"


def parse_budget(text: str) -> Budget:
    """``"200"`` -> 200 steps; ``"10m"`` (or ``10min``, ``1.5m``) -> minutes of training per model."""
    s = str(text).strip().lower()
    minutes = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:m|min|mins|minutes?)", s)
    if minutes:
        value = float(minutes.group(1))
        if value <= 0:
            raise ValueError(f"--budget {text!r}: minutes must be positive")
        return Budget(minutes=value)
    if re.fullmatch(r"\d+", s):
        steps = int(s)
        if steps < 2:
            raise ValueError(f"--budget {text!r}: at least 2 training steps are needed (one to warm up, one timed)")
        return Budget(steps=steps)
    raise ValueError(
        f"--budget {text!r}: expected a number of training steps (e.g. 200) or minutes per model (e.g. 10m)"
    )


def parse_sizes(text: str, option: str = "--sizes") -> list[int]:
    """``"512,1024"`` -> ``[512, 1024]`` (positive, unique, in the given order)."""
    try:
        sizes = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"{option} {text!r}: expected comma-separated pixel sizes such as 512,1024") from err
    if not sizes or any(s < 16 for s in sizes):
        raise ValueError(f"{option} {text!r}: sizes must be integers >= 16")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"{option} {text!r}: a size is repeated")
    return sizes


def _yaml_value(text: str) -> Any:
    text = text.strip()
    if text.startswith("(") and text.endswith(")"):  # let users write tuples as Python does
        text = "[" + text[1:-1] + "]"
    value = yaml.safe_load(text) if text else ""
    if isinstance(value, str):  # PyYAML reads 1e-3 as a string (YAML 1.1); users mean a number
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_key_values(items: Sequence[str], option: str) -> dict[str, Any]:
    """``["batch_size=2", "crop_size=[128,128]"]`` -> a dict with YAML-parsed values."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = _yaml_value(value)
        except yaml.YAMLError as err:
            raise ValueError(f"{option} {item!r}: the value is not valid YAML ({err})") from err
    return out


def parse_model_overrides(items: Sequence[str], models: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["seglstm_upernet_s:embed_dim=192", ...]`` -> ``{"seglstm_upernet_s": {"embed_dim": 192}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, rest = item.partition(":")
        if not sep or "=" not in rest:
            raise ValueError(f"--model-overrides {item!r}: expected MODEL:KEY=VALUE")
        name = name.strip()
        if name not in models:
            raise ValueError(f"--model-overrides {item!r}: {name!r} is not one of --models ({', '.join(models)})")
        out.setdefault(name, {}).update(parse_key_values([rest], "--model-overrides"))
    return out


def parse_ckpts(text: str | None, models: Sequence[str]) -> dict[str, Path]:
    """``"name=path,name=path"`` -> checkpoints to evaluate instead of training those models."""
    out: dict[str, Path] = {}
    for item in [v for v in (text or "").split(",") if v.strip()]:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"--ckpts {item!r}: expected MODEL=PATH")
        if name not in models:
            raise ValueError(f"--ckpts {item!r}: {name!r} is not one of --models ({', '.join(models)})")
        if not Path(path).is_file():
            raise ValueError(f"--ckpts {item!r}: {path} does not exist or is not a file")
        out[name] = Path(path)
    return out


def parse_devices(text: str | int, accelerator: str = "auto") -> tuple[str, Any, str]:
    """Resolve ``--accelerator``/``--devices`` to (accelerator, Lightning ``devices``, measurement device).

    Each model trains on one device: ``auto`` or ``1`` (the first), ``N,`` or ``[N]`` or ``cuda:N`` (GPU N).
    """
    spec = str(text).strip().lower()
    acc = accelerator.lower()
    if acc not in ("auto", "cpu", "cuda", "gpu"):
        raise ValueError(f"--accelerator {accelerator!r}: expected auto, cpu, cuda or gpu")
    cuda = acc in ("cuda", "gpu") or (acc == "auto" and torch.cuda.is_available())
    if acc in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ValueError(f"--accelerator {accelerator}: CUDA is not available on this machine")
    index: int | None = None
    if spec in ("auto", "1"):
        index = 0
    else:
        m = re.fullmatch(r"\[?\s*(\d+)\s*,?\s*\]?|cuda:(\d+)", spec)
        if m and (spec.endswith(",") or spec.startswith("[") or spec.startswith("cuda:")):
            index = int(m.group(1) or m.group(2))
    if index is None:
        raise ValueError(
            f"--devices {text!r}: compare trains each model on one device; give auto, 1, or one GPU index as "
            "N, (e.g. 0,) or cuda:N. Train on several GPUs with `seglstm fit` and evaluate with --ckpts"
        )
    if not cuda:
        if index != 0:
            raise ValueError(f"--devices {text!r}: a GPU index needs CUDA")
        return "cpu", 1, "cpu"
    if index >= torch.cuda.device_count():
        raise ValueError(f"--devices {text!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return "cuda", [index], f"cuda:{index}"


# -- data config ----------------------------------------------------------------------------------------


@dataclass
class StudyData:
    """What the study takes from a config file: the data section, the shared recipe and the schedule."""

    path: str
    data: dict[str, Any]
    recipe: dict[str, Any]
    warmup_fraction: float
    precision: str
    gradient_clip_val: float | None
    ignored: list[str] = field(default_factory=list)


def load_study_data(path: str | Path, data_overrides: Mapping[str, Any] | None = None) -> StudyData:
    """Read ``data`` (with ``data_overrides`` on top), the recipe keys of ``model`` and ``trainer`` settings.

    The model choice in the file (``model.model``, ``model.model_kwargs``) is ignored: ``--models`` and
    ``--model-overrides`` decide. The warm-up keeps the config's share of its schedule (the seed's 1500 of
    15000 iterations when the file has no schedule).
    """
    from seglstm.training.config import compose_config

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data {path}: config file does not exist")
    cfg = compose_config(path)
    data = dict(cfg.get("data") or {})
    if not data:
        raise ValueError(f"--data {path}: the config has no data section")
    data.update(data_overrides or {})
    model_cfg = dict(cfg.get("model") or {})
    recipe = {k: model_cfg[k] for k in RECIPE_KEYS if k in model_cfg}
    ignored = sorted(k for k in model_cfg if k not in RECIPE_KEYS)
    trainer_cfg = dict(cfg.get("trainer") or {})
    max_steps = trainer_cfg.get("max_steps")
    warmup = recipe.pop("warmup_iters", None)
    if warmup is not None and isinstance(max_steps, int) and max_steps > 0:
        fraction = float(warmup) / max_steps
    elif warmup is not None and int(warmup) == 0:
        fraction = 0.0
    else:
        fraction = SEED_WARMUP_FRACTION
    clip = trainer_cfg.get("gradient_clip_val")
    return StudyData(
        path=str(path),
        data=data,
        recipe=recipe,
        warmup_fraction=fraction,
        precision=str(trainer_cfg.get("precision") or "auto"),
        gradient_clip_val=None if clip is None else float(clip),
        ignored=ignored,
    )


def warmup_for(steps: int, fraction: float) -> int:
    """Warm-up length for a ``steps``-long schedule: 0, or 2..steps-2 (WarmupPoly's valid range)."""
    warm = round(steps * fraction)
    return warm if 2 <= warm <= steps - 2 else 0


def _synthetic_note(root: Path) -> str | None:
    meta = root / "meta.json"
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if info.get("generator") == "seglstm.data.synthetic":
        return f"synthetic LoveDA-like scenes (`seglstm synth`, seed {info.get('seed')}, {info.get('size')} px)"
    return None


# -- training in a child process ------------------------------------------------------------------------


class BudgetCallback(Callback):
    """Stops training at the budget, lays the schedule over a time budget, and measures training speed.

    With a time budget, the step time between the end of step ``skip`` and the end of step ``probe_steps``
    decides how many steps fit in the rest of the time; the warm-up/poly schedule is then stretched over
    exactly that many steps (until then it runs the warm-up's first, near-zero rates). Training throughput
    counts images from the end of step ``skip`` to the end of the last step (the first steps pay one-off
    costs); peak memory covers the whole ``fit``.
    """

    def __init__(
        self,
        steps: int | None,
        seconds: float | None,
        warmup_fraction: float,
        device: torch.device,
        baseline: float,
        probe_steps: int = 2,
        skip: int = 1,
    ) -> None:
        super().__init__()
        self.steps, self.seconds = steps, seconds
        self.warmup_fraction = warmup_fraction
        self.device, self.baseline = device, baseline
        self.probe_steps, self.skip = max(probe_steps, skip + 1), skip
        self.planned: int | None = steps
        self.stop_reason = "steps"
        self.t0 = self.t_mark = self.t_last = 0.0
        self.images = 0
        self.done = 0
        self.peak_mib: float | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.t0 = self.t_mark = self.t_last = time.perf_counter()

    def _reschedule(self, trainer: Any, total: int) -> None:
        schedule = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
        schedule.warmup_iters = warmup_for(total, self.warmup_fraction)
        schedule.max_iters = total

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        step = trainer.global_step
        if step == self.skip:
            self.t_mark = now
        elif step > self.skip:
            self.images += int(batch["image"].shape[0])
        self.t_last, self.done = now, step
        if self.seconds is None:
            return
        elapsed = now - self.t0
        if self.planned is None and step >= self.probe_steps:
            per_step = (now - self.t_mark) / (step - self.skip)
            self.planned = step + max(1, int((self.seconds - elapsed) / per_step))
            self._reschedule(trainer, self.planned)
        if elapsed >= self.seconds and (self.planned is None or step < self.planned):
            self.stop_reason = "time"
            trainer.should_stop = True
        elif self.planned is not None and step >= self.planned:
            trainer.should_stop = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.peak_mib = peak_memory_mib(self.device, self.baseline)

    def stats(self) -> dict[str, Any]:
        timed = self.t_last - self.t_mark
        return {
            "steps": self.done,
            "planned_steps": self.planned,
            "stop_reason": self.stop_reason,
            "train_seconds": self.t_last - self.t0,
            "images_per_s": self.images / timed if self.images and timed > 0 else None,
            "peak_mib": self.peak_mib,
        }


def _results_to_json(results: Mapping[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
    from seglstm.training.reports import metrics_to_dict

    out = metrics_to_dict(results, class_names)
    out.pop("confusion_matrix", None)
    return out


def _build_task(name: str, num_classes: int, overrides: Mapping[str, Any], recipe: Mapping[str, Any],
                max_iters: int | None, warmup_iters: int) -> Any:
    from seglstm.training.task import SegmentationTask

    return SegmentationTask(
        model=name,
        num_classes=num_classes,
        model_kwargs=dict(overrides),
        max_iters=max_iters,
        warmup_iters=warmup_iters,
        **dict(recipe),
    )


def _test(task: Any, dm: Any, out_dir: Path, accelerator: str, devices: Any, precision: str) -> dict[str, Any]:
    from seglstm.training.trainer import SegTrainer

    tester = SegTrainer(
        default_root_dir=str(out_dir), accelerator=accelerator, devices=devices, precision=precision,
        logger=False, enable_checkpointing=False,
    )  # fmt: skip
    tester.test(task, datamodule=dm, verbose=False)
    return _results_to_json(task.test_results, task.class_names)


def train_job(
    name: str,
    out_dir: str,
    data: Mapping[str, Any],
    recipe: Mapping[str, Any],
    overrides: Mapping[str, Any],
    steps: int | None,
    minutes: float | None,
    warmup_fraction: float,
    seed: int,
    accelerator: str,
    devices: Any,
    device: str,
    precision: str,
    gradient_clip_val: float | None,
) -> dict[str, Any]:
    """Train one model under the budget, save ``checkpoints/last.ckpt``, score the test split (child process)."""
    import lightning.pytorch as pl

    from seglstm.data.datamodule import SegDataModule
    from seglstm.training.trainer import SegTrainer

    out = Path(out_dir)
    pl.seed_everything(seed, workers=True, verbose=False)
    dm = SegDataModule(**dict(data))
    dev = resolve_device(device)
    baseline = memory_baseline(dev)
    # A time budget starts with a long placeholder schedule; BudgetCallback replaces it after the probe steps.
    max_iters = steps if steps is not None else 10**9
    task = _build_task(name, dm.num_classes, overrides, recipe, max_iters, warmup_for(max_iters, warmup_fraction))
    budget = BudgetCallback(steps, None if minutes is None else 60.0 * minutes, warmup_fraction, dev, baseline)
    trainer = SegTrainer(
        default_root_dir=str(out),
        accelerator=accelerator,
        devices=devices,
        precision=precision,
        max_steps=steps if steps is not None else -1,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        gradient_clip_val=gradient_clip_val,
        log_every_n_steps=max(1, min(50, (steps or 50) // 10)),
        callbacks=[budget],
    )
    trainer.fit(task, datamodule=dm)
    ckpt = out / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(str(ckpt))
    return {
        "mode": "train",
        "checkpoint": str(ckpt),
        "train": {**budget.stats(), "batch_size": dm.batch_size, "crop_size": list(dm.crop_size)},
        "metrics": _test(task, dm, out, accelerator, devices, precision),
    }


def evaluate_job(
    name: str,
    out_dir: str,
    data: Mapping[str, Any],
    recipe: Mapping[str, Any],
    overrides: Mapping[str, Any],
    ckpt: str,
    seed: int,
    accelerator: str,
    devices: Any,
    precision: str,
) -> dict[str, Any]:
    """Score a given checkpoint on the test split (child process).

    A checkpoint of ``seglstm fit`` records its preset and overrides, which then build the model (its preset
    must be ``name``); a bare state dict (e.g. the seed's mmseg ``.pth``) is loaded into ``name`` built with
    ``overrides``.
    """
    import lightning.pytorch as pl

    from seglstm.data.datamodule import SegDataModule
    from seglstm.models.checkpoint import load_pretrained
    from seglstm.utils.io import torch_load

    pl.seed_everything(seed, workers=True, verbose=False)
    dm = SegDataModule(**dict(data))
    stored = torch_load(ckpt)
    hparams = dict(stored.get("hyper_parameters") or {}) if isinstance(stored, Mapping) else {}
    if hparams.get("model") is not None:
        if hparams["model"] != name:
            raise ValueError(f"--ckpts {name}={ckpt}: the checkpoint holds a {hparams['model']!r} model")
        overrides = dict(hparams.get("model_kwargs") or {})
    task = _build_task(name, dm.num_classes, overrides, recipe, 2, 0)
    load_pretrained(task.model, stored, strict=True)
    return {
        "mode": "evaluate",
        "checkpoint": str(ckpt),
        "model_kwargs": dict(overrides),
        "metrics": _test(task, dm, Path(out_dir), accelerator, devices, precision),
    }


# -- the study ------------------------------------------------------------------------------------------


@dataclass
class CompareConfig:
    """Everything one ``seglstm compare`` run depends on (see ``seglstm compare --help``)."""

    models: list[str]
    data_config: str
    budget: Budget
    out: str = "runs/compare"
    ckpts: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    data_overrides: dict[str, Any] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=lambda: [512, 1024])
    flops_size: int = 512
    seed: int = 0
    accelerator: str = "auto"
    devices: str = "auto"
    repeats: int = 3
    reuse: bool = False

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("--models: give at least one model")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"--models {','.join(self.models)}: a model is listed twice")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")


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


def build_row(name: str, result: Mapping[str, Any], class_names: Sequence[str], sizes: Sequence[int],
              flops_size: int = 512) -> dict[str, Any]:
    """One table row from a model's ``result`` (what ``<out>/<model>/result.json`` holds)."""
    row: dict[str, Any] = dict.fromkeys(table_columns(class_names, sizes, flops_size))
    row["model"] = name
    overrides = result.get("overrides") or {}
    row["overrides"] = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items()) or None
    errors = dict(result.get("errors") or {})
    if result.get("pending"):
        row["status"] = "pending"
    elif not errors:
        row["status"] = "ok"
    else:
        row["status"] = "; ".join(f"{stage} failed: {_short(msg)}" for stage, msg in errors.items())
    run = result.get("run") or {}
    train = run.get("train") or {}
    if train:
        row["steps"] = train.get("steps")
        seconds = finite_or_none(train.get("train_seconds"))
        row["train_min"] = None if seconds is None else seconds / 60
    metrics = run.get("metrics") or {}
    if metrics:
        per_class = metrics.get("per_class") or {}
        for c in class_names:
            row[f"IoU.{c}"] = _pct((per_class.get(c) or {}).get("IoU"))
        row["mIoU"], row["mF1"], row["OA"] = (_pct(metrics.get(k)) for k in ("mIoU", "mFscore", "aAcc"))
    cost = result.get("complexity") or {}
    if cost:
        row["params_M"] = cost["params"] / 1e6
        row[f"GFLOPs_{flops_size}"] = cost["flops"] / 1e9
    speed = result.get("train_speed") or {}
    row["train_img_s"] = finite_or_none(speed.get("images_per_s"))
    row["train_mem_MiB"] = finite_or_none(speed.get("peak_mib"))
    for s in sizes:
        infer = (result.get("inference") or {}).get(str(s)) or {}
        row[f"infer_img_s_{s}"] = finite_or_none(infer.get("images_per_s"))
        row[f"infer_mem_MiB_{s}"] = finite_or_none(infer.get("peak_mib"))
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
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    return buf.getvalue()


def _safe_dir(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _fingerprint(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def _write_outputs(out: Path, payload: dict[str, Any]) -> dict[str, Path]:
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
        f"- **{name}** {stage}: `{msg.splitlines()[0]}` (see `{_safe_dir(name)}/error_{stage}.txt`)"
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


def _record_error(model_dir: Path, errors: dict[str, str], stage: str, res: Mapping[str, Any]) -> None:
    errors[stage] = str(res["error"])
    atomic_write_text(model_dir / f"error_{stage}.txt", str(res.get("traceback") or res["error"]) + "\n")


def _load() -> float | None:
    """The 1-minute load average: on a shared machine it says how much to trust a model's timings."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _builds(name: str, num_classes: int, overrides: Mapping[str, Any]) -> bool:
    """Whether the model builds for real (the FLOP count builds it on the meta device, which may be what failed)."""
    from seglstm.models.registry import create_model

    try:
        create_model(name, num_classes=num_classes, **dict(overrides))
    except Exception:
        return False
    return True


def run_compare(cfg: CompareConfig, progress: bool = True) -> dict[str, Any]:
    """Run the study; returns the JSON payload written to ``<out>/compare.json`` (plus ``paths``)."""
    from seglstm.data.datamodule import SegDataModule
    from seglstm.models.registry import list_models
    from seglstm.training.trainer import resolve_precision

    known = set(list_models())
    unknown = [m for m in cfg.models if m not in known]
    if unknown:
        raise ValueError(f"--models: unknown model(s) {', '.join(unknown)}; `seglstm.list_models()` lists them")
    study = load_study_data(cfg.data_config, cfg.data_overrides)
    study.data["seed"] = cfg.seed  # one seed for shuffling and augmentation, as for the weights
    accelerator, devices, device = parse_devices(cfg.devices, cfg.accelerator)
    precision = str(resolve_precision(study.precision, accelerator))
    dm = SegDataModule(**study.data)  # checks the data before any model runs
    split_sizes = {}
    for split, train in (("train", True), (dm.test_split, False)):
        split_sizes[split] = len(dm.build_split(split, train=train))
    classes = list(dm.classes)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_size = cfg.flops_size if cfg.flops_size in cfg.sizes else cfg.sizes[0]
    settings = {
        "models": list(cfg.models),
        "data_config": study.path,
        "data": study.data,
        "data_overrides": cfg.data_overrides,
        "synthetic": _synthetic_note(Path(study.data.get("root", ""))),
        "split_sizes": ", ".join(f"{k} {v} images" for k, v in split_sizes.items()),
        "recipe": study.recipe,
        "warmup_fraction": study.warmup_fraction,
        "ignored_config_keys": study.ignored,
        "budget": str(cfg.budget),
        "seed": cfg.seed,
        "overrides": cfg.overrides,
        "ckpts": {k: str(v) for k, v in cfg.ckpts.items()},
        "sizes": list(cfg.sizes),
        "flops_size": cfg.flops_size,
        "plot_size": plot_size,
        "repeats": cfg.repeats,
        "device": device,
        "precision": precision,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
    }
    columns = table_columns(classes, cfg.sizes, cfg.flops_size)
    results: dict[str, dict[str, Any]] = {m: {"pending": True} for m in cfg.models}
    payload: dict[str, Any] = {"settings": settings, "classes": classes, "columns": columns, "units": {
        "IoU.*": "%", "mIoU": "%", "mF1": "%", "OA": "%", "train_min": "minutes", "params_M": "millions",
        "GFLOPs_*": "1e9 FLOPs (2 x MACs)", "*_img_s*": "images per second", "*_MiB*": "MiB (2**20 bytes)",
    }}  # fmt: skip

    def publish() -> dict[str, Path]:
        payload["rows"] = [build_row(m, results[m], classes, cfg.sizes, cfg.flops_size) for m in cfg.models]
        payload["models"] = results
        return _write_outputs(out, payload)

    publish()
    bar = tqdm(cfg.models, desc="compare", unit="model", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        model_dir = out / _safe_dir(name)
        overrides = dict(cfg.overrides.get(name) or {})
        ckpt = cfg.ckpts.get(name)
        key = _fingerprint({"name": name, "overrides": overrides, "ckpt": str(ckpt), "data": study.data,
                            "recipe": study.recipe, "budget": str(cfg.budget), "seed": cfg.seed,
                            "sizes": cfg.sizes, "flops": cfg.flops_size, "repeats": cfg.repeats,
                            "device": device, "precision": precision})  # fmt: skip
        previous = model_dir / "result.json"
        if cfg.reuse and previous.is_file():
            old = json.loads(previous.read_text())
            if old.get("fingerprint") == key and not old.get("errors"):
                results[name] = old
                tqdm.write(f"compare: {name}: reusing {previous}")
                publish()
                continue
        result: dict[str, Any] = {"fingerprint": key, "overrides": overrides, "errors": {},
                                  "load_average_1m": {"start": _load()}}  # fmt: skip
        errors = result["errors"]
        try:
            result["complexity"] = complexity(name, len(classes), overrides, cfg.flops_size)
        except Exception as err:  # a model that cannot be built is a row with its error
            stage = "flops" if _builds(name, len(classes), overrides) else "build"
            _record_error(model_dir, errors, stage, {"error": f"{type(err).__name__}: {err}",
                                                      "traceback": traceback.format_exc()})
        if "build" in errors:
            results[name] = result
            atomic_write_text(previous, json.dumps(result, indent=2, default=str) + "\n")
            tqdm.write(f"compare: {name}: cannot be built: {errors['build']}")
            publish()
            continue
        common = dict(name=name, out_dir=str(model_dir), data=study.data, recipe=study.recipe,
                      overrides=overrides, seed=cfg.seed, accelerator=accelerator, devices=devices,
                      precision=precision)  # fmt: skip
        if ckpt is None:
            tqdm.write(f"compare: {name}: training for {cfg.budget}")
            timeout = None if cfg.budget.minutes is None else 60 * (3 * cfg.budget.minutes + 30)
            run = run_isolated(train_job, timeout=timeout, steps=cfg.budget.steps, minutes=cfg.budget.minutes,
                               warmup_fraction=study.warmup_fraction, device=device,
                               gradient_clip_val=study.gradient_clip_val, **common)  # fmt: skip
            stage = "train"
        else:
            tqdm.write(f"compare: {name}: evaluating {ckpt}")
            run = run_isolated(evaluate_job, ckpt=str(ckpt), **common)
            stage = "evaluate"
        if "error" in run:
            _record_error(model_dir, errors, stage, run)
        else:
            result["run"] = run
            if run.get("train"):
                result["train_speed"] = {
                    "images_per_s": run["train"]["images_per_s"],
                    "peak_mib": run["train"]["peak_mib"],
                    "source": "training run",
                }
        if "train_speed" not in result:
            speed = run_isolated(training_speed, name=name, num_classes=len(classes), overrides=overrides,
                                 size=int(dm.crop_size[0]), batch=dm.batch_size, device=device,
                                 repeats=cfg.repeats, precision=precision,
                                 recipe={**study.recipe, "warmup_iters": 0}, seed=cfg.seed)  # fmt: skip
            if "error" in speed:
                _record_error(model_dir, errors, "train_speed", speed)
            else:
                result["train_speed"] = {**speed, "source": "timed steps on random data"}
        result["inference"] = {}
        for size in cfg.sizes:
            res = run_isolated(inference_speed, name=name, num_classes=len(classes), overrides=overrides,
                               size=size, device=device, repeats=cfg.repeats, precision=precision,
                               seed=cfg.seed)  # fmt: skip
            if "error" in res:
                _record_error(model_dir, errors, f"inference_{size}", res)
            else:
                result["inference"][str(size)] = res
        result["load_average_1m"]["end"] = _load()
        atomic_write_text(previous, json.dumps(result, indent=2, default=str) + "\n")
        results[name] = result
        status = "ok" if not errors else "; ".join(errors)
        tqdm.write(f"compare: {name}: {status}")
        publish()
    bar.close()
    settings["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    paths = publish()
    payload["paths"] = {k: str(v) for k, v in paths.items()}
    return payload

