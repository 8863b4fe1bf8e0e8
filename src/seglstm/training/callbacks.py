"""Callbacks and plugins that give Lightning the seed's run shape.

- :class:`AtomicCheckpointIO`: every checkpoint is written to a temporary file and renamed, so a kill never
  leaves a truncated ``last.ckpt``; each save and removal is recorded in the folder's ``index.json``
  (global step and top-k score per file, best file per monitored metric), which ``--auto-resume`` and
  ``--ckpt_path best`` read.
- :class:`RunCheckpoint`: ``ModelCheckpoint`` whose files live in ``<default_root_dir>/checkpoints`` (one
  folder per run, like mmseg's ``work_dir``, so ``--ckpt_path last`` finds the previous run's file), named
  ``iter_{step}`` / ``best_mIoU_iter_{step}`` as mmseg names them, optionally saving once more at the end;
  with ``save_last`` it also refreshes ``last.ckpt`` every ``last_every_minutes`` and on SIGINT/SIGTERM; a
  monitoring one restores its top-k files from ``index.json`` on resume.
- :class:`InterruptGuard`: SIGINT/SIGTERM anywhere in ``fit`` end it with ``last.ckpt`` at the point reached
  and :class:`TrainingInterrupted` (never Lightning's silent exit 0); a checkpoint taken before or during a
  due validation resumes into that validation.
- :class:`StepProgressBar`: one bar over all iterations with an ETA (iteration-based training has no
  meaningful epochs).
- :class:`TestReportWriter` / :class:`SegPredictionWriter`: the files ``seglstm test`` and
  ``seglstm predict`` leave behind.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

from seglstm.data.folder import default_palette
from seglstm.errors import SeglstmError
from seglstm.training._lightning_compat import (
    last_saved_step,
    mark_validation_pending,
    save_topk_and_last,
    val_batches_done,
    validation_due,
)
from seglstm.training.reports import (
    colorize,
    overlay,
    resize_rgb,
    save_png,
    to_display_rgb,
    write_metrics_report,
)
from seglstm.training.task import item_shapes
from seglstm.utils.io import atomic_path, atomic_write_text, torch_load

INDEX_NAME = "index.json"
LAST_NAME = "last.ckpt"


def read_index(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``index.json`` of a checkpoint folder, or an empty index when there is none (or it is unreadable:
    the index is a convenience, the checkpoints themselves stay the truth)."""
    path = Path(folder) / INDEX_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"checkpoints": {}, "best": {}}
    if not isinstance(data, dict):
        return {"checkpoints": {}, "best": {}}
    data.setdefault("checkpoints", {})
    data.setdefault("best", {})
    return data


def _topk_records(name: str, checkpoint: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The top-k entries ``name`` holds in the checkpoint's monitoring callbacks: {state key: monitor, mode,
    score}. A top-k file is saved after its callback counted it, so its own state names it."""
    records: dict[str, dict[str, Any]] = {}
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if not isinstance(state, dict) or not state.get("monitor"):
            continue
        for file, score in (state.get("best_k_models") or {}).items():
            if Path(str(file)).name == name and score is not None:
                records[str(key)] = {"monitor": state["monitor"], "mode": state.get("mode", "min"), "score": float(score)}
    return records


def _best_from_records(folder: Path, index: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Best file per monitored metric among the files still on disk whose records carry a top-k score."""
    best: dict[str, dict[str, Any]] = {}
    for name, record in sorted(index["checkpoints"].items()):
        for entry in (record.get("topk") or {}).values():
            if not (folder / name).is_file():
                continue
            monitor, score, mode = entry["monitor"], float(entry["score"]), entry.get("mode", "min")
            held = best.get(monitor)
            if held is None or (score > held["score"] if mode == "max" else score < held["score"]):
                best[monitor] = {"file": name, "score": score}
    return best


def _update_index(path: Path, checkpoint: dict[str, Any] | None) -> None:
    """Record (or, with ``checkpoint=None``, forget) ``path`` in its folder's index, atomically.

    Each file's top-k score is kept with the file, and the best per metric is derived from those records,
    so a resumed run (whose restored callback state may predate a validation) never forgets a better file
    still on disk, and a removed file drops out of ``best``."""
    index = read_index(path.parent)
    if checkpoint is None:
        index["checkpoints"].pop(path.name, None)
    else:
        record: dict[str, Any] = {
            "global_step": int(checkpoint.get("global_step", 0)),
            "epoch": int(checkpoint.get("epoch", 0)),
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        topk = _topk_records(path.name, checkpoint)
        if topk:
            record["topk"] = topk
        index["checkpoints"][path.name] = record
    best = {m: e for m, e in index["best"].items() if isinstance(e, dict) and (path.parent / str(e.get("file"))).is_file()}
    for state in ((checkpoint or {}).get("callbacks") or {}).values():
        # callbacks that record no mode (a plain ModelCheckpoint): their own view of the best file
        monitor = state.get("monitor") if isinstance(state, dict) else None
        best_path, score = state.get("best_model_path") if monitor else None, state.get("best_model_score")
        if best_path and score is not None and "mode" not in state:
            best[monitor] = {"file": Path(best_path).name, "score": float(score)}
    best.update(_best_from_records(path.parent, index))
    index["best"] = best
    atomic_write_text(path.parent / INDEX_NAME, json.dumps(index, indent=1, sort_keys=True) + "\n")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, renamed over it only when complete; loads
    (``--ckpt_path``, resume) go through :func:`~seglstm.utils.io.torch_load`, ``weights_only=True``.

    Args:
        unsafe_load: allow full unpickling of trusted checkpoints (warns); Lightning's own ``weights_only``
            argument cannot turn the safe loading off.
    """

    def __init__(self, unsafe_load: bool = False) -> None:
        super().__init__()
        self.unsafe_load = unsafe_load

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return torch_load(path, unsafe=self.unsafe_load, map_location=map_location)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} does not support storage_options, got {storage_options!r}"
            )
        # Saved through a file object, so the archive's root folder is torch's fixed "archive" rather than
        # the random temporary name (the same state gives the same bytes).
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            torch.save(checkpoint, fh)
        _update_index(Path(path), checkpoint)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        super().remove_checkpoint(path)
        _update_index(Path(path), None)


class TrainingInterrupted(SeglstmError):
    """Training stopped on SIGINT/SIGTERM after writing ``last.ckpt`` (the CLI exits 128 + signal number)."""

    def __init__(self, signal_name: str, step: int, path: str | None) -> None:
        wrote = (
            f"wrote {path}; continue with the same command and --auto-resume"
            if path
            else "no last.ckpt written (no checkpoint callback with save_last): this step's progress is lost"
        )
        super().__init__(f"interrupted by {signal_name} at iteration {step}: {wrote}")
        self.signal_name, self.step, self.path = signal_name, step, path

    @property
    def exit_code(self) -> int:
        number = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}.get(self.signal_name, signal.SIGTERM)
        return 128 + int(number)


def caught_signal(trainer: pl.Trainer) -> str | None:
    """The stop signal this process received during ``fit`` (``SegTrainer.stop_signal``, or Lightning's own
    SIGTERM flag for any Trainer), or None."""
    return getattr(trainer, "stop_signal", None) or ("SIGTERM" if trainer.received_sigterm else None)


def write_last(trainer: pl.Trainer) -> str | None:
    """Save ``last.ckpt`` now through the first checkpoint callback with ``save_last`` (collective under DDP).

    Returns:
        The path written, or None when no callback keeps a ``last.ckpt``.
    """
    keepers = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.save_last]
    keepers.sort(key=lambda cb: not isinstance(cb, RunCheckpoint))
    if not keepers or keepers[0].dirpath is None:
        return None
    keeper = keepers[0]
    path = os.path.join(keeper.dirpath, LAST_NAME)
    # Set first so the saved state names it too: Lightning's next save_last (in this run or a resumed one)
    # then rewrites this file instead of versioning a new last-v1.ckpt beside it.
    keeper.last_model_path = path
    trainer.save_checkpoint(path, weights_only=False)  # the full state, as Lightning's own saves
    if isinstance(keeper, RunCheckpoint):
        keeper.mark_saved()
    return path


def stop_if_signalled(trainer: pl.Trainer) -> None:
    """At a point where the state can be saved: after SIGINT/SIGTERM (on any rank) write ``last.ckpt`` and
    raise :class:`TrainingInterrupted`. Every rank takes the same decision, since saving is collective."""
    caught = caught_signal(trainer)
    if not trainer.strategy.reduce_boolean_decision(caught is not None, all=False):
        return
    path = write_last(trainer)
    raise TrainingInterrupted(caught or "a signal on another rank", trainer.global_step, path)


class InterruptGuard(Callback):
    """Stops ``fit`` after SIGINT/SIGTERM at the next point whose state can be saved, wherever the signal
    landed: before the first step (at the start of training), inside or between steps (at the end of the
    step; :class:`RunCheckpoint` with ``save_last`` does it there, after its own periodic save), in a
    validation (after the batch that runs) or in the sanity check, and during a checkpoint write (after it).

    A checkpoint written at step N before or during step N's validation is marked so that a resume runs that
    validation in full (Lightning would skip it), so the best score and top-k files of a resumed run match
    an uninterrupted one. :class:`~seglstm.training.trainer.SegTrainer` always adds this callback.
    """

    def __init__(self) -> None:
        super().__init__()
        self._val_running = False
        self._val_done_before = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stop_if_signalled(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not any(isinstance(cb, RunCheckpoint) and cb.guards_last for cb in trainer.checkpoint_callbacks):
            stop_if_signalled(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_running = True
            self._val_done_before = val_batches_done(trainer)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if trainer.state.fn == "fit":
            stop_if_signalled(trainer)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_running = False

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking or "loops" not in checkpoint:
            return
        if self._val_running:
            mark_validation_pending(checkpoint, self._val_done_before, mid_validation=True)
        elif trainer.training and trainer.global_step > 0 and validation_due(trainer):
            mark_validation_pending(checkpoint, val_batches_done(trainer), mid_validation=False)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` rooted at ``<trainer.default_root_dir>/checkpoints`` when ``dirpath`` is not given.

    Lightning's default puts checkpoints under the logger's ``version_N`` folder, a new one per run, so a
    restarted job could never find its ``last.ckpt``. Args are ``ModelCheckpoint``'s plus:

    Args:
        save_on_train_end: also save when training stops at a step that was not yet saved (the seed saves
            at iteration 15000 whatever the interval).
        auto_insert_metric_name: Lightning's option, off by default so ``iter_{step}`` gives ``iter_1000``.
        last_every_minutes: with ``save_last``, refresh ``last.ckpt`` at the end of the first step after this
            many minutes without a checkpoint (``None`` or 0: only at checkpoint events), so a crash or a
            kill loses at most that much work whatever ``every_n_train_steps`` is.
        clock: seconds, monotonic (tests pass a fake one); default ``time.monotonic``.

    With ``save_last``, SIGINT (Ctrl-C) or SIGTERM during a step also writes ``last.ckpt`` at its end (after
    a periodic save due there) and then stops with :class:`TrainingInterrupted` (see :class:`InterruptGuard`
    for the other moments). Monitoring callbacks restore their top-k files from ``index.json`` on resume.
    """

    def __init__(
        self,
        *args: Any,
        save_on_train_end: bool = False,
        auto_insert_metric_name: bool = False,
        last_every_minutes: float | None = 10.0,
        clock: Callable[[], float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, auto_insert_metric_name=auto_insert_metric_name, **kwargs)
        if last_every_minutes is not None and last_every_minutes < 0:
            raise ValueError(f"last_every_minutes must be >= 0 or None, got {last_every_minutes}")
        self.save_on_train_end = save_on_train_end
        self.last_every_minutes = last_every_minutes
        self.clock = clock or time.monotonic
        self._last_saved_at = self.clock()

    @property
    def guards_last(self) -> bool:
        """Whether this callback writes ``last.ckpt`` on a timer and on signals (it has ``save_last``)."""
        return bool(self.save_last)

    def _root_dirpath(self, trainer: pl.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._root_dirpath(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        self._root_dirpath(trainer)
        return super()._find_last_checkpoints(trainer)

    # -- best and top-k across resumes ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mode": self.mode}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning's restore, then the top-k files the folder's index records for this callback and still
        holds: the checkpoint resumed from may predate a validation whose better file is on disk."""
        super().load_state_dict(state_dict)
        if self.monitor is None or self.dirpath is None:
            return
        folder = Path(self.dirpath)
        known = {str(p): s for p, s in self.best_k_models.items() if Path(p).is_file()}
        for name, record in read_index(folder)["checkpoints"].items():
            entry = (record.get("topk") or {}).get(self.state_key)
            if entry is not None and (folder / name).is_file():
                known[str(folder / name)] = torch.tensor(float(entry["score"]))
        if not known:
            return
        self.best_k_models = known
        worst, best = (max, min) if self.mode == "min" else (min, max)
        self.kth_best_model_path = worst(known, key=lambda p: float(known[p]))
        self.kth_value = known[self.kth_best_model_path]
        self.best_model_path = best(known, key=lambda p: float(known[p]))
        self.best_model_score = known[self.best_model_path]

    # -- last.ckpt on a timer and on SIGINT / SIGTERM ------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_saved_at = self.clock()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.mark_saved()

    def mark_saved(self) -> None:
        """Restart the ``last_every_minutes`` timer (a checkpoint was just written)."""
        self._last_saved_at = self.clock()

    def _guard_last(self, trainer: pl.Trainer) -> None:
        """Write ``last.ckpt`` when the timer is due; after a signal write it and stop. Every rank takes the
        same decision, since saving is collective under DDP."""
        if not self.guards_last or self.dirpath is None:
            return
        stop_if_signalled(trainer)
        minutes = self.last_every_minutes
        due = bool(minutes) and self.clock() - self._last_saved_at >= 60.0 * float(minutes)
        if trainer.strategy.reduce_boolean_decision(due, all=False):
            write_last(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._final_step_save(trainer)
        self._guard_last(trainer)

    def _final_step_save(self, trainer: pl.Trainer) -> None:
        # The final step is saved here, with the loop state of any periodic save, rather than in
        # on_train_end, where Lightning already counts a part-done epoch as finished (a resume from there
        # would start the next epoch's data order).
        last_step = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        if self.save_on_train_end and last_step and last_saved_step(self) != trainer.global_step:
            save_topk_and_last(self, trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Training stopped for another reason (max_epochs, max_time, early stopping): save what there is.
        if self.save_on_train_end and last_saved_step(self) != trainer.global_step:
            save_topk_and_last(self, trainer)
        super().on_train_end(trainer, pl_module)


class StepProgressBar(TQDMProgressBar):
    """A single training bar over ``trainer.max_steps`` iterations: position, rate and ETA to the end.

    mIoU is shown as a percentage with 2 decimals (``val/mIoU%=68.30``), as mmseg and the metric tables
    print it; the logged metric ``val/mIoU`` (CSV, TensorBoard, checkpoint monitor) stays a fraction.
    """

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        shown: dict[str, Any] = {}
        for key, value in super().get_metrics(trainer, pl_module).items():
            if key.endswith("/mIoU") and isinstance(value, (int, float)):
                shown[f"{key}%"] = f"{100.0 * float(value):.2f}"
            else:
                shown[key] = value
        return shown

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        bar = self.init_train_tqdm()
        bar.reset(total=trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None)
        # A resumed run starts part-way: count from there so the rate (and the ETA) cover this run only.
        bar.n = bar.initial = trainer.global_step
        bar.set_description("iter")
        self.train_progress_bar = bar

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        self.train_progress_bar.set_description(f"iter (epoch {trainer.current_epoch})")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if not bar.disable and (step % self.refresh_rate == 0 or step == bar.total):
            bar.update(step - bar.n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


def _stem(path: str) -> str:
    return Path(str(path)).stem


def _palette(pl_module: pl.LightningModule) -> list[tuple[int, int, int]]:
    palette = getattr(pl_module, "meta", {}).get("palette")
    return [tuple(c) for c in palette] if palette else default_palette(int(pl_module.hparams.num_classes))


class TestReportWriter(Callback):
    """Writes ``metrics.json``, ``metrics.md`` and ``confusion_matrix.png`` after ``test``.

    With ``save_images`` it also writes, per test image, ``color/<name>.png`` (the prediction in the
    dataset's palette) and ``overlay/<name>.png`` (ground truth and prediction blended over the image, side
    by side, like mmseg's ``--show-dir``).

    Args:
        out_dir: where to write; ``None`` means the run's log folder (``trainer.log_dir``).
        save_images: write the per-image files too (``seglstm test --out DIR``).
        alpha: opacity of the masks in the overlays.
    """

    def __init__(self, out_dir: str | None = None, save_images: bool = False, alpha: float = 0.5) -> None:
        super().__init__()
        if save_images and out_dir is None:
            raise ValueError("TestReportWriter: save_images needs an out_dir")
        self.out_dir = out_dir
        self.save_images = save_images
        self.alpha = alpha

    def _dir(self, trainer: pl.Trainer) -> Path:
        return Path(
            self.out_dir if self.out_dir is not None else (trainer.log_dir or trainer.default_root_dir)
        )

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self.save_images:
            return
        out = self._dir(trainer)
        palette = _palette(pl_module)
        meta = getattr(pl_module, "meta", {})
        preds = [p.cpu().numpy() for p in outputs["pred"]]
        paths = batch.get("path") or [f"{batch_idx}_{i}" for i in range(len(preds))]
        crops = (
            item_shapes(batch["img_shape"], len(preds))
            if "img_shape" in batch
            else [tuple(batch["image"].shape[-2:])] * len(preds)
        )
        for i, (pred, path) in enumerate(zip(preds, paths)):
            h, w = pred.shape
            mask = batch["mask"][i, :h, :w].cpu().numpy()
            color_pred = colorize(pred, palette)
            shown = batch["image"][i, :, : crops[i][0], : crops[i][1]]
            image = resize_rgb(to_display_rgb(shown, meta.get("mean"), meta.get("std")), (h, w))
            gt_view = overlay(image, colorize(mask, palette), self.alpha)
            pred_view = overlay(image, color_pred, self.alpha)
            gap = np.full((pred.shape[0], 8, 3), 255, np.uint8)
            save_png(out / "color" / f"{_stem(path)}.png", color_pred)
            save_png(
                out / "overlay" / f"{_stem(path)}.png", np.concatenate([gt_view, gap, pred_view], axis=1)
            )

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = getattr(pl_module, "test_results", None)
        if results is None:
            raise RuntimeError("TestReportWriter needs a SegmentationTask (its test_results were not set)")
        if not trainer.is_global_zero:
            return
        out = self._dir(trainer)
        paths = write_metrics_report(out, results, pl_module.class_names, title="test")
        lines = [f"  {kind}: {path}" for kind, path in paths.items()]
        if self.save_images:
            lines += [f"  colour masks: {out / 'color'}", f"  overlays: {out / 'overlay'}"]
        rank_zero_info("test report written:\n" + "\n".join(lines))


class SegPredictionWriter(BasePredictionWriter):
    """Writes each predicted mask as it comes (no predictions kept in memory).

    Formats:
        ``png``: ``masks/<name>.png`` (class indices, uint8) and ``color/<name>.png`` (palette colours).
        ``loveda``: the LoveDA benchmark submission, ``<name>.png`` with class values 0-6 and the original
        file names, nothing else in the folder.
    """

    def __init__(self, out_dir: str, fmt: Literal["png", "loveda"] = "png") -> None:
        super().__init__(write_interval="batch")
        if fmt not in ("png", "loveda"):
            raise ValueError(f"--format must be 'png' or 'loveda', got {fmt!r}")
        self.out_dir = Path(out_dir)
        self.fmt = fmt
        self._written: dict[str, str] = {}
        self.count = 0

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = int(pl_module.hparams.num_classes)
        if self.fmt == "loveda" and n != 7:
            raise ValueError(f"--format loveda needs a 7-class LoveDA model, this one predicts {n} classes")
        if n > 256:
            raise ValueError(f"cannot store {n} classes in 8-bit PNG masks")
        self._written.clear()
        self.count = 0

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        palette = _palette(pl_module)
        for pred, path in zip(prediction["pred"], prediction["path"]):
            name = _stem(path)
            if name in self._written:
                raise ValueError(
                    f"two inputs map to the same output name {name}.png: {self._written[name]} and {path}"
                )
            self._written[name] = str(path)
            mask = pred.cpu().numpy().astype(np.uint8)
            if self.fmt == "loveda":
                save_png(self.out_dir / f"{name}.png", mask)
            else:
                save_png(self.out_dir / "masks" / f"{name}.png", mask)
                save_png(self.out_dir / "color" / f"{name}.png", colorize(mask, palette))
            self.count += 1

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank_zero_info(f"wrote {self.count} predictions ({self.fmt}) to {self.out_dir}")
