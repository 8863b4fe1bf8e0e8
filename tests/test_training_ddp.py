"""DDP on two CPU processes (gloo): disjoint data shards, identical weights after every step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from seglstm.data.synthetic import generate
from seglstm.training.data_order import ResumableSegDataModule
from seglstm.training.task import SegmentationTask
from seglstm.training.trainer import SegTrainer

TINY_MODEL = {
    "depths": [1, 1, 1, 1],
    "embed_dim": 32,
    "img_size": 64,
    "channels": 32,
    "aux_cfg": {"channels": 16},
}


class RecordRanks(Callback):
    """Each rank writes the files it trained on and its final parameters."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.paths: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.paths += list(batch["path"])

    def on_train_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        Path(self.out, f"paths_{rank}.json").write_text(json.dumps(self.paths))
        params = {k: v.detach().cpu() for k, v in pl_module.model.named_parameters()}
        torch.save({"params": params, "world": trainer.world_size}, Path(self.out, f"params_{rank}.pt"))


def test_two_process_ddp_shards_data_and_keeps_weights_identical(tmp_path: Path) -> None:
    root = generate(tmp_path / "loveda", 8, 2, size=64, seed=0, progress=False)
    dm = ResumableSegDataModule(
        dataset="loveda",
        root=str(root),
        batch_size=2,
        num_workers=0,
        crop_size=(64, 64),
        train_scale=(64, 64),
        test_scale=(64, 64),
    )
    task = SegmentationTask(
        model="seglstm_upernet_t",
        num_classes=7,
        model_kwargs=TINY_MODEL,
        warmup_iters=2,
        max_iters=6,
        lr=1e-3,
    )
    before = {k: v.detach().clone() for k, v in task.model.named_parameters()}
    trainer = SegTrainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        callbacks=[RecordRanks(str(tmp_path))],
    )
    trainer.fit(task, datamodule=dm)

    seen = [json.loads((tmp_path / f"paths_{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 3 * 2  # 3 steps x batch 2 on each rank
    # the first epoch (8 images, 4 per rank) is split into two disjoint shards covering the split
    assert not set(seen[0][:4]) & set(seen[1][:4])
    assert {Path(p).name for p in seen[0][:4] + seen[1][:4]} == {f"train_{i:05d}.png" for i in range(8)}
    ranks = [torch.load(tmp_path / f"params_{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    for name, value in ranks[0]["params"].items():
        torch.testing.assert_close(ranks[1]["params"][name], value, rtol=0, atol=0, msg=name)
    moved = [n for n, v in ranks[0]["params"].items() if not torch.equal(v, before[n])]
    assert len(moved) > len(before) // 2  # the ranks agree on weights that actually trained


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_is_refused_on_cpu(precision: str) -> None:
    with pytest.raises(ValueError, match=r"trainer\.precision=.*needs a CUDA device"):
        SegTrainer(accelerator="cpu", precision=precision, logger=False)


def test_auto_precision_and_sync_batchnorm_on_cpu() -> None:
    trainer = SegTrainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert trainer.precision == "32-true"
