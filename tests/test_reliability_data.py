"""Data writers leave nothing that passes as complete: ``synth`` builds in a staging folder, a killed writer's
leftovers are refused by ``check-data`` and ``fit`` naming the command that completes them, and unreadable
entries (symlink loops included) are reported instead of skipped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seglstm.cli.main import main as seglstm
from seglstm.data.io import INCOMPLETE_MARKER, DataError, build_staged, check_complete, list_files
from tests.reliability_helpers import SimulatedKill, make_synth, write_config

pytestmark = pytest.mark.usefixtures("rel_tiny_seg")

SYNTH = ["--train", "3", "--val", "2", "--size", "32", "--quiet"]


def test_killed_build_leaves_only_a_marked_staging_folder_which_is_refused_and_replaced(tmp_path, capsys):
    out = tmp_path / "data"

    def half(folder: Path) -> None:
        (folder / "img_dir" / "train").mkdir(parents=True)
        (folder / "img_dir" / "train" / "a.png").write_bytes(b"x")
        raise SimulatedKill("killed while writing")

    with pytest.raises(SimulatedKill):
        build_staged(out, half, "seglstm synth --out data --train 3")
    assert not out.exists()
    with pytest.raises(DataError, match=r"data \(only its staging folder .*\.data\.staging exists\) is an incomplete "
                                        r"dataset: .*complete it with `seglstm synth --out data --train 3`"):  # fmt: skip
        check_complete(out)
    # the same synth command completes it, replacing the staging folder
    assert seglstm(["synth", "--out", str(out), *SYNTH]) == 0
    assert json.loads((out / "meta.json").read_text())["counts"] == {"train": 3, "val": 2}
    assert not (tmp_path / ".data.staging").exists()
    check_complete(out)


def test_marker_in_a_dataset_makes_check_data_and_fit_refuse_naming_the_command(tmp_path, capsys):
    data = make_synth(tmp_path / "loveda")
    (data / INCOMPLETE_MARKER).write_text("seglstm convert potsdam tiles --out loveda\n")
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run")
    assert seglstm(["check-data", str(cfg), "--quiet"]) == 1
    assert "is an incomplete dataset" in capsys.readouterr().err
    assert seglstm(["fit", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"data.root: {data} is an incomplete dataset: its writer stopped before the end; complete it with " \
           "`seglstm convert potsdam tiles --out loveda`" in err  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_overwrite_replaces_an_existing_dataset_through_staging(tmp_path):
    out = tmp_path / "d"
    assert seglstm(["synth", "--out", str(out), *SYNTH]) == 0
    assert seglstm(["synth", "--out", str(out), "--overwrite", "--train", "2", "--val", "1", "--size", "32", "--quiet"]) == 0
    assert sorted(p.name for p in (out / "img_dir" / "train").iterdir()) == ["train_00000.png", "train_00001.png"]
    assert sorted(p.name for p in out.iterdir()) == ["ann_dir", "img_dir", "meta.json"]
    assert not list(tmp_path.glob(".d.*"))


@pytest.mark.parametrize("kind", ["loop", "dangling", "folder"])
def test_unreadable_entries_are_reported_not_skipped(tmp_path, kind):
    (tmp_path / "ok.png").write_bytes(b"png")
    bad = tmp_path / "bad.png"
    if kind == "loop":
        bad.symlink_to(bad)
    elif kind == "dangling":
        bad.symlink_to(tmp_path / "gone.png")
    else:
        bad.mkdir()
    reason = {"loop": "Too many levels of symbolic links", "dangling": "No such file", "folder": "not a regular file"}[kind]
    with pytest.raises(DataError, match=rf"1 unreadable entry in {tmp_path}: {bad}: {reason}"):
        list_files(tmp_path, [".png"])
    bad.unlink() if kind != "folder" else bad.rmdir()
    assert list_files(tmp_path, [".png"]) == [tmp_path / "ok.png"]


@pytest.mark.slow
def test_synth_killed_by_sigkill_leaves_no_dataset(tmp_path):
    out = tmp_path / "big"
    cmd = [sys.executable, "-m", "seglstm.cli.main", "synth", "--out", str(out), "--train", "400", "--size", "128", "--quiet"]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    staged = tmp_path / ".big.staging" / "big" / "img_dir" / "train"
    deadline = time.monotonic() + 120
    while not (staged.is_dir() and len(list(staged.iterdir())) > 5):
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    assert not out.exists()
    with pytest.raises(DataError, match=r"complete it with `seglstm synth --out .*big --train 400"):
        check_complete(out)


def test_killed_synth_scenes_is_refused_by_check_data_and_fit_naming_the_command(tmp_path, capsys, monkeypatch):
    """``synth --scenes`` builds in a staging folder too; a config naming the missing scenes.yaml is refused
    with the command that completes it, and rerunning that command gives a complete folder."""
    import seglstm.data.synthetic_scenes as synthetic_scenes

    real = synthetic_scenes.write_synthetic_scenes

    def half(folder, *args, **kwargs):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "scene1.tif").write_bytes(b"half")
        raise SimulatedKill("killed while writing")

    out = tmp_path / "scenes"
    argv = ["synth", "--scenes", str(out), "--n-scenes", "1", "--size", "128", "--quiet"]
    monkeypatch.setattr(synthetic_scenes, "write_synthetic_scenes", half)
    with pytest.raises(SimulatedKill):
        seglstm(argv)
    assert not out.exists()
    config = tmp_path / "scenes_config.yaml"
    config.write_text(f"data:\n  dataset: scenes\n  scenes: {out / 'scenes.yaml'}\n  test_scale: null\n")
    assert seglstm(["check-data", str(config), "--quiet"]) == 1
    assert f"complete it with `seglstm {' '.join(argv)}`" in capsys.readouterr().err
    assert seglstm(["fit", "--config", str(config)]) != 0
    err = capsys.readouterr().err
    assert "data.scenes:" in err and "incomplete dataset" in err and " ".join(argv) in err
    monkeypatch.setattr(synthetic_scenes, "write_synthetic_scenes", real)
    assert seglstm(argv) == 0
    assert (out / "scenes.yaml").is_file() and not list(tmp_path.glob(".scenes.*"))
