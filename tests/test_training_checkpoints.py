"""Checkpoints that bound the loss: last.ckpt on a timer and on SIGINT/SIGTERM, --auto-resume from the newest
checkpoint by step, one run per run folder, ``best`` by recorded score, and the index behind them."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from seglstm.cli.lightning import ConfigValueError, best_checkpoint, newest_checkpoint
from seglstm.cli.main import main as seglstm
from seglstm.data.datamodule import SegDataModule
from seglstm.training.callbacks import AtomicCheckpointIO, RunCheckpoint, read_index
from seglstm.training.task import SegmentationTask
from seglstm.training.trainer import SegTrainer
from seglstm.utils.io import torch_load
from tests.reliability_helpers import make_synth, write_config

pytestmark = pytest.mark.usefixtures("rel_tiny_seg")

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    """Minutes that advance by ``per_step`` at the end of every training step (no sleeping)."""

    def __init__(self, per_step_minutes: float) -> None:
        self.seconds = 0.0
        self.per_step = 60.0 * per_step_minutes

    def __call__(self) -> float:
        return self.seconds


class AdvanceClock(Callback):
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self.clock.seconds += self.clock.per_step


class SpyIO(AtomicCheckpointIO):
    """Records (file name, global step) of every checkpoint written."""

    def __init__(self) -> None:
        super().__init__()
        self.saved: list[tuple[str, int]] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        self.saved.append((Path(path).name, int(checkpoint["global_step"])))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synth(tmp_path_factory.mktemp("ckpt") / "loveda")


def test_last_ckpt_refreshed_on_a_timer(tmp_path: Path, data: Path) -> None:
    clock = FakeClock(per_step_minutes=3)
    spy = SpyIO()
    guard = RunCheckpoint(
        filename="iter_{step}", every_n_train_steps=1000, save_last=True, last_every_minutes=10, clock=clock
    )
    trainer = SegTrainer(
        accelerator="cpu", devices=1, max_steps=10, logger=False, default_root_dir=str(tmp_path),
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[AdvanceClock(clock), guard], plugins=[spy],
    )  # fmt: skip
    task = SegmentationTask("rel_tiny_seg", num_classes=7, warmup_iters=0, lr=0.01)
    dm = SegDataModule("loveda", str(data), batch_size=2, num_workers=0, crop_size=(16, 16),
                       train_scale=(32, 16), test_scale=(32, 32))  # fmt: skip
    trainer.fit(task, datamodule=dm)
    # Independent expectation: minute 3*s at the end of step s; a save when >= 10 minutes passed since the last.
    expected, last = [], 0.0
    for step in range(1, 11):
        if 3.0 * step - last >= 10:
            expected.append(step)
            last = 3.0 * step
    timed = [step for name, step in spy.saved if name == "last.ckpt" and step < 10]
    assert timed == expected == [4, 8]
    assert spy.saved[-1] == ("last.ckpt", 10)  # the end of training still saves
    index = read_index(tmp_path / "checkpoints")
    assert index["checkpoints"]["last.ckpt"]["global_step"] == 10


def _signal_config(tmp_path: Path, data: Path, signum: int, max_steps: int = 6) -> Path:
    cfg = write_config(tmp_path / "sig.yaml", data, tmp_path / "run", max_steps=max_steps)
    doc = yaml.safe_load(cfg.read_text())
    doc["trainer"]["callbacks"] = [
        {"class_path": "seglstm.training.callbacks.RunCheckpoint",
         "init_args": {"filename": "iter_{step}", "every_n_train_steps": 1000, "save_last": True}},
        {"class_path": "tests.reliability_helpers.SignalAt", "init_args": {"step": 3, "signum": int(signum)}},
    ]  # fmt: skip
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    return cfg


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_step_writes_last_and_auto_resume_finishes(
    tmp_path: Path, data: Path, signum: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture,
) -> None:
    cfg = _signal_config(tmp_path, data, signum)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.run(
        [sys.executable, "-m", "tests.reliability_helpers", "fit", "--config", str(cfg),
         "--allow-class-path", "tests"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    name = signal.Signals(signum).name
    assert child.returncode == 128 + signum, child.stderr[-3000:]
    assert f"interrupted by {name} at iteration 3" in child.stderr
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["last.ckpt"]  # no interval had passed
    assert torch_load(ckpts / "last.ckpt")["global_step"] == 3

    # the same command again refuses (one run per folder) ...
    monkeypatch.setenv("SIGNAL_AT_ON", "0")
    args = ["fit", "--config", str(cfg), "--allow-class-path", "tests"]
    assert seglstm(args) == 1
    assert "already holds a run" in capsys.readouterr().err
    # ... and --auto-resume continues from step 3 to max_steps, naming the file
    with caplog.at_level(logging.INFO):
        assert seglstm([*args, "--auto-resume"]) == 0
    err = capsys.readouterr().err
    assert f"auto-resume from {ckpts / 'last.ckpt'}" in err
    assert f"Restoring states from the checkpoint path at {ckpts / 'last.ckpt'}" in caplog.text
    resumed = torch_load(ckpts / "last.ckpt")
    assert resumed["global_step"] == 6
    # an uninterrupted run ends with the same weights
    ref = write_config(tmp_path / "ref.yaml", data, tmp_path / "ref", max_steps=6)
    assert seglstm(["fit", "--config", str(ref)]) == 0
    reference = torch_load(tmp_path / "ref" / "checkpoints" / "last.ckpt")["state_dict"]
    for key, value in reference.items():
        assert torch.equal(resumed["state_dict"][key], value), key


def test_auto_resume_without_checkpoint_says_so_and_new_version(tmp_path: Path, data: Path, capsys) -> None:
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run", max_steps=2)
    assert seglstm(["fit", "--config", str(cfg), "--auto-resume"]) == 0
    assert "auto-resume: no checkpoint of this run in" in capsys.readouterr().err
    assert seglstm(["fit", "--config", str(cfg), "--new-version"]) == 0
    assert "run folder " + str(tmp_path / "run-v1") in capsys.readouterr().err
    assert torch_load(tmp_path / "run-v1" / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert seglstm(["fit", "--config", str(cfg), "--new-version", "--auto-resume"]) == 2


def _save(io: AtomicCheckpointIO, path: Path, step: int, best: tuple[str, float] | None = None) -> None:
    callbacks = {}
    if best is not None:
        callbacks["ModelCheckpoint{'monitor': 'val/mIoU'}"] = {
            "monitor": "val/mIoU", "best_model_path": str(path.parent / best[0]), "best_model_score": torch.tensor(best[1]),
        }  # fmt: skip
    io.save_checkpoint({"global_step": step, "epoch": 0, "state_dict": {"w": torch.randn(3)}, "callbacks": callbacks}, path)


def test_newest_by_step_skips_damaged_and_unindexed_files(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    for name, step in (("iter_3.ckpt", 3), ("last.ckpt", 5), ("iter_5.ckpt", 5), ("iter_1.ckpt", 1)):
        _save(io, tmp_path / name, step)
    os.utime(tmp_path / "iter_1.ckpt", (2e9, 2e9))  # newest by time, oldest by step
    assert newest_checkpoint(tmp_path) == (tmp_path / "last.ckpt", [])
    # written after the index entry was lost: read from the file itself
    torch.save({"global_step": 9, "state_dict": {}}, tmp_path / "iter_9.ckpt")
    assert newest_checkpoint(tmp_path)[0] == tmp_path / "iter_9.ckpt"
    data = bytearray((tmp_path / "iter_9.ckpt").read_bytes())
    data[100:116] = bytes(b ^ 0xFF for b in data[100:116])
    (tmp_path / "iter_9.ckpt").write_bytes(data)
    path, notes = newest_checkpoint(tmp_path)
    assert path == tmp_path / "last.ckpt" and "iter_9.ckpt" in notes[0]


def test_best_is_the_best_score_recorded_not_the_newest_file(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    _save(io, tmp_path / "best_mIoU_iter_300.ckpt", 300, ("best_mIoU_iter_300.ckpt", 0.132))
    _save(io, tmp_path / "iter_400.ckpt", 400, ("best_mIoU_iter_300.ckpt", 0.132))
    torch.save({"global_step": 500}, tmp_path / "best_mIoU_iter_500.ckpt")  # newest, unrecorded score
    assert best_checkpoint(tmp_path) == tmp_path / "best_mIoU_iter_300.ckpt"
    io.remove_checkpoint(tmp_path / "iter_400.ckpt")
    assert "iter_400.ckpt" not in read_index(tmp_path)["checkpoints"]
    (tmp_path / "index.json").unlink()
    with pytest.raises(ConfigValueError, match=r"2 best.*no index\.json"):
        best_checkpoint(tmp_path)
