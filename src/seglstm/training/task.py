"""``SegmentationTask``: the seed's training recipe as a LightningModule (torchgeo-style task).

One task trains every segmentor the registry builds: it calls ``model.loss(image, mask)`` for training,
``model.inference(image, **test_cfg)`` for validation, test and predict, and accumulates mmseg-compatible
metrics over whole splits. The optimiser and schedule are the seed's (AdamW with name-based no-decay groups,
linear warm-up then poly, stepped every iteration; see :mod:`seglstm.training.optim`).
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info

from seglstm.config import META_KEY
from seglstm.metrics import MEAN_KEYS, SegmentationMetrics
from seglstm.models.registry import create_model, list_models
from seglstm.training.optim import NO_DECAY_KEYS, build_adamw, build_warmup_poly, check_schedule
from seglstm.training.reports import format_metrics_table

RNG_KEY = "seglstm_rng"


def rng_state() -> dict[str, Any]:
    """Global RNG states (torch, CUDA, numpy, Python) as tensors and plain types (``weights_only``-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, inner, gauss_py = state["python"]
    random.setstate((version, tuple(inner), gauss_py))


def item_shapes(ori_shape: Any, batch_size: int) -> list[tuple[int, int]]:
    """Per-image (H, W) from whatever the default collate made of ``ori_shape``."""
    if isinstance(ori_shape, torch.Tensor):
        rows = ori_shape.reshape(batch_size, -1)[:, :2].tolist()
    elif (
        isinstance(ori_shape, (list, tuple))
        and len(ori_shape) == 2
        and isinstance(ori_shape[0], torch.Tensor)
    ):
        rows = torch.stack([torch.as_tensor(v) for v in ori_shape], dim=1).reshape(batch_size, 2).tolist()
    elif isinstance(ori_shape, (list, tuple)) and len(ori_shape) == batch_size:
        rows = [list(s)[:2] for s in ori_shape]
    else:
        raise ValueError(f"cannot read per-image ori_shape for a batch of {batch_size} from {ori_shape!r}")
    return [(int(h), int(w)) for h, w in rows]


def _metric_name(name: str) -> str:
    return name.strip().replace(" ", "_")


def _check_optimizer_values(
    lr: float, betas: tuple[float, float], weight_decay: float, warmup_ratio: float, power: float
) -> None:
    """AdamW and the schedule would refuse these only at the first step, with a traceback; name the key here."""
    if not lr > 0:
        raise ValueError(f"model.lr must be > 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"model.betas must be two numbers in [0, 1), got {list(betas)}")
    if not weight_decay >= 0:
        raise ValueError(f"model.weight_decay must be >= 0, got {weight_decay}")
    if not 0 < warmup_ratio <= 1:
        raise ValueError(f"model.warmup_ratio must be in (0, 1], got {warmup_ratio}")
    if not power > 0:
        raise ValueError(f"model.power must be > 0, got {power}")


class SegmentationTask(LightningModule):
    """Train, validate, test and predict with a registered segmentor and the seed's recipe.

    Logged metrics (CSV, TensorBoard, ``ModelCheckpoint(monitor=...)``, ``trainer.callback_metrics``) are
    fractions in [0, 1]: ``val/mIoU``, ``val/mAcc``, ``val/aAcc``, ``val/mFscore``, ``val/mDice``,
    ``val/IoU.<class>`` and the same under ``test/``; ``train/loss``, ``train/loss_*``, ``train/lr``,
    ``train/nonfinite_steps``. What is shown to people (the metric tables, the progress bar) is in percent
    with 2 decimals, as mmseg prints it.

    Args:
        model: registry preset name (``seglstm.list_models()``), e.g. ``seglstm_upernet_s``.
        num_classes: output classes; the CLI fills it from the data module and rejects a conflicting value.
        model_kwargs: preset overrides (``neck``, ``mlstm_backend``, ``img_size``, ``depths``, ``embed_dim``...).
        lr, betas, weight_decay: AdamW settings (seed: 6e-4, (0.9, 0.999), 0.01).
        no_decay_keys: parameter-name substrings trained without weight decay (seed: pos_embed, cls_token, norm).
        warmup_iters, warmup_ratio: linear warm-up length and start factor (seed: 1500, 1e-6).
        power, eta_min: poly decay exponent and final lr (seed: 1.0, 0.0).
        max_iters: schedule length; ``None`` takes ``trainer.max_steps`` (seed: 15000).
        test_cfg: keyword arguments for ``model.inference`` at val/test/predict time, mmseg's ``test_cfg``
            (``mode: whole|slide``, ``crop_size``, ``stride``, ``scales``, ``flip``).
        ignore_index: label value excluded from metrics (must match the data).
        compile: wrap the backbone and heads with ``torch.compile`` (parameter names are unchanged, so
            checkpoints stay portable).
    """

    def __init__(
        self,
        model: str = "seglstm_upernet_s",
        num_classes: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 6e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.01,
        no_decay_keys: Sequence[str] = NO_DECAY_KEYS,
        warmup_iters: int = 1500,
        warmup_ratio: float = 1e-6,
        power: float = 1.0,
        eta_min: float = 0.0,
        max_iters: int | None = None,
        test_cfg: dict[str, Any] | None = None,
        ignore_index: int = 255,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if num_classes is None:
            raise ValueError(
                "model.num_classes is not set: give it, or run through the CLI, which takes it from data"
            )
        _check_optimizer_values(lr, betas, weight_decay, warmup_ratio, power)
        try:
            self.model = create_model(model, num_classes=num_classes, **(model_kwargs or {}))
        except (TypeError, ValueError) as err:
            key = "model.model" if model not in list_models() else f"model.model_kwargs={model_kwargs!r}"
            raise ValueError(f"{key}: {err}") from err
        self.test_cfg = dict(test_cfg or {})
        accepted = set(inspect.signature(self.model.inference).parameters) - {"img"}
        unknown = sorted(set(self.test_cfg) - accepted)
        if unknown:
            raise ValueError(f"model.test_cfg has unknown keys {unknown}; {model} accepts {sorted(accepted)}")
        if compile:
            for name in ("backbone", "neck", "decode_head", "auxiliary_head"):
                part = getattr(self.model, name, None)
                if isinstance(part, torch.nn.Module):
                    part.compile()
        self.val_metrics = SegmentationMetrics(num_classes, ignore_index)
        self.test_metrics = SegmentationMetrics(num_classes, ignore_index)
        self.class_names = [f"class_{i}" for i in range(num_classes)]
        self.meta: dict[str, Any] = {}
        self.test_results: dict[str, Any] | None = None
        # The training RNG stream (dropout, drop path) is pinned to the training steps: the state left by
        # one step is handed to the next, so validation or a new epoch's DataLoader drawing from the global
        # RNG in between changes nothing, and a resumed run continues from the checkpoint's state exactly.
        self._rng_after_step: dict[str, Any] | None = None
        self._rng_resume: dict[str, Any] | None = None

    # -- wiring to the data -------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Take class names, palette and normalisation from the data module, and refuse a mismatch."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        n = getattr(dm, "num_classes", None)
        if n is not None and n != self.hparams.num_classes:
            raise ValueError(
                f"model.num_classes={self.hparams.num_classes} conflicts with the data ({n} classes in "
                f"data.dataset={getattr(dm, 'hparams', {}).get('dataset', '?')!r})"
            )
        ignore = getattr(dm, "ignore_index", None)
        if ignore is not None and ignore != self.hparams.ignore_index:
            raise ValueError(
                f"model.ignore_index={self.hparams.ignore_index} differs from the data's {ignore}"
            )
        classes = getattr(dm, "classes", None)
        if classes is not None:
            self.class_names = [str(c) for c in classes]
        self.meta = self._meta_from_datamodule(dm)

    def _meta_from_datamodule(self, dm: Any) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "classes": list(self.class_names),
            "num_classes": int(self.hparams.num_classes),
        }
        palette = getattr(dm, "palette", None)
        if palette is not None:
            meta["palette"] = [[int(v) for v in color] for color in palette]
        for key in ("mean", "std"):
            value = getattr(dm, key, None)
            if value is not None:
                meta[key] = [float(v) for v in value]
        return meta

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain types only: load_segmentor reads checkpoints with weights_only=True. The RNG states make a
        # resumed run draw the same dropout masks as an uninterrupted one (Lightning does not save them).
        checkpoint[RNG_KEY] = self._rng_after_step if self._rng_after_step is not None else rng_state()
        checkpoint[META_KEY] = {
            **self.meta,
            "classes": list(self.class_names),
            "num_classes": int(self.hparams.num_classes),
            "model": self.hparams.model,
            "model_kwargs": dict(self.hparams.model_kwargs or {}),
            "test_cfg": dict(self.test_cfg),
            "ignore_index": int(self.hparams.ignore_index),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if RNG_KEY in checkpoint and self._trainer is not None and self.trainer.state.fn == "fit":
            self._rng_resume = checkpoint[RNG_KEY]
        meta = checkpoint.get(META_KEY)
        if meta:
            self.class_names = list(meta.get("classes", self.class_names))
            self.meta = {
                k: v for k, v in meta.items() if k in ("classes", "num_classes", "palette", "mean", "std")
            }

    # -- optimisation --------------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        max_iters = hp.max_iters if hp.max_iters is not None else self.trainer.max_steps
        check_schedule(max_iters, hp.warmup_iters, "trainer.max_steps (or model.max_iters)", "model.warmup_iters")
        optimizer = build_adamw(self.model, hp.lr, tuple(hp.betas), hp.weight_decay, tuple(hp.no_decay_keys))
        scheduler = build_warmup_poly(
            optimizer, max_iters, hp.warmup_iters, hp.warmup_ratio, hp.power, hp.eta_min
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    # -- steps ---------------------------------------------------------------------------------------------

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        state = self._rng_resume if self._rng_resume is not None else self._rng_after_step
        if state is not None:
            set_rng_state(state)
        self._rng_resume = None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        image, mask = batch["image"], batch["mask"]
        losses = self.model.loss(image, mask)
        self._rng_after_step = rng_state()
        bs = image.shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=bs)
        for key, value in losses.items():
            if key != "loss":
                self.log(f"train/{key}", value, batch_size=bs)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=True, batch_size=bs)
        return losses["loss"]

    def predict_logits(self, image: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits by ``model.inference`` with the task's ``test_cfg``, resized bilinearly to ``size``."""
        logits = self.model.inference(image, **self.test_cfg)
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
        return logits

    def _item_predictions(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Per-image class maps at the original file size.

        Batches of differently sized images are padded bottom/right: each image's logits are first cropped
        to its own ``img_shape``, then resized to its ``ori_shape`` (mmseg scores at the label's size).
        """
        image = batch["image"]
        b = image.shape[0]
        logits = self.predict_logits(image)
        crops = item_shapes(batch["img_shape"], b) if "img_shape" in batch else [tuple(logits.shape[-2:])] * b
        if "ori_shape" in batch:
            sizes = item_shapes(batch["ori_shape"], b)
        elif "mask" in batch:
            sizes = [tuple(batch["mask"].shape[-2:])] * b
        else:
            sizes = crops
        return [
            self._resize_one(logits[i, :, : crops[i][0], : crops[i][1]], sizes[i]).argmax(dim=0)
            for i in range(b)
        ]

    def _evaluate(self, batch: dict[str, Any], metrics: SegmentationMetrics) -> list[torch.Tensor]:
        preds = self._item_predictions(batch)
        mask = batch["mask"]
        for i, pred in enumerate(preds):
            h, w = pred.shape
            if h > mask.shape[-2] or w > mask.shape[-1]:
                raise ValueError(
                    f"{batch.get('path', ['?'] * len(preds))[i]}: ori_shape {(h, w)} exceeds the mask's "
                    f"{tuple(mask.shape[-2:])}"
                )
            metrics.update(pred, mask[i, :h, :w])
        return preds

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return {"pred": self._evaluate(batch, self.test_metrics)}

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        preds = self._item_predictions(batch)
        return {"pred": preds, "path": list(batch.get("path", [str(batch_idx)] * len(preds)))}

    @staticmethod
    def _resize_one(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(logits.shape[-2:]) == tuple(size):
            return logits
        return F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)[0]

    # -- epoch ends ----------------------------------------------------------------------------------------

    def _log_results(self, prefix: str, results: dict[str, Any]) -> None:
        # torchmetrics already summed the states over ranks, so every rank holds the same numbers; sync_dist
        # averages equal values (a no-op) and tells Lightning they are global, which it otherwise warns about.
        self.log(f"{prefix}/mIoU", float(results["mIoU"]), prog_bar=True, sync_dist=True)
        scalars = {f"{prefix}/{k}": float(results[k]) for k in MEAN_KEYS if k != "mIoU"}
        for name, iou in zip(self.class_names, results["IoU"].tolist()):
            scalars[f"{prefix}/IoU.{_metric_name(name)}"] = float(iou)
        self.log_dict(scalars, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        results = self.val_metrics.compute()
        self.val_metrics.reset()
        if self.trainer.sanity_checking:
            return
        self._log_results("val", results)
        if not math.isnan(results["mIoU"]):
            rank_zero_info(
                f"\nval at iter {self.global_step}:\n{format_metrics_table(results, self.class_names)}"
            )

    def on_test_epoch_end(self) -> None:
        results = self.test_metrics.compute()
        self.test_metrics.reset()
        self._log_results("test", results)
        self.test_results = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in results.items()}
        rank_zero_info(f"\ntest:\n{format_metrics_table(results, self.class_names)}")
