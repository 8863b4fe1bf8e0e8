"""``seglstm fit|validate|test|predict`` end to end on a tiny synthetic LoveDA and a tiny Seg-LSTM."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seglstm.cli.main import main as seglstm
from seglstm.data.synthetic import generate
from seglstm.utils.io import torch_load

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY_MODEL = {
    "depths": [1, 1, 1, 1],
    "embed_dim": 32,
    "img_size": 64,
    "channels": 32,
    "aux_cfg": {"channels": 16},
}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(
        tmp_path_factory.mktemp("synth") / "loveda", 8, 3, n_test=2, size=64, seed=0, progress=False
    )


def _config(tmp_path: Path, root: Path, run: str = "run", **trainer: object) -> Path:
    """A config composed from the repo's shared parts, shrunk to a few CPU steps."""
    text = f"""
_base_:
  - {CONFIGS / "_base_/schedules/15k.yaml"}
  - {CONFIGS / "_base_/default_runtime.yaml"}
model:
  model: seglstm_upernet_t
  model_kwargs: {json.dumps(TINY_MODEL)}
  warmup_iters: 2
  max_iters: 8
data:
  dataset: loveda
  root: {root}
  batch_size: 2
  num_workers: 0
  crop_size: [64, 64]
  train_scale: [64, 64]
  test_scale: [64, 64]
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 4
  val_check_interval: 2
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {tmp_path / run}
"""
    for key, value in trainer.items():
        text = re.sub(rf"(?m)^  {key}: .*$", f"  {key}: {value}", text)
    path = tmp_path / f"{run}.yaml"
    path.write_text(text)
    return path


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch_load(ckpt)["state_dict"]


def test_every_config_parses(capsys: pytest.CaptureFixture) -> None:
    configs = sorted(p for p in CONFIGS.glob("*.yaml"))
    names = {p.stem for p in configs}
    heads = ("upernet", "ann", "apcnet", "deeplabv3", "deeplabv3plus")
    seed = {
        f"seglstm_{h}{lay}_15k_{d}_512x512"
        for h in heads
        for lay in ("", "_44124")
        for d in ("loveda", "potsdam", "vaihingen")
    }
    assert len(seed) == 30 and seed <= names
    assert {"demo", "deeplabv3plus_r50_15k_loveda_512x512", "vit_s_upernet_15k_loveda_512x512"} <= names
    for path in configs:
        with pytest.raises(SystemExit) as exit_info:
            seglstm(["fit", "--config", str(path), "--print_config"])
        assert exit_info.value.code in (0, None), path
        printed = capsys.readouterr().out
        assert "_base_" not in printed, path
        model = re.search(r"(?m)^  model: (\S+)$", printed)
        assert model is not None, path
        if path.stem.startswith("seglstm_"):
            head, layout = re.match(r"seglstm_([a-z0-9]+?)(_44124)?_15k_(\w+)_512x512", path.stem).group(1, 2)
            assert model.group(1) == f"seglstm_{head}_s{layout or ''}", path
            assert "max_steps: 15000" in printed and "val_check_interval: 1000" in printed
            assert "lr: 0.0006" in printed and "warmup_iters: 1500" in printed


def test_fit_validate_test_predict_and_plot(
    tmp_path: Path, synth: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _config(tmp_path, synth)
    run = tmp_path / "run"
    assert seglstm(["fit", "--config", str(cfg)]) == 0
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and "iter_4.ckpt" in ckpts
    assert any(n.startswith("best_mIoU_iter_") for n in ckpts)
    assert (run / "config.yaml").is_file()
    ckpt = torch_load(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4
    assert ckpt["hyper_parameters"]["num_classes"] == 7  # taken from the data
    csv_text = (run / "logs" / "version_0" / "metrics.csv").read_text()
    for column in (
        "train/loss",
        "train/loss_decode",
        "train/loss_aux",
        "train/lr",
        "val/mIoU",
        "val/IoU.water",
    ):
        assert column in csv_text.splitlines()[0]
    assert list((run / "logs" / "version_0" / "tb").glob("events.out.tfevents.*"))

    caplog.clear()
    assert seglstm(["validate", "--config", str(cfg), "--ckpt_path", "last"]) == 0
    seen = capsys.readouterr()
    # mIoU in percent with 2 decimals, as in the tables; not Lightning's table of fractions
    shown = seen.out + seen.err + caplog.text
    means = re.search(r"\|\s+aAcc \|\s+mIoU \|.*\n\|[-|]+\|\n\|\s+([\d.]+) \|\s+([\d.]+) \|", shown)
    assert means is not None, shown[-2000:]
    assert re.fullmatch(r"\d+\.\d\d", means.group(2))
    assert "val/mIoU" not in seen.out

    out = tmp_path / "vis"
    assert seglstm(["test", "--config", str(cfg), "--ckpt_path", "best", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["per_class"]) == {
        "background",
        "building",
        "road",
        "water",
        "barren",
        "forest",
        "agricultural",
    }
    assert 0.0 <= report["mIoU"] <= 1.0 and 0.0 <= report["aAcc"] <= 1.0
    counts = np.asarray(report["confusion_matrix"]["counts"])
    labels = [np.asarray(Image.open(p)) for p in sorted((synth / "ann_dir" / "val").glob("*.png"))]
    assert counts.sum() == sum(int(((lab > 0) & (lab < 8)).sum()) for lab in labels)  # 0 = no data, ignored
    assert "| Class" in (out / "metrics.md").read_text()
    assert (out / "confusion_matrix.png").is_file()
    assert sorted(p.name for p in (out / "overlay").iterdir()) == [f"val_0000{i}.png" for i in range(3)]
    assert np.asarray(Image.open(out / "color" / "val_00000.png")).shape == (64, 64, 3)

    pred = tmp_path / "submission"
    rc = seglstm(
        [
            "predict",
            "--config",
            str(cfg),
            "--ckpt_path",
            "last",
            "--data.predict_root",
            str(synth / "img_dir" / "test"),
            "--out",
            str(pred),
            "--format",
            "loveda",
        ]
    )
    assert rc == 0
    assert sorted(p.name for p in pred.iterdir()) == ["test_00000.png", "test_00001.png"]
    mask = np.asarray(Image.open(pred / "test_00000.png"))
    assert mask.shape == (64, 64) and mask.dtype == np.uint8 and mask.max() <= 6

    assert seglstm(["plot-log", str(run)]) == 0
    assert Image.open(run / "curves.png").size[0] > 500


def test_resume_mid_epoch_matches_an_uninterrupted_run(tmp_path: Path, synth: Path) -> None:
    """Kill after 3 steps (mid-epoch: 4 batches per epoch), resume to 6 == 6 steps in one go.

    Two DataLoader workers: the case where Lightning would otherwise draw the resumed epoch's first
    indices before telling the sampler the epoch. Validation at step 3 sits between save and resume.
    """
    extra = {"max_steps": 6, "val_check_interval": 3}
    full = _config(tmp_path, synth, "full", **extra)
    split = _config(tmp_path, synth, "split", **extra)
    workers = ["--data.num_workers", "2", "--model.max_iters", "6"]
    assert seglstm(["fit", "--config", str(full), *workers]) == 0
    assert seglstm(["fit", "--config", str(split), *workers, "--trainer.max_steps", "3"]) == 0
    assert torch_load(tmp_path / "split" / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert seglstm(["fit", "--config", str(split), *workers, "--ckpt_path", "last"]) == 0
    a = _state(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = _state(tmp_path / "split" / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=key)
    # the resumed run logs into a second version folder; plot-log joins them into one curve
    assert len(list((tmp_path / "split" / "logs").glob("version_*"))) == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--model.model", "seglstm_upernet_x"], r"model\.model: unknown model 'seglstm_upernet_x'"),
        (
            ["--model.num_classes", "6"],
            r"model\.num_classes=6 conflicts with data\.dataset='loveda'.*7 classes",
        ),
        (["--data.root", "/nonexistent/loveda"], r"data\.root: /nonexistent/loveda is not a directory"),
        (
            ["--model.max_iters", "null", "--trainer.max_steps", "3"],
            r"trainer\.max_steps=3 must exceed model\.warmup_iters=2 by at least 2",
        ),
        (["--model.max_iters", "5", "--model.warmup_iters", "4"], r"model\.max_iters=5 must exceed"),
        (["--model.max_iters", "-3"], r"the poly schedule needs model\.max_iters > 0, got -3"),
        (["--model.warmup_iters", "1"], r"model\.warmup_iters must be 0 \(no warm-up\) or >= 2, got 1"),
    ],
)
def test_bad_config_values_fail_before_training(
    tmp_path: Path, synth: Path, capsys: pytest.CaptureFixture, override: list[str], message: str
) -> None:
    cfg = _config(tmp_path, synth)
    assert seglstm(["fit", "--config", str(cfg), *override]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "logs").exists()


def test_missing_checkpoint_alias_and_config_file(
    tmp_path: Path, synth: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = _config(tmp_path, synth)
    assert seglstm(["test", "--config", str(cfg), "--ckpt_path", "best"]) == 2
    assert "--ckpt_path best: no such checkpoint in" in capsys.readouterr().err
    assert seglstm(["fit", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: file does not exist" in capsys.readouterr().err
