"""The best score survives any interruption: with checkpoint and validation intervals coinciding (the seed's
schedule), a run killed at several moments and continued with ``--auto-resume`` ends with the same best file
and score, the same top-k files and the same ``--ckpt_path best`` as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from seglstm.cli.lightning import best_checkpoint
from seglstm.cli.main import main as seglstm
from seglstm.training.callbacks import read_index
from seglstm.utils.io import torch_load
from tests.reliability_helpers import SimulatedKill, interval_config, make_synth

pytestmark = pytest.mark.usefixtures("rel_tiny_seg")

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS, EVERY = 8, 2


def kill_config(tmp: Path, data: Path, name: str, step: int | None, moment: str, how: str) -> Path:
    callbacks = [] if step is None else [{"class_path": "tests.reliability_helpers.KillAt",
                                          "init_args": {"step": step, "moment": moment, "how": how}}]  # fmt: skip
    return interval_config(tmp / f"{name}.yaml", data, tmp / f"run_{name}", MAX_STEPS, EVERY, callbacks)


def outcome(run: Path) -> dict[str, Any]:
    ckpts = run / "checkpoints"
    index = read_index(ckpts)
    return {
        "weights": torch_load(ckpts / "last.ckpt")["state_dict"],
        "best": index["best"]["val/mIoU"],
        "best_file": best_checkpoint(ckpts).name,  # what --ckpt_path best resolves to
        "files": sorted(p.name for p in ckpts.glob("*.ckpt")),
        "best_scores": sorted(
            (name, rec["topk"]) for name, rec in index["checkpoints"].items() if rec.get("topk")
        ),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synth(tmp_path_factory.mktemp("resume") / "loveda")


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("reference")
    assert seglstm(["fit", "--config", str(kill_config(tmp, data, "ref", None, "", "")), "--allow-class-path", "tests"]) == 0
    found = outcome(tmp / "run_ref")
    # the best is not simply the newest validation, so keeping it across a resume is a real check
    assert found["best_file"] != f"best_mIoU_iter_{MAX_STEPS}.ckpt", found["best_scores"]
    return found


def assert_same(resumed: dict[str, Any], reference: dict[str, Any]) -> None:
    assert resumed["best"] == reference["best"]
    assert resumed["best_file"] == reference["best_file"]
    assert resumed["files"] == reference["files"]
    assert resumed["best_scores"] == reference["best_scores"]
    for key, value in reference["weights"].items():
        assert torch.equal(resumed["weights"][key], value), key


@pytest.mark.parametrize(("step", "moment"), [(2, "in validation"), (3, "after step")])
def test_best_survives_an_interruption_in_process(tmp_path, data, reference, step, moment, monkeypatch):
    cfg = kill_config(tmp_path, data, "k", step, moment, "raise")
    args = ["fit", "--config", str(cfg), "--allow-class-path", "tests"]
    with pytest.raises(SimulatedKill):
        seglstm(args)
    monkeypatch.setenv("SIGNAL_AT_ON", "0")
    assert seglstm([*args, "--auto-resume"]) == 0
    assert_same(outcome(tmp_path / "run_k"), reference)


@pytest.mark.slow
@pytest.mark.parametrize(("step", "moment"), [(2, "in validation"), (3, "after step"), (4, "after step"),
                                              (6, "in validation"), (7, "after step")])  # fmt: skip
def test_best_survives_sigkill(tmp_path, data, reference, step, moment):
    cfg = kill_config(tmp_path, data, "k", step, moment, "sigkill")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "tests.reliability_helpers", "fit", "--config", str(cfg), "--allow-class-path", "tests"]
    child = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    again = subprocess.run([*cmd, "--auto-resume"], cwd=ROOT, env={**env, "SIGNAL_AT_ON": "0"},
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same(outcome(tmp_path / "run_k"), reference)
