"""Segmentation metrics with mmsegmentation's IoUMetric semantics, as a torchmetrics ``Metric``.

The only state is a KxK int64 confusion matrix (rows = label, columns = prediction) summed over the whole
split, so DDP ranks add their counts and every metric is computed once from the totals, as mmseg does (not
a mean of per-image scores). Pixels whose label is ``ignore_index`` count nowhere. A 0/0 gives NaN for that
metric alone and the class means skip NaNs, which is what mmseg reports for classes absent from a split.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

PER_CLASS_KEYS = ("IoU", "Acc", "Fscore", "Precision", "Recall", "Dice")
MEAN_KEYS = ("aAcc", "mIoU", "mAcc", "mFscore", "mDice")


def _div(num: Tensor, den: Tensor) -> Tensor:
    # Plain float64 division: x/0 -> inf never happens here because num <= den, and 0/0 -> NaN on purpose.
    return num.double() / den.double()


def metrics_from_confusion_matrix(confmat: Tensor) -> dict[str, Tensor | float]:
    """Turn a (K, K) label-by-prediction count matrix into mmseg's per-class metrics and their means.

    Returns per-class float64 tensors ``IoU``, ``Acc``, ``Fscore``, ``Precision``, ``Recall``, ``Dice``, the
    floats ``aAcc``, ``mIoU``, ``mAcc``, ``mFscore``, ``mDice`` (fractions, NaN-skipping means), and the
    matrix itself (``confusion_matrix``) with a row-normalised copy (``confusion_matrix_normalized``: each
    row sums to 1, rows of classes absent from the labels are NaN).
    """
    if confmat.ndim != 2 or confmat.shape[0] != confmat.shape[1]:
        raise ValueError(f"confusion matrix must be square (K, K), got shape {tuple(confmat.shape)}")
    confmat = confmat.to(torch.int64)
    intersect = confmat.diagonal()
    area_label = confmat.sum(dim=1)
    area_pred = confmat.sum(dim=0)
    union = area_label + area_pred - intersect

    iou = _div(intersect, union)
    recall = _div(intersect, area_label)
    precision = _div(intersect, area_pred)
    dice = _div(2 * intersect, area_pred + area_label)
    # mmseg's f_score with beta=1: NaN whenever precision or recall is NaN, and 0/0 when both are 0.
    fscore = 2 * precision * recall / (precision + recall)

    out: dict[str, Tensor | float] = {
        "IoU": iou,
        "Acc": recall,
        "Fscore": fscore,
        "Precision": precision,
        "Recall": recall.clone(),
        "Dice": dice,
        "aAcc": float(_div(intersect.sum(), area_label.sum())),
        "mIoU": float(torch.nanmean(iou)),
        "mAcc": float(torch.nanmean(recall)),
        "mFscore": float(torch.nanmean(fscore)),
        "mDice": float(torch.nanmean(dice)),
        "confusion_matrix": confmat,
        "confusion_matrix_normalized": _div(confmat, area_label[:, None]),
    }
    return out


class SegmentationMetrics(Metric):
    """mmseg-compatible IoU / Acc / Fscore / Precision / Recall / Dice accumulated over a split.

    Args:
        num_classes: number of classes K; labels must be in [0, K) or equal ``ignore_index``.
        ignore_index: label value excluded from every count (mmseg and our data use 255).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    confmat: Tensor

    def __init__(self, num_classes: int, ignore_index: int = 255, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} collides with a class index (num_classes={num_classes})"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state(
            "confmat", default=torch.zeros(num_classes, num_classes, dtype=torch.int64), dist_reduce_fx="sum"
        )

    def _to_class_indices(self, pred: Tensor, target: Tensor) -> Tensor:
        if pred.ndim == target.ndim + 1:
            if pred.shape[1] != self.num_classes:
                raise ValueError(
                    f"pred looks like logits (B, K, H, W) but has {pred.shape[1]} channels, expected "
                    f"num_classes={self.num_classes}"
                )
            if pred.shape[:1] + pred.shape[2:] != target.shape:
                raise ValueError(
                    f"logits shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}"
                )
            return pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise ValueError(
                f"pred shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}"
            )
        if pred.is_floating_point():
            raise ValueError("pred of the same shape as target must hold integer class indices, got floats")
        return pred

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch: ``pred`` as class indices shaped like ``target`` or logits (B, K, ...)."""
        if target.is_floating_point():
            raise ValueError(f"target must hold integer labels, got dtype {target.dtype}")
        pred = self._to_class_indices(pred, target)
        keep = target != self.ignore_index
        label = target[keep].long()
        pred = pred[keep].long()
        k = self.num_classes
        if label.numel() and (label.min() < 0 or label.max() >= k):
            bad = torch.unique(label[(label < 0) | (label >= k)])[:10].tolist()
            raise ValueError(
                f"target has values {bad} outside [0, {k}) that are not ignore_index={self.ignore_index}"
            )
        if pred.numel() and (pred.min() < 0 or pred.max() >= k):
            bad = torch.unique(pred[(pred < 0) | (pred >= k)])[:10].tolist()
            raise ValueError(f"pred has class indices {bad} outside [0, {k})")
        self.confmat += torch.bincount(label * k + pred, minlength=k * k).reshape(k, k)

    def compute(self) -> dict[str, Tensor | float]:
        return metrics_from_confusion_matrix(self.confmat)
