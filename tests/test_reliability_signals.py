"""SIGINT / SIGTERM wherever they land in ``fit`` (before the first step, inside a step, between steps, in
validation, during a checkpoint write): exit 130 / 143, ``last.ckpt`` written at the point reached, and
``--auto-resume`` ends with the weights, the best file and the top-k files of an uninterrupted run.

``SEGLSTM_WRITE_RELIABILITY_DOC=1`` rewrites the fault matrix in ``docs/reliability.md`` from this run."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from seglstm.cli.main import main as seglstm
from seglstm.training.callbacks import read_index
from seglstm.utils.io import torch_load
from tests.reliability_helpers import MOMENTS, make_synth, write_config

pytestmark = pytest.mark.usefixtures("rel_tiny_seg")

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
MATRIX_START, MATRIX_END = "<!-- fault matrix: start -->", "<!-- fault matrix: end -->"
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}
# the step whose moment gets the signal, and the step last.ckpt must hold
WHERE = {"before the first step": (0, 0), "inside a step": (3, 3), "between steps": (3, 3),
         "in validation": (4, 4), "during a checkpoint write": (4, 4)}  # fmt: skip
MAX_STEPS = 6
RESULTS: dict[tuple[str, str], str] = {}


def signal_config(tmp: Path, data: Path, name: str, moment: str | None, signum: int = 15) -> Path:
    """Validation and checkpoints every 2 steps (coinciding, as in the seed's schedule), best by mIoU."""
    run = tmp / f"run_{name}"
    cfg = write_config(tmp / f"{name}.yaml", data, run, max_steps=MAX_STEPS)
    doc = yaml.safe_load(cfg.read_text())
    trainer = doc["trainer"]
    trainer.update(limit_val_batches=1.0, val_check_interval=2, check_val_every_n_epoch=None)
    trainer["callbacks"] = [
        {"class_path": "seglstm.training.callbacks.RunCheckpoint",
         "init_args": {"filename": "iter_{step}", "every_n_train_steps": 2, "save_last": True, "save_top_k": 1}},
        {"class_path": "seglstm.training.callbacks.RunCheckpoint",
         "init_args": {"filename": "best_mIoU_iter_{step}", "monitor": "val/mIoU", "mode": "max", "save_top_k": 1}},
    ]  # fmt: skip
    if moment == "during a checkpoint write":
        trainer["plugins"] = [{"class_path": "tests.reliability_helpers.SignalingIO",
                               "init_args": {"step": WHERE[moment][0], "signum": int(signum)}}]  # fmt: skip
    elif moment is not None:
        trainer["callbacks"].append({"class_path": "tests.reliability_helpers.SignalWhen",
                                     "init_args": {"moment": moment, "step": WHERE[moment][0], "signum": int(signum)}})  # fmt: skip
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    return cfg


def fit(cfg: Path, *extra: str) -> int:
    return seglstm(["fit", "--config", str(cfg), "--allow-class-path", "tests", *extra])


def outcome(run: Path) -> dict[str, Any]:
    """What a finished run leaves: final weights, the best file and score, the checkpoint files."""
    ckpts = run / "checkpoints"
    return {
        "weights": torch_load(ckpts / "last.ckpt")["state_dict"],
        "best": read_index(ckpts)["best"]["val/mIoU"],
        "files": sorted(p.name for p in ckpts.glob("*.ckpt")),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synth(tmp_path_factory.mktemp("signals") / "loveda")


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("reference")
    cfg = signal_config(tmp, data, "ref", None)
    assert fit(cfg) == 0
    return outcome(tmp / "run_ref")


def check_signal(tmp: Path, data: Path, reference: dict[str, Any], sig: str, moment: str,
                 monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> str:  # fmt: skip
    """One cell of the matrix; returns its text."""
    signum = SIGNALS[sig]
    name = re.sub(r"\W+", "_", f"{sig}_{moment}")
    cfg = signal_config(tmp, data, name, moment, signum)
    monkeypatch.setenv("SIGNAL_AT_ON", "1")
    rc = fit(cfg)
    err = capsys.readouterr().err
    assert rc == 128 + signum, err[-3000:]
    step = WHERE[moment][1]
    assert f"interrupted by {sig} at iteration {step}: wrote" in err, err[-3000:]
    run = tmp / f"run_{name}"
    last = torch_load(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == step
    assert not list(run.rglob("*.part"))
    monkeypatch.setenv("SIGNAL_AT_ON", "0")
    assert fit(cfg, "--auto-resume") == 0, capsys.readouterr().err[-3000:]
    resumed = outcome(run)
    for key, value in reference["weights"].items():
        assert torch.equal(resumed["weights"][key], value), key
    assert resumed["best"] == reference["best"]
    assert resumed["files"] == reference["files"]
    text = f"exit {rc}, last.ckpt at step {step}, resume = uninterrupted"
    RESULTS[(sig, moment)] = text
    return text


def test_sigterm_in_validation_exits_143_with_last_and_resumes(tmp_path, data, reference, monkeypatch, capsys):
    check_signal(tmp_path, data, reference, "SIGTERM", "in validation", monkeypatch, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("moment", MOMENTS)
@pytest.mark.parametrize("sig", SIGNALS)
def test_signal_matrix(tmp_path, data, reference, sig, moment, monkeypatch, capsys):
    check_signal(tmp_path, data, reference, sig, moment, monkeypatch, capsys)


def render_matrix(results: dict[tuple[str, str], str]) -> str:
    lines = [MATRIX_START, "", "## Fault matrix: signal x moment in `fit`", "",
             "Generated by `SEGLSTM_WRITE_RELIABILITY_DOC=1 pytest -m slow tests/test_reliability_signals.py`. Each "
             "cell: the exit status, the step `last.ckpt` holds, and whether `--auto-resume` then ends with the "
             "weights, best file and top-k files of an uninterrupted run (validation and checkpoints every 2 "
             f"steps, {MAX_STEPS} steps).", "",
             "| moment | " + " | ".join(SIGNALS) + " |", "|---|" + "---|" * len(SIGNALS)]  # fmt: skip
    for moment in MOMENTS:
        lines.append(f"| {moment} (step {WHERE[moment][0]}) | " + " | ".join(results[(s, moment)] for s in SIGNALS) + " |")
    return "\n".join([*lines, "", MATRIX_END])


@pytest.mark.slow
def test_matrix_document_is_current() -> None:
    """Runs after the matrix: with SEGLSTM_WRITE_RELIABILITY_DOC=1 writes it into docs/reliability.md."""
    text = DOC.read_text(encoding="utf-8")
    if os.environ.get("SEGLSTM_WRITE_RELIABILITY_DOC") == "1":
        missing = [(s, m) for s in SIGNALS for m in MOMENTS if (s, m) not in RESULTS]
        assert not missing, f"cells {missing} did not run: run the whole module"
        head = text.split(MATRIX_START)[0].rstrip("\n")
        tail = text.split(MATRIX_END)[1] if MATRIX_END in text else "\n"
        DOC.write_text(head + "\n\n" + render_matrix(RESULTS) + tail, encoding="utf-8")
        return
    assert MATRIX_START in text, "docs/reliability.md has no fault matrix: regenerate it"
    rows = [ln for ln in text.split(MATRIX_START)[1].splitlines() if ln.startswith("| ") and "step" in ln]
    assert [r.split("|")[1].strip() for r in rows] == [f"{m} (step {WHERE[m][0]})" for m in MOMENTS]
    assert json.dumps(sorted(SIGNALS)) == json.dumps(sorted(s for s in SIGNALS if s in text))
