"""Callbacks and plugins that give Lightning the seed's run shape.

- :class:`AtomicCheckpointIO`: every checkpoint is written to a temporary file and renamed, so a kill never
  leaves a truncated ``last.ckpt``.
- :class:`RunCheckpoint`: ``ModelCheckpoint`` whose files live in ``<default_root_dir>/checkpoints`` (one
  folder per run, like mmseg's ``work_dir``, so ``--ckpt_path last`` finds the previous run's file), named
  ``iter_{step}`` / ``best_mIoU_iter_{step}`` as mmseg names them, optionally saving once more at the end.
- :class:`StepProgressBar`: one bar over all iterations with an ETA (iteration-based training has no
  meaningful epochs).
- :class:`TestReportWriter` / :class:`SegPredictionWriter`: the files ``seglstm test`` and
  ``seglstm predict`` leave behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

from seglstm.data.folder import default_palette
from seglstm.training.reports import (
    colorize,
    overlay,
    resize_rgb,
    save_png,
    to_display_rgb,
    write_metrics_report,
)
from seglstm.training.task import item_shapes
from seglstm.utils.io import atomic_path, torch_load


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
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` rooted at ``<trainer.default_root_dir>/checkpoints`` when ``dirpath`` is not given.

    Lightning's default puts checkpoints under the logger's ``version_N`` folder, a new one per run, so a
    restarted job could never find its ``last.ckpt``. Args are ``ModelCheckpoint``'s plus:

    Args:
        save_on_train_end: also save when training stops at a step that was not yet saved (the seed saves
            at iteration 15000 whatever the interval).
        auto_insert_metric_name: Lightning's option, off by default so ``iter_{step}`` gives ``iter_1000``.
    """

    def __init__(
        self, *args: Any, save_on_train_end: bool = False, auto_insert_metric_name: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, auto_insert_metric_name=auto_insert_metric_name, **kwargs)
        self.save_on_train_end = save_on_train_end

    def _root_dirpath(self, trainer: pl.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._root_dirpath(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        self._root_dirpath(trainer)
        return super()._find_last_checkpoints(trainer)

    def _save_now(self, trainer: pl.Trainer) -> None:
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # The final step is saved here, with the loop state of any periodic save, rather than in
        # on_train_end, where Lightning already counts a part-done epoch as finished (a resume from there
        # would start the next epoch's data order).
        last_step = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        if self.save_on_train_end and last_step and self._last_global_step_saved != trainer.global_step:
            self._save_now(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Training stopped for another reason (max_epochs, max_time, early stopping): save what there is.
        if self.save_on_train_end and self._last_global_step_saved != trainer.global_step:
            self._save_now(trainer)
        super().on_train_end(trainer, pl_module)


class StepProgressBar(TQDMProgressBar):
    """A single training bar over ``trainer.max_steps`` iterations: position, rate and ETA to the end."""

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
