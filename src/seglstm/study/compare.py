"""The comparison study as one function: train (or evaluate) several segmentors under one data config, recipe,
budget and seed, measure their cost, and write one table (Markdown, JSON, CSV) with two plots.

Every model runs in its own child process and its own folder ``<out>/<model>/`` (checkpoints, logs,
``result.json``, ``error.txt``), so a model that crashes, or is killed for memory, becomes a row that says so
while the others go on; the tables are rewritten after every model. A budget is either a number of training
steps or minutes of training per model. With minutes, the step time measured over the first steps fixes how
many steps fit, and the warm-up/poly schedule is laid over exactly those steps, so every model ends its
schedule (learning rate 0) when its time is up; a hard stop at the time limit stays as a guard.

Here: the data config, the per-model step :func:`_run_model` and the loop over models. The command line is
:mod:`seglstm.cli.compare`, the child-process jobs :mod:`seglstm.study.jobs`, the tables
:mod:`seglstm.study.tables`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from seglstm.study.jobs import evaluate_job, train_job
from seglstm.study.measure import complexity, inference_speed, machine_info, run_isolated, training_speed
from seglstm.study.tables import build_row, model_dir_name, table_columns, write_outputs
from seglstm.utils.device import cuda_available, resolve_device, wants_cuda
from seglstm.utils.io import atomic_write_text

__all__ = [
    "RECIPE_KEYS",
    "Budget",
    "CompareConfig",
    "StudyData",
    "load_study_data",
    "parse_devices",
    "run_compare",
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


def parse_devices(text: str | int, accelerator: str = "auto") -> tuple[str, Any, str]:
    """Resolve ``--accelerator``/``--devices`` to (accelerator, Lightning ``devices``, measurement device).

    Each model trains on one device: ``auto`` or ``1`` (the first), ``N,`` or ``[N]`` or ``cuda:N`` (GPU N).
    """
    spec = str(text).strip().lower()
    acc = accelerator.lower()
    if acc not in ("auto", "cpu", "cuda", "gpu"):
        raise ValueError(f"--accelerator {accelerator!r}: expected auto, cpu, cuda or gpu")
    cuda = wants_cuda(acc)
    if cuda and not cuda_available():
        raise ValueError(f"--accelerator {accelerator!r}: CUDA is not available on this machine")
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
    dev = resolve_device(f"cuda:{index}", what="--devices")
    return "cuda", [index], str(dev)


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
    from seglstm.config import compose_config

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


def _synthetic_note(root: Path) -> str | None:
    meta = root / "meta.json"
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if info.get("generator") == "seglstm.data.synthetic":
        return f"synthetic LoveDA-like scenes (`seglstm synth`, seed {info.get('seed')}, {info.get('size')} px)"
    return None


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


def _fingerprint(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


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



@dataclass(frozen=True)
class _Setup:
    """What every model of one study shares: the arguments, the data and recipe, the device, the output folder."""

    cfg: CompareConfig
    study: StudyData
    classes: list[str]
    accelerator: str
    devices: Any
    device: str
    precision: str
    crop: int
    batch: int
    out: Path

    def fingerprint(self, name: str, overrides: Mapping[str, Any], ckpt: Path | None) -> str:
        """What a model's result depends on: ``--reuse`` keeps a result only when this is unchanged."""
        cfg = self.cfg
        return _fingerprint({"name": name, "overrides": overrides, "ckpt": str(ckpt), "data": self.study.data,
                             "recipe": self.study.recipe, "budget": str(cfg.budget), "seed": cfg.seed,
                             "sizes": cfg.sizes, "flops": cfg.flops_size, "repeats": cfg.repeats,
                             "device": self.device, "precision": self.precision})  # fmt: skip

    def job_kwargs(self, name: str, model_dir: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The arguments that :func:`~seglstm.study.jobs.train_job` and ``evaluate_job`` share."""
        return dict(name=name, out_dir=str(model_dir), data=self.study.data, recipe=self.study.recipe,
                    overrides=overrides, seed=self.cfg.seed, accelerator=self.accelerator, devices=self.devices,
                    precision=self.precision)  # fmt: skip


def _prepare(cfg: CompareConfig) -> tuple[_Setup, dict[str, int]]:
    """Check the models and the data before anything runs; returns the setup and the split sizes."""
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
    split_sizes = {split: len(dm.build_split(split, train=train)) for split, train in (("train", True), (dm.test_split, False))}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = _Setup(cfg, study, list(dm.classes), accelerator, devices, device, precision, int(dm.crop_size[0]),
                   dm.batch_size, out)  # fmt: skip
    return setup, split_sizes


def _new_payload(setup: _Setup, split_sizes: Mapping[str, int]) -> dict[str, Any]:
    """The JSON payload before any model ran: settings, classes, columns and units."""
    cfg, study = setup.cfg, setup.study
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
        "plot_size": cfg.flops_size if cfg.flops_size in cfg.sizes else cfg.sizes[0],
        "repeats": cfg.repeats,
        "device": setup.device,
        "precision": setup.precision,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
    }
    return {"settings": settings, "classes": setup.classes, "columns": table_columns(setup.classes, cfg.sizes, cfg.flops_size), "units": {
        "IoU.*": "%", "mIoU": "%", "mF1": "%", "OA": "%", "train_min": "minutes", "params_M": "millions",
        "GFLOPs_*": "1e9 FLOPs (2 x MACs)", "*_img_s*": "images per second", "*_MiB*": "MiB (2**20 bytes)",
    }}  # fmt: skip


def _publish(setup: _Setup, payload: dict[str, Any], results: Mapping[str, Any]) -> dict[str, Path]:
    """Rewrite every output from the results so far (run after every model, so a crash loses nothing)."""
    cfg = setup.cfg
    payload["rows"] = [build_row(m, results[m], setup.classes, cfg.sizes, cfg.flops_size) for m in cfg.models]
    payload["models"] = dict(results)
    return write_outputs(setup.out, payload)


def _train_or_evaluate(setup: _Setup, name: str, overrides: Mapping[str, Any], ckpt: Path | None,
                       model_dir: Path, result: dict[str, Any]) -> None:
    """Train under the budget, or score the given checkpoint, in a child process; adds ``run`` to ``result``."""
    cfg, study = setup.cfg, setup.study
    common = setup.job_kwargs(name, model_dir, overrides)
    if ckpt is None:
        tqdm.write(f"compare: {name}: training for {cfg.budget}")
        timeout = None if cfg.budget.minutes is None else 60 * (3 * cfg.budget.minutes + 30)
        run = run_isolated(train_job, timeout=timeout, steps=cfg.budget.steps, minutes=cfg.budget.minutes,
                           warmup_fraction=study.warmup_fraction, device=setup.device,
                           gradient_clip_val=study.gradient_clip_val, **common)  # fmt: skip
        stage = "train"
    else:
        tqdm.write(f"compare: {name}: evaluating {ckpt}")
        run = run_isolated(evaluate_job, ckpt=str(ckpt), **common)
        stage = "evaluate"
    if "error" in run:
        _record_error(model_dir, result["errors"], stage, run)
        return
    result["run"] = run
    if run.get("train"):
        train = run["train"]
        result["train_speed"] = {"images_per_s": train["images_per_s"], "peak_mib": train["peak_mib"],
                                 "source": "training run"}  # fmt: skip


def _measure_speeds(setup: _Setup, name: str, overrides: Mapping[str, Any], model_dir: Path,
                    result: dict[str, Any]) -> None:
    """Training speed from timed steps (when no training run measured it) and inference speed per size."""
    cfg, errors = setup.cfg, result["errors"]
    common = dict(name=name, num_classes=len(setup.classes), overrides=overrides, device=setup.device,
                  repeats=cfg.repeats, precision=setup.precision, seed=cfg.seed)  # fmt: skip
    if "train_speed" not in result:
        speed = run_isolated(training_speed, size=setup.crop, batch=setup.batch,
                             recipe={**setup.study.recipe, "warmup_iters": 0}, **common)  # fmt: skip
        if "error" in speed:
            _record_error(model_dir, errors, "train_speed", speed)
        else:
            result["train_speed"] = {**speed, "source": "timed steps on random data"}
    result["inference"] = {}
    for size in cfg.sizes:
        res = run_isolated(inference_speed, size=size, **common)
        if "error" in res:
            _record_error(model_dir, errors, f"inference_{size}", res)
        else:
            result["inference"][str(size)] = res


def _reusable(path: Path, key: str) -> dict[str, Any] | None:
    """A previous successful result with the same fingerprint, or None."""
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    return old if old.get("fingerprint") == key and not old.get("errors") else None


def _run_model(setup: _Setup, name: str) -> dict[str, Any]:
    """One model's row: cost, training or evaluation, speeds; writes ``<out>/<model>/result.json``."""
    cfg = setup.cfg
    model_dir = setup.out / model_dir_name(name)
    overrides = dict(cfg.overrides.get(name) or {})
    ckpt = cfg.ckpts.get(name)
    key = setup.fingerprint(name, overrides, ckpt)
    path = model_dir / "result.json"
    old = _reusable(path, key) if cfg.reuse else None
    if old is not None:
        tqdm.write(f"compare: {name}: reusing {path}")
        return old
    result: dict[str, Any] = {"fingerprint": key, "overrides": overrides, "errors": {},
                              "load_average_1m": {"start": _load()}}  # fmt: skip
    errors = result["errors"]
    try:
        result["complexity"] = complexity(name, len(setup.classes), overrides, cfg.flops_size)
    except Exception as err:  # a model that cannot be built is a row with its error
        stage = "flops" if _builds(name, len(setup.classes), overrides) else "build"
        _record_error(model_dir, errors, stage, {"error": f"{type(err).__name__}: {err}",
                                                  "traceback": traceback.format_exc()})  # fmt: skip
    if "build" in errors:
        atomic_write_text(path, json.dumps(result, indent=2, default=str) + "\n")
        tqdm.write(f"compare: {name}: cannot be built: {errors['build']}")
        return result
    _train_or_evaluate(setup, name, overrides, ckpt, model_dir, result)
    _measure_speeds(setup, name, overrides, model_dir, result)
    result["load_average_1m"]["end"] = _load()
    atomic_write_text(path, json.dumps(result, indent=2, default=str) + "\n")
    tqdm.write(f"compare: {name}: {'ok' if not errors else '; '.join(errors)}")
    return result


def run_compare(cfg: CompareConfig, progress: bool = True) -> dict[str, Any]:
    """Run the study; returns the JSON payload written to ``<out>/compare.json`` (plus ``paths``)."""
    setup, split_sizes = _prepare(cfg)
    payload = _new_payload(setup, split_sizes)
    results: dict[str, dict[str, Any]] = {m: {"pending": True} for m in cfg.models}
    _publish(setup, payload, results)
    bar = tqdm(cfg.models, desc="compare", unit="model", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        results[name] = _run_model(setup, name)
        _publish(setup, payload, results)
    bar.close()
    payload["settings"]["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    paths = _publish(setup, payload, results)
    payload["paths"] = {k: str(v) for k, v in paths.items()}
    return payload
