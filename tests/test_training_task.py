"""SegmentationTask with a tiny stand-in segmentor: recipe wiring, metrics, checkpoints, resume, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from seglstm.config import META_KEY
from seglstm.inference.loading import load_segmentor
from seglstm.metrics import SegmentationMetrics
from seglstm.training.callbacks import RunCheckpoint, SegPredictionWriter, TestReportWriter
from seglstm.training.optim import WarmupPoly
from seglstm.training.task import SegmentationTask
from seglstm.training.trainer import SegTrainer
from seglstm.utils.io import torch_load

K = 4
CLASSES = ["road", "tree", "water", "roof"]
PALETTE = [[10, 20, 30], [40, 50, 60], [70, 80, 90], [100, 110, 120]]


class TinySeg(nn.Module):
    """Stand-in with the segmentor interface: loss(img, mask) and inference(img, **test_cfg)."""

    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.neck = None
        self.decode_head = nn.Sequential(nn.Dropout2d(0.3), nn.Conv2d(width, num_classes, 1))
        self.auxiliary_head = None

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.backbone(img))

    def loss(self, img: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(self(img), mask, ignore_index=255)
        return {"loss": ce, "loss_decode": ce}

    @torch.no_grad()
    def inference(self, img: torch.Tensor, mode: str | None = None, flip: bool | None = None) -> torch.Tensor:
        logits = self(img)
        if flip:
            logits = (logits + self(img.flip(-1)).flip(-1)) / 2
        return logits


def tiny_standin_seg(num_classes: int, width: int = 8) -> TinySeg:
    return TinySeg(num_classes, width)


@pytest.fixture(autouse=True)
def _tiny_standin_seg(registry) -> None:
    """Every test here builds ``tiny_standin_seg`` by name; it is a preset for the test's duration only."""
    registry.model(tiny_standin_seg)


class _Images(Dataset):
    def __init__(self, n: int, size: int, seed: int, with_mask: bool = True) -> None:
        # images come at their file size except for predict, whose "files" are 24x20 (resized back)
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, size, size, generator=g)
        # a learnable rule: the class is the channel-0 intensity bucket
        self.masks = torch.bucketize(self.images[:, 0], torch.tensor([-0.7, 0.0, 0.7]))
        self.masks[:, :2, :3] = 255
        self.with_mask = with_mask

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        ori = (self.images.shape[-2], self.images.shape[-1]) if self.with_mask else (24, 20)
        item = {"image": self.images[i], "path": f"/data/img_{i:03d}.png", "ori_shape": ori}
        if self.with_mask:
            item["mask"] = self.masks[i]
        return item


class _DM(LightningDataModule):
    def __init__(self, num_classes: int = K, n: int = 8, batch_size: int = 2) -> None:
        super().__init__()
        self.num_classes, self.classes, self.palette, self.ignore_index = num_classes, CLASSES, PALETTE, 255
        self.mean, self.std = [120.0, 110.0, 100.0], [50.0, 55.0, 60.0]
        self.n, self.batch_size = n, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Images(self.n, 16, 0), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Images(3, 16, 1), batch_size=1)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(_Images(3, 16, 2), batch_size=1)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(_Images(3, 16, 3, with_mask=False), batch_size=2)


def _trainer(root: Path, max_steps: int, **kw) -> SegTrainer:
    kw.setdefault(
        "callbacks",
        [
            RunCheckpoint(
                filename="iter_{step}", every_n_train_steps=2, save_last=True, save_on_train_end=True
            )
        ],
    )
    return SegTrainer(
        default_root_dir=str(root),
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


def _task(**kw) -> SegmentationTask:
    kw.setdefault("warmup_iters", 2)
    kw.setdefault("max_iters", 20)
    return SegmentationTask(model="tiny_standin_seg", num_classes=K, lr=1e-2, **kw)


def _weights(task: SegmentationTask) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in task.model.state_dict().items()}


def test_resume_from_last_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """k steps, stop, resume from last.ckpt to 2k == 2k in one go (weights, optimizer, schedule, RNG)."""
    torch.manual_seed(0)
    full = _task(max_iters=8)  # the schedule spans 2k steps in both runs; max_steps only stops the first
    _trainer(tmp_path / "full", 8, limit_val_batches=0).fit(full, datamodule=_DM())

    torch.manual_seed(0)
    first = _task(max_iters=8)
    _trainer(tmp_path / "split", 4, limit_val_batches=0).fit(first, datamodule=_DM())
    assert (tmp_path / "split" / "checkpoints" / "last.ckpt").is_file()
    torch.manual_seed(123)  # a fresh process would not share the first run's RNG
    resumed = _task(max_iters=8)
    trainer = _trainer(tmp_path / "split", 8, limit_val_batches=0)
    trainer.fit(resumed, datamodule=_DM(), ckpt_path="last")
    assert trainer.global_step == 8
    a, b = _weights(full), _weights(resumed)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=key)
    assert resumed.lr_schedulers().last_epoch == 8
    # and it really moved away from the k-step weights
    assert not torch.allclose(_weights(first)["decode_head.1.weight"], a["decode_head.1.weight"])


def test_checkpoint_is_weights_only_and_rebuilds_with_load_segmentor(tmp_path: Path) -> None:
    torch.manual_seed(1)
    task = _task(test_cfg={"flip": True}, warmup_iters=0)
    _trainer(tmp_path, 3, limit_val_batches=0).fit(task, datamodule=_DM())
    ckpt_path = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch_load(ckpt_path)  # raises if anything but plain types were pickled
    meta = ckpt[META_KEY]
    assert meta["classes"] == CLASSES and meta["palette"] == PALETTE
    assert meta["mean"] == [120.0, 110.0, 100.0] and meta["test_cfg"] == {"flip": True}
    model, info = load_segmentor(ckpt_path)
    assert not model.training
    assert info["num_classes"] == K and info["classes"] == CLASSES and info["std"] == [50.0, 55.0, 60.0]
    x = torch.randn(2, 3, 16, 16)
    task.eval()
    torch.testing.assert_close(model.inference(x, **info["test_cfg"]), task.predict_logits(x))
    # final save at the last step (3 is not a multiple of every_n_train_steps=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert names == ["iter_3.ckpt", "last.ckpt"]
    index = json.loads((tmp_path / "checkpoints" / "index.json").read_text())
    assert {k: v["global_step"] for k, v in index["checkpoints"].items()} == {"iter_3.ckpt": 3, "last.ckpt": 3}


def test_validation_metrics_and_lr_are_logged(tmp_path: Path) -> None:
    torch.manual_seed(2)
    task = _task(warmup_iters=3, max_iters=10)
    trainer = _trainer(tmp_path, 6, val_check_interval=6, check_val_every_n_epoch=None)
    trainer.fit(task, datamodule=_DM())
    logged = trainer.callback_metrics
    # reference: the same predictions counted by an independent metric instance
    ref = SegmentationMetrics(K)
    task.eval()
    for batch in _DM().val_dataloader():
        ref.update(task.predict_logits(batch["image"]).argmax(1), batch["mask"])
    expected = ref.compute()
    assert float(logged["val/mIoU"]) == pytest.approx(expected["mIoU"], rel=1e-6)
    assert float(logged["val/aAcc"]) == pytest.approx(expected["aAcc"], rel=1e-6)
    assert float(logged["val/IoU.water"]) == pytest.approx(float(expected["IoU"][2]), rel=1e-6, nan_ok=True)
    # lr of the last step (t=5) under warm-up 3 then poly to 0 at 10 steps
    assert float(logged["train/lr"]) == pytest.approx(1e-2 * WarmupPoly(10, 3)(5), rel=1e-6)
    assert WarmupPoly(10, 3)(5) == pytest.approx(4 / 6)


def test_test_report_and_images(tmp_path: Path) -> None:
    torch.manual_seed(3)
    task = _task()
    out = tmp_path / "vis"
    trainer = _trainer(
        tmp_path, 2, limit_val_batches=0, callbacks=[TestReportWriter(str(out), save_images=True)]
    )
    trainer.fit(task, datamodule=_DM())
    trainer.test(task, datamodule=_DM())
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["per_class"]) == set(CLASSES)
    assert report["mIoU"] == pytest.approx(task.test_results["mIoU"])
    assert np.asarray(report["confusion_matrix"]["counts"]).sum() == 3 * (16 * 16 - 6)
    table = (out / "metrics.md").read_text()
    assert "| Class" in table and "mIoU" in table
    assert Image.open(out / "confusion_matrix.png").size[0] > 100
    overlay = np.asarray(Image.open(out / "overlay" / "img_002.png"))
    assert overlay.shape == (16, 16 * 2 + 8, 3)
    color = np.asarray(Image.open(out / "color" / "img_002.png"))
    # colour mask = palette[prediction] of the task's own prediction
    batch = next(iter(DataLoader(_Images(3, 16, 2), batch_size=3)))
    task.eval()
    pred = task.predict_logits(batch["image"][2:3]).argmax(1)[0].numpy()
    np.testing.assert_array_equal(color, np.asarray(PALETTE, np.uint8)[pred])


@pytest.mark.parametrize("fmt", ["png", "loveda"])
def test_predict_writer_formats(tmp_path: Path, fmt: str) -> None:
    torch.manual_seed(4)
    n = 7 if fmt == "loveda" else K
    task = SegmentationTask(model="tiny_standin_seg", num_classes=n, warmup_iters=0)
    writer = SegPredictionWriter(str(tmp_path / "pred"), fmt)
    dm = _DM(num_classes=n)
    dm.classes, dm.palette = [f"c{i}" for i in range(n)], [[i * 30, 0, 0] for i in range(n)]
    trainer = _trainer(tmp_path, 1, callbacks=[writer])
    trainer.predict(task, datamodule=dm, return_predictions=False)
    files = sorted(p.relative_to(tmp_path / "pred").as_posix() for p in (tmp_path / "pred").rglob("*.png"))
    names = [f"img_{i:03d}.png" for i in range(3)]
    if fmt == "loveda":
        assert files == names
    else:
        assert files == [f"color/{x}" for x in names] + [f"masks/{x}" for x in names]
    mask = np.asarray(Image.open(tmp_path / "pred" / ("" if fmt == "loveda" else "masks") / names[1]))
    assert mask.shape == (24, 20) and mask.dtype == np.uint8  # resized back to ori_shape
    images = _Images(3, 16, 3).images[1:2]
    task.eval()
    logits = F.interpolate(task.predict_logits(images), size=(24, 20), mode="bilinear", align_corners=False)
    np.testing.assert_array_equal(mask, logits.argmax(1)[0].numpy())


def test_loveda_format_needs_seven_classes(tmp_path: Path) -> None:
    task = _task()
    trainer = _trainer(tmp_path, 1, callbacks=[SegPredictionWriter(str(tmp_path / "p"), "loveda")])
    with pytest.raises(ValueError, match="7-class"):
        trainer.predict(task, datamodule=_DM(), return_predictions=False)


def test_bad_settings_name_their_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model\.model: unknown model 'tiny_standin_sge'"):
        SegmentationTask(model="tiny_standin_sge", num_classes=K)
    with pytest.raises(ValueError, match=r"model\.model_kwargs"):
        SegmentationTask(model="tiny_standin_seg", num_classes=K, model_kwargs={"depth": 3})
    with pytest.raises(ValueError, match=r"model\.test_cfg has unknown keys \['stirde'\]"):
        SegmentationTask(model="tiny_standin_seg", num_classes=K, test_cfg={"stirde": 3})
    with pytest.raises(ValueError, match=r"model\.num_classes is not set"):
        SegmentationTask(model="tiny_standin_seg")
    with pytest.raises(ValueError, match=r"model\.num_classes=4 conflicts"):
        _trainer(tmp_path, 1).fit(_task(), datamodule=_DM(num_classes=6))


def test_load_segmentor_from_weights_only_checkpoint_and_config(tmp_path: Path) -> None:
    """A foreign checkpoint (mmseg-style ``state_dict``, no hyper-parameters) is rebuilt from its config."""
    torch.manual_seed(5)
    model = TinySeg(7, width=6).eval()
    ckpt = tmp_path / "foreign.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {"iter": 15000}}, ckpt)
    base = tmp_path / "base.yaml"
    base.write_text("data:\n  dataset: loveda\n  mean: [1.0, 2.0, 3.0]\n  std: [4.0, 5.0, 6.0]\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"_base_: [{base.name}]\nmodel:\n  model: tiny_standin_seg\n  model_kwargs: {{width: 6}}\n"
        "  test_cfg: {flip: true}\n"
    )
    loaded, meta = load_segmentor(ckpt, cfg)
    assert meta["classes"][:2] == ["background", "building"] and meta["num_classes"] == 7
    assert meta["mean"] == [1.0, 2.0, 3.0] and meta["std"] == [4.0, 5.0, 6.0]
    assert len(meta["palette"]) == 7 and meta["test_cfg"] == {"flip": True}
    x = torch.randn(1, 3, 12, 12)
    torch.testing.assert_close(loaded.inference(x, **meta["test_cfg"]), model.inference(x, flip=True))
    with pytest.raises(ValueError, match="does not record its model"):
        load_segmentor(ckpt)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  model: tiny_standin_seg\n  model_kwargs: {width: 6}\n")
    with pytest.raises(ValueError, match="data section"):
        load_segmentor(ckpt, wrong)


def test_compile_keeps_parameter_names() -> None:
    """compile=True wraps the parts in place (compiled lazily), so checkpoints keep their key names."""
    plain = SegmentationTask(model="tiny_standin_seg", num_classes=K)
    compiled = SegmentationTask(model="tiny_standin_seg", num_classes=K, compile=True)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert compiled.model.backbone._compiled_call_impl is not None
    assert compiled.model.decode_head._compiled_call_impl is not None
    assert plain.model.backbone._compiled_call_impl is None
