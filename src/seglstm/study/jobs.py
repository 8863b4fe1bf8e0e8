"""The work ``seglstm compare`` runs in child processes: training one model under the budget, or scoring a
given checkpoint, each followed by a test-split evaluation.

Each job is a module-level function taking plain values, so :func:`seglstm.study.measure.run_isolated` can
send it to a fresh process; a crash there becomes an ``error`` entry instead of ending the study.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from seglstm.study.measure import memory_baseline, peak_memory_mib, resolve_device

__all__ = ["BudgetCallback", "evaluate_job", "train_job", "warmup_for"]


def warmup_for(steps: int, fraction: float) -> int:
    """Warm-up length for a ``steps``-long schedule: 0, or 2..steps-2 (WarmupPoly's valid range)."""
    warm = round(steps * fraction)
    return warm if 2 <= warm <= steps - 2 else 0


class BudgetCallback(Callback):
    """Stops training at the budget, lays the schedule over a time budget, and measures training speed.

    With a time budget, the step time between the end of step ``skip`` and the end of step ``probe_steps``
    decides how many steps fit in the rest of the time; the warm-up/poly schedule is then stretched over
    exactly that many steps (until then it runs the warm-up's first, near-zero rates). Training throughput
    counts images from the end of step ``skip`` to the end of the last step (the first steps pay one-off
    costs); peak memory covers the whole ``fit``. ``clock`` is the time source (tests pass a fake one).
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
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        super().__init__()
        self.clock = clock
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
        self.t0 = self.t_mark = self.t_last = self.clock()

    def _reschedule(self, trainer: Any, total: int) -> None:
        from seglstm.training.optim import WarmupPoly

        schedules = [
            fn for cfg in trainer.lr_scheduler_configs for fn in getattr(cfg.scheduler, "lr_lambdas", [])
            if isinstance(fn, WarmupPoly)
        ]  # fmt: skip
        if len(schedules) != 1:
            raise RuntimeError(f"a time budget needs exactly one WarmupPoly schedule, found {len(schedules)}")
        schedules[0].reschedule(total, warmup_for(total, self.warmup_fraction))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = self.clock()
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
