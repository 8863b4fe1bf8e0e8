"""SegmentationMetrics against a hand-computed float64 reference written the way mmseg's IoUMetric counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from seglstm.metrics import SegmentationMetrics, metrics_from_confusion_matrix
from tests.references.metrics import iou_metric_reference


def _check(got: dict, ref: dict) -> None:
    for key in ("IoU", "Acc", "Recall", "Precision", "Dice", "Fscore", "confusion_matrix_normalized"):
        assert got[key].dtype == torch.float64
        np.testing.assert_allclose(
            got[key].numpy(), ref[key], rtol=1e-12, atol=0, equal_nan=True, err_msg=key
        )
    for key in ("aAcc", "mIoU", "mAcc", "mDice", "mFscore"):
        assert isinstance(got[key], float)
        assert got[key] == pytest.approx(ref[key], rel=1e-12), key
    assert got["confusion_matrix"].dtype == torch.int64
    np.testing.assert_array_equal(got["confusion_matrix"].numpy(), ref["confusion_matrix"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_with_absent_classes_and_ignore(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = 7
    metric = SegmentationMetrics(num_classes=k)
    preds, labels = [], []
    for _ in range(4):  # several updates: counts must accumulate over the split, not average per image
        h, w = rng.integers(5, 40, size=2)
        # class 5 never appears anywhere (NaN everywhere), class 6 only in predictions, class 4 only in labels
        lab = rng.choice([0, 1, 2, 3, 4], size=(2, h, w))
        pred = rng.choice([0, 1, 2, 3, 6], size=(2, h, w))
        agree = rng.random((2, h, w)) < 0.4
        pred[agree & (lab != 4)] = lab[agree & (lab != 4)]
        lab[rng.random((2, h, w)) < 0.15] = 255
        preds.append(pred)
        labels.append(lab)
        metric.update(torch.from_numpy(pred), torch.from_numpy(lab))
    got = metric.compute()
    ref = iou_metric_reference(preds, labels, k)
    _check(got, ref)
    # the mmseg NaN rules for the three kinds of incomplete class
    assert math.isnan(got["IoU"][5]) and math.isnan(got["Acc"][5]) and math.isnan(got["Precision"][5])
    assert got["IoU"][6] == 0 and got["Precision"][6] == 0 and math.isnan(got["Acc"][6])
    assert math.isnan(got["Fscore"][6])
    assert got["IoU"][4] == 0 and got["Acc"][4] == 0 and math.isnan(got["Precision"][4])
    assert math.isnan(got["Fscore"][4])
    assert torch.isnan(got["confusion_matrix_normalized"][5]).all()
    assert 0.0 < got["mIoU"] < 1.0


def test_logits_equal_argmax_and_ignore_pixels_never_count() -> None:
    gen = torch.Generator().manual_seed(3)
    k = 5
    logits = torch.randn(3, k, 17, 23, generator=gen)
    target = torch.randint(0, k, (3, 17, 23), generator=gen)
    target[:, :4] = 255
    a, b = SegmentationMetrics(k), SegmentationMetrics(k)
    a.update(logits, target)
    b.update(logits.argmax(1), target)
    ra, rb = a.compute(), b.compute()
    assert torch.equal(ra["confusion_matrix"], rb["confusion_matrix"])
    assert int(ra["confusion_matrix"].sum()) == int((target != 255).sum())
    ref = iou_metric_reference([logits.argmax(1).numpy()], [target.numpy()], k)
    _check(ra, ref)


def test_split_accumulation_equals_merged_states() -> None:
    """What DDP does: each rank counts its shard, the states are summed (dist_reduce_fx='sum')."""
    gen = torch.Generator().manual_seed(4)
    k = 6
    pred = torch.randint(0, k, (4, 31, 29), generator=gen)
    target = torch.randint(0, k, (4, 31, 29), generator=gen)
    whole, r0, r1 = SegmentationMetrics(k), SegmentationMetrics(k), SegmentationMetrics(k)
    whole.update(pred, target)
    r0.update(pred[:2], target[:2])
    r1.update(pred[2:], target[2:])
    r0.merge_state(r1)
    assert torch.equal(r0.compute()["confusion_matrix"], whole.compute()["confusion_matrix"])
    assert r0.compute()["mIoU"] == whole.compute()["mIoU"]


def test_reset_clears_counts() -> None:
    m = SegmentationMetrics(3)
    m.update(torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, 1]]))
    m.reset()
    m.update(torch.tensor([[2, 2]]), torch.tensor([[2, 1]]))
    assert m.compute()["confusion_matrix"].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 1]]


def test_from_confusion_matrix_hand_example() -> None:
    # labels: class 0 has 4 px (3 right, 1 predicted as 1); class 1 has 2 px (both right); class 2 absent
    cm = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    got = metrics_from_confusion_matrix(cm)
    assert got["IoU"][:2].tolist() == [3 / 4, 2 / 3]
    assert got["Acc"][:2].tolist() == [3 / 4, 1.0]
    assert got["Precision"][:2].tolist() == [1.0, 2 / 3]
    assert got["Dice"][:2].tolist() == [6 / 7, 4 / 5]
    assert got["aAcc"] == 5 / 6
    assert got["mIoU"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert math.isnan(got["IoU"][2])


@pytest.mark.parametrize(
    ("pred", "target", "message"),
    [
        (torch.tensor([[0, 1]]), torch.tensor([[0, 7]]), "outside"),
        (torch.tensor([[0, 9]]), torch.tensor([[0, 1]]), "pred has class indices"),
        (torch.tensor([[0, 1, 1]]), torch.tensor([[0, 1]]), "does not match"),
        (torch.zeros(1, 4, 2), torch.tensor([[0, 1]]), "channels"),
        (torch.tensor([[0.0, 1.0]]), torch.tensor([[0, 1]]), "integer class indices"),
        (torch.tensor([[0, 1]]), torch.tensor([[0.0, 1.0]]), "integer labels"),
    ],
)
def test_bad_input_raises(pred: torch.Tensor, target: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SegmentationMetrics(3).update(pred, target)


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationMetrics(0)
    with pytest.raises(ValueError, match="ignore_index"):
        SegmentationMetrics(7, ignore_index=3)
