"""mmseg's IoUMetric written out in float64 numpy (docs/design.md, section 8): per-image histograms of
intersection, prediction and label areas, summed over the split, then divided; NaN for 0/0."""

from __future__ import annotations

import numpy as np


def iou_metric_reference(preds: list[np.ndarray], labels: list[np.ndarray], k: int, ignore: int = 255) -> dict:
    """mmseg-style: histogram intersect / pred / label areas per image, summed, then divided."""
    inter = np.zeros(k, np.float64)
    area_pred = np.zeros(k, np.float64)
    area_label = np.zeros(k, np.float64)
    confmat = np.zeros((k, k), np.int64)
    for p, lab in zip(preds, labels):
        keep = lab != ignore
        p, lab = p[keep], lab[keep]
        inter += np.histogram(p[p == lab], bins=k, range=(0, k))[0]
        area_pred += np.histogram(p, bins=k, range=(0, k))[0]
        area_label += np.histogram(lab, bins=k, range=(0, k))[0]
        np.add.at(confmat, (lab, p), 1)
    union = area_pred + area_label - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
        acc = inter / area_label
        prec = inter / area_pred
        dice = 2 * inter / (area_pred + area_label)
        f1 = 2 * prec * acc / (prec + acc)
        norm = confmat / confmat.sum(axis=1, keepdims=True)
    return {
        "IoU": iou,
        "Acc": acc,
        "Recall": acc,
        "Precision": prec,
        "Dice": dice,
        "Fscore": f1,
        "aAcc": inter.sum() / area_label.sum(),
        "mIoU": np.nanmean(iou),
        "mAcc": np.nanmean(acc),
        "mDice": np.nanmean(dice),
        "mFscore": np.nanmean(f1),
        "confusion_matrix": confmat,
        "confusion_matrix_normalized": norm,
    }
