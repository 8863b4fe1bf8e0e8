"""benchmarks/precision_accuracy.py: its val pass, mIoU and pixel agreement against a numpy reference computed
by hand from known predictions, and the fp32/bf16 rows on a tiny model over the tiny LoveDA-like split."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import precision_accuracy as pa

from seglstm.data.datamodule import SegDataModule
from seglstm.training.task import SegmentationTask
from seglstm.utils import device as device_module

K = 7  # LoveDA's classes
IGNORE = 255


@pytest.fixture(scope="module")
def task() -> SegmentationTask:
    torch.manual_seed(0)
    t = SegmentationTask("seglstm_upernet_t", num_classes=K, test_cfg={"mode": "whole"},
                         model_kwargs=dict(depths=[1, 1, 1, 1], patch_size=8, img_size=64, channels=16,
                                           aux_cfg={"channels": 8}))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # gates that vary per token, so the mLSTM path matters
        for name, p in t.model.named_parameters():
            if "gate.weight" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return t.eval()


@pytest.fixture(scope="module")
def batches(tiny_loveda: Path) -> list[dict]:
    dm = SegDataModule(dataset="loveda", root=str(tiny_loveda), test_scale=None, num_workers=0, val_batch_size=2)
    dm.setup("validate")
    return pa.load_batches(dm)


def _reference_miou(maps: list[np.ndarray], masks: list[np.ndarray]) -> tuple[float, float]:
    """mIoU and aAcc by the textbook formulas, classes present in neither labels nor predictions skipped."""
    inter, union, correct, labelled = np.zeros(K), np.zeros(K), 0, 0
    for pred, mask in zip(maps, masks):
        keep = mask != IGNORE
        p, m = pred[keep], mask[keep]
        correct += int((p == m).sum())
        labelled += m.size
        for c in range(K):
            inter[c] += np.sum((p == c) & (m == c))
            union[c] += np.sum((p == c) | (m == c))
    present = union > 0
    return float(np.mean(inter[present] / union[present])), correct / labelled


def test_known_predictions_give_the_hand_computed_miou_and_agreement(task, batches):
    rng = np.random.default_rng(3)
    masks = [m.numpy() for b in batches for m in b["mask"]]
    # predictions: the label with a seeded 30% of the pixels replaced by random classes
    maps = [np.where(rng.random(m.shape) < 0.3, rng.integers(0, K, m.shape), np.where(m == IGNORE, 0, m))
            for m in masks]
    flipped = [m.copy() for m in maps]
    flipped[0][:5, :] = (flipped[0][:5, :] + 1) % K  # 5 rows of the first map changed
    images = [im for b in batches for im in b["image"]]
    source: list[np.ndarray] = []

    def forward(img: torch.Tensor) -> torch.Tensor:  # one-hot logits of each image's known map
        picked = [source[next(i for i, im in enumerate(images) if torch.equal(im, x))] for x in img]
        return torch.nn.functional.one_hot(torch.from_numpy(np.stack(picked)), K).permute(0, 3, 1, 2).float()

    results = {}
    for name, known in (("ref", maps), ("flipped", flipped)):
        source[:] = known
        with pa.network(task, forward):
            results[name] = pa.evaluate(task, batches)
    metrics, preds, seconds = results["ref"]
    assert [p.numpy().tolist() for p in preds] == [m.tolist() for m in maps]
    miou, aacc = _reference_miou(maps, masks)
    assert metrics["mIoU"] == pytest.approx(miou, abs=1e-12)
    assert metrics["aAcc"] == pytest.approx(aacc, abs=1e-12)
    assert seconds >= 0

    row = pa.result_row("flipped", *results["flipped"][:2], 1.0, (metrics, preds))
    total = sum(m.size for m in maps)
    assert row["agreement"] == pytest.approx(100.0 * (total - 5 * maps[0].shape[1]) / total)
    assert row["mIoU"] == pytest.approx(100.0 * _reference_miou(flipped, masks)[0])
    assert row["delta_mIoU"] == pytest.approx(row["mIoU"] - 100.0 * miou)
    assert row["meets"] == ("yes" if abs(row["delta_mIoU"]) <= 0.3 and row["agreement"] >= 99 else "no")
    assert "encode_decode" not in vars(task.model)  # the method is back


@pytest.mark.parametrize("native", [True, False])
def test_fp32_and_bf16_rows_on_a_tiny_model(task, batches, tmp_path, monkeypatch, one_thread, native):
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: native)
    rows = pa.measure(task, batches, ["fp32", "bf16"], tmp_path)
    fp32, bf16 = rows
    assert (fp32["variant"], fp32["delta_mIoU"], fp32["agreement"], fp32["meets"]) == ("fp32", 0.0, 100.0, "yes")
    # the fp32 row is the project's own metric of the model's own predictions
    with torch.inference_mode():
        logits = [task.model.inference(b["image"]) for b in batches]
    maps = [m.numpy() for lg in logits for m in lg.argmax(1)]
    masks = [m.numpy() for b in batches for m in b["mask"]]
    assert len({int(c) for m in maps for c in np.unique(m)}) > 1  # a constant map would agree trivially
    assert fp32["mIoU"] == pytest.approx(100.0 * _reference_miou(maps, masks)[0])
    assert bf16["variant"] == "bf16" and "FAILED" not in bf16["note"]
    assert ("EMULATED" in bf16["note"]) is (not native)
    assert 90.0 <= bf16["agreement"] <= 100.0
    assert bf16["mIoU"] == pytest.approx(fp32["mIoU"] + bf16["delta_mIoU"])


def test_unknown_variant_is_an_error_naming_the_option(task, batches, tmp_path):
    with pytest.raises(SystemExit, match="--variants: unknown"):
        pa.measure(task, batches, ["fp8"], tmp_path)


def test_reference_path_copy_computes_the_fused_path_function(task, batches, one_thread):
    """The int8 variants run the ViL layers' reference path: in float32 it must be the model's own function."""
    ref_model = pa.reference_path(task.model)
    assert ref_model is not task.model
    x = batches[0]["image"]
    with torch.inference_mode():
        fused, reference = task.model(x), ref_model(x)
    torch.testing.assert_close(reference, fused, rtol=1e-4, atol=1e-4)
    assert "forward" not in vars(next(m for m in task.model.modules() if hasattr(m, "reference_forward")))


def test_torchao_int8_row_quantises_the_projections(task, batches, tmp_path, one_thread):
    pytest.importorskip("torchao", reason="torchao is the optional int8 backend (pip install 'seglstm[bench]')")
    quantised = pa.torchao_int8(task.model)
    kinds = {name.rsplit(".", 1)[-1]: type(m.weight).__name__ for name, m in quantised.named_modules()
             if isinstance(m, torch.nn.Linear)}
    assert kinds["proj_up"] == kinds["proj_down"] == "Int8Tensor"
    assert kinds["igate"] in ("Parameter", "Tensor")  # only the projections
    _, int8 = pa.measure(task, batches, ["fp32", "int8-torchao"], tmp_path)
    assert int8["variant"] == "int8-torchao" and "FAILED" not in int8["note"], int8["note"]
    assert 90.0 <= int8["agreement"] <= 100.0


@pytest.mark.slow  # two ONNX exports (tens of seconds each on 2 cores)
def test_onnx_rows_and_the_speed_script_on_a_tiny_model(task, batches, tiny_loveda, tmp_path, monkeypatch,
                                                        one_thread):
    import json

    import onnx_speed

    pytest.importorskip("torchao", reason="torchao is the optional int8 backend (pip install 'seglstm[bench]')")
    dm = SegDataModule(dataset="loveda", root=str(tiny_loveda))
    # what a checkpoint of a fit on this data records (the ONNX file carries it)
    monkeypatch.setattr(task, "meta", {"classes": list(dm.classes), "num_classes": K, "mean": list(dm.mean),
                                       "std": list(dm.std), "palette": [list(c) for c in dm.palette]})
    rows = pa.measure(task, batches, ["fp32", "onnx-fp32", "int8-onnx", "int8-onnx-ref"], tmp_path)
    by = {r["variant"]: r for r in rows}
    for name in ("onnx-fp32", "int8-onnx", "int8-onnx-ref"):
        assert "FAILED" not in by[name]["note"], by[name]["note"]
    assert by["onnx-fp32"]["agreement"] >= 99.9  # the export alone: float32 rounding only
    assert by["int8-onnx"]["agreement"] >= 90.0 and by["int8-onnx-ref"]["agreement"] >= 90.0

    out = tmp_path / "speed.json"
    assert onnx_speed.main(["--tile", "64", "--repeats", "1", "--out", str(out),
                            "--rows", "pytorch-bf16", "pytorch-int8-torchao", "onnx-fp32", "onnx-int8"]) == 0
    speed = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(speed) == ["pytorch-fp32", "pytorch-bf16", "pytorch-int8-torchao", "onnx-fp32", "onnx-int8"]
    assert speed["pytorch-fp32"]["vs_fp32"] == 1.0 and speed["pytorch-bf16"]["vs_bf16"] == 1.0
    for r in speed.values():
        assert r["s_per_batch"] > 0 and r["tiles_per_s"] == pytest.approx(1 / r["s_per_batch"]), r
    assert speed["onnx-fp32"]["max_abs_diff"] < 1e-3 and speed["onnx-fp32"]["agreement"] >= 99.9
