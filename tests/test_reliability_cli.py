"""Newcomer paths of the CLI and checkpoint integrity: help texts, weights-only --ckpt_path, a run config
usable from another folder, errors on their own line, mIoU in percent, damaged and legacy checkpoints."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import TQDMProgressBar

from seglstm.cli.lightning import SegLightningCLI
from seglstm.cli.main import main as seglstm
from seglstm.config import META_KEY
from seglstm.inference.loading import load_segmentor
from seglstm.models.checkpoint import load_pretrained
from seglstm.training.callbacks import StepProgressBar
from seglstm.utils.io import CorruptCheckpointError, torch_load
from tests.reliability_helpers import RelTinySeg, damage, make_synth, write_config

pytestmark = pytest.mark.usefixtures("rel_tiny_seg")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(data root, config, run folder) of a finished 2-step run."""
    tmp = tmp_path_factory.mktemp("cli")
    data = make_synth(tmp / "loveda")
    run = tmp / "run"
    cfg = write_config(tmp / "c.yaml", data, run, max_steps=2)
    assert seglstm(["fit", "--config", str(cfg)]) == 0
    return data, cfg, run


@pytest.mark.parametrize("command", ["fit", "predict"])
def test_help_lists_seglstm_flags_and_no_function_repr(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        seglstm([command, "--help"])
    text = capsys.readouterr().out
    for flag in ("--auto-resume", "--new-version", "--unsafe-load", "--allow-class-path"):
        assert flag in text
    assert "<function" not in text and "lambda" not in text
    if command == "predict":
        assert re.search(r"--format \{png,loveda\}", text)


def test_weights_only_file_works_for_test_and_predict(
    trained: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data, cfg, run = trained
    full = torch_load(run / "checkpoints" / "last.ckpt")
    weights = tmp_path / "weights.pth"
    torch.save({k.removeprefix("model."): v for k, v in full["state_dict"].items()}, weights)
    out = tmp_path / "vis"
    assert seglstm(["test", "--config", str(cfg), "--ckpt_path", str(weights), "--out", str(out)]) == 0
    assert "(weights only)" in capsys.readouterr().err
    by_weights = (out / "metrics.json").read_text()
    assert seglstm(["test", "--config", str(cfg), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                    "--out", str(tmp_path / "vis2")]) == 0  # fmt: skip
    assert (tmp_path / "vis2" / "metrics.json").read_text() == by_weights  # the same weights, the same scores
    pred = tmp_path / "pred"
    assert seglstm(["predict", "--config", str(cfg), "--ckpt_path", str(weights), "--out", str(pred),
                    "--data.predict_root", str(data / "img_dir" / "val")]) == 0  # fmt: skip
    assert len(list((pred / "masks").glob("*.png"))) == 2
    assert seglstm(["fit", "--config", str(cfg), "--ckpt_path", str(weights)]) == 2
    assert "holds weights only, not a training checkpoint" in capsys.readouterr().err


def test_saved_run_config_works_from_another_folder(
    trained: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, _, run = trained
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["root"] == str(data.resolve()) and Path(saved["trainer"]["default_root_dir"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    assert seglstm(["validate", "--config", str(run / "config.yaml"), "--ckpt_path", "last"]) == 0


def test_errors_start_on_their_own_line(trained: tuple[Path, Path, Path], capsys: pytest.CaptureFixture) -> None:
    _, cfg, _ = trained
    assert seglstm(["fit", "--config", str(cfg), "--model.lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert "\nseglstm fit: error: model.lr must be > 0, got -1" in err


def test_progress_bar_shows_miou_in_percent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TQDMProgressBar, "get_metrics", lambda self, t, m: {"val/mIoU": 0.68304, "train/loss": 0.5})
    shown = StepProgressBar().get_metrics(None, None)  # type: ignore[arg-type]
    assert shown == {"val/mIoU%": "68.30", "train/loss": 0.5}


def test_damaged_checkpoint_refused_everywhere_legacy_still_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = RelTinySeg(7)
    big = {**model.state_dict(), "extra.weight": torch.randn(400_000)}  # 1.6 MB: several damaged spots
    meta = dict(model="rel_tiny_seg", model_kwargs={}, num_classes=7, classes=[f"c{i}" for i in range(7)],
                palette=[[i, i, i] for i in range(7)], mean=[0.0] * 3, std=[1.0] * 3, test_cfg={})  # fmt: skip
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": big, META_KEY: meta}, good)
    bad = damage(good, tmp_path / "bad.ckpt", start=64 * 1024)  # inside the tensor data, past the pickle
    assert bad.stat().st_size == good.stat().st_size
    # without the check the damaged file loads, with different tensors: the damage is real
    loaded = torch.load(bad, weights_only=True)["state_dict"]
    assert not torch.equal(loaded["extra.weight"], big["extra.weight"])
    for load in (lambda: torch_load(bad), lambda: load_pretrained(RelTinySeg(7), bad, strict=False),
                 lambda: load_segmentor(bad)):  # fmt: skip
        with pytest.raises(CorruptCheckpointError, match=re.escape(str(bad)) + r" is damaged: member '\S+' fails its CRC-32") as info:
            load()
        assert "mmseg" not in str(info.value)
    legacy = tmp_path / "legacy.pth"
    torch.save({"state_dict": model.state_dict()}, legacy, _use_new_zipfile_serialization=False)
    report = load_pretrained(RelTinySeg(7), legacy)
    assert report.format == "seglstm" and not report.missing_keys
    os.remove(good)


def test_predict_without_logger_keeps_the_run_config(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    data, cfg, run = trained
    before = (run / "config.yaml").read_bytes()
    assert seglstm(["predict", "--config", str(cfg), "--ckpt_path", "last", "--out", str(tmp_path / "p"),
                    "--data.predict_root", str(data / "img_dir" / "val")]) == 0  # fmt: skip
    assert (run / "config.yaml").read_bytes() == before


def test_checkpoint_fills_only_unset_model_settings(
    trained: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A value given on the command line beats the checkpoint's (Lightning's own rule is the reverse, so its
    checkpoint parsing must not see the path); a value the configs leave at its default comes from the
    checkpoint; the resolved path reaches the sub-command."""
    _, cfg, run = trained
    doc = yaml.safe_load(cfg.read_text())
    del doc["model"]["warmup_iters"]  # the checkpoint holds 0; the task's default differs
    partial = tmp_path / "partial.yaml"
    partial.write_text(yaml.safe_dump(doc), encoding="utf-8")
    seen = {}
    checks = SegLightningCLI.before_instantiate_classes

    def capture(self: SegLightningCLI) -> None:
        checks(self)
        seen["config"] = self.config["validate"].clone()
        raise KeyboardInterrupt  # stop before anything is built

    monkeypatch.setattr(SegLightningCLI, "before_instantiate_classes", capture)
    lr = float(torch.empty(()).uniform_(0.2, 0.9))
    with pytest.raises(KeyboardInterrupt):
        seglstm(["validate", "--config", str(partial), "--ckpt_path", "last", "--model.lr", str(lr)])
    model = seen["config"].model
    ckpt = torch_load(run / "checkpoints" / "last.ckpt")["hyper_parameters"]
    assert ckpt["lr"] == 0.01 and ckpt["warmup_iters"] == 0
    assert model.lr == pytest.approx(lr) and model.warmup_iters == 0
    assert seen["config"].ckpt_path == str(run / "checkpoints" / "last.ckpt")
