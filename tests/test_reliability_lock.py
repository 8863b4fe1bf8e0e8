"""One writer per run folder: an OS lock held for the whole ``fit`` (released however the process ends),
naming its holder to a second ``fit`` / ``--auto-resume``; partial files of a killed writer are removed."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from seglstm.cli.main import main as seglstm
from seglstm.training.faults import LOCK_NAME, RunLock, RunLockedError, is_rank_zero_process
from seglstm.utils.io import torch_load
from tests.reliability_helpers import make_synth, tree_digest, write_config

pytestmark = pytest.mark.usefixtures("rel_tiny_seg")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synth(tmp_path_factory.mktemp("lock") / "loveda")


def test_second_holder_is_refused_naming_pid_and_host(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(RunLockedError, match=rf"in use by PID {os.getpid()} on host {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
    finally:
        first.release()
    again = RunLock(tmp_path)
    again.acquire()  # released: free again
    again.release()


def test_lock_file_of_a_dead_process_is_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text("PID 4194301 on host elsewhere\n")  # a file, but nobody holds the lock
    lock = RunLock(tmp_path)
    lock.acquire()
    assert (tmp_path / LOCK_NAME).read_text() == f"PID {os.getpid()} on host {socket.gethostname()}\n"
    lock.release()


def test_lock_of_a_sigkilled_holder_is_released_by_the_kernel(tmp_path):
    code = ("import os, signal, sys; from seglstm.training.faults import RunLock; RunLock(sys.argv[1]).acquire(); "
            "open(sys.argv[2], 'w').close(); os.kill(os.getpid(), signal.SIGKILL)")  # fmt: skip
    child = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(tmp_path / "held")], timeout=120)
    assert child.returncode == -signal.SIGKILL and (tmp_path / "held").exists()
    assert "PID" in (tmp_path / LOCK_NAME).read_text()  # the dead holder's note is still there
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()


def test_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    RunLock(tmp_path).acquire()
    assert "does not support file locks (No locks available): make sure no other run" in capsys.readouterr().err


@pytest.mark.parametrize(("env", "zero"), [({}, True), ({"RANK": "1"}, False), ({"RANK": "0", "LOCAL_RANK": "0"}, True),
                                           ({"SLURM_PROCID": "2"}, False), ({"LOCAL_RANK": "1"}, False),
                                           ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False)])  # fmt: skip
def test_only_rank_zero_takes_the_lock(monkeypatch, env, zero):
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert is_rank_zero_process() is zero


@pytest.mark.parametrize("resume", [False, True], ids=["fit", "auto_resume"])
def test_fit_into_a_locked_run_folder_is_refused_and_changes_nothing(tmp_path, data, capsys, resume):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", data, run, max_steps=2)
    if resume:
        assert seglstm(["fit", "--config", str(cfg)]) == 0
    holder = RunLock(run)  # stands for a live run in another process (a flock is per open file)
    holder.acquire()
    before = {k: v for k, v in tree_digest(run).items() if k != LOCK_NAME}
    try:
        capsys.readouterr()
        assert seglstm(["fit", "--config", str(cfg), *(["--auto-resume"] if resume else [])]) == 1
    finally:
        holder.release()
    err = capsys.readouterr().err
    assert f"run folder {run} is in use by PID {os.getpid()} on host {socket.gethostname()}" in err
    assert {k: v for k, v in tree_digest(run).items() if k != LOCK_NAME} == before


def test_partial_files_of_a_killed_writer_are_removed_by_the_next_run(tmp_path, data, capsys):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", data, run, max_steps=2)
    assert seglstm(["fit", "--config", str(cfg)]) == 0
    leftover = run / "checkpoints" / ".last.ckpt.x1y2z3.ckpt.part"
    leftover.write_bytes(b"half a checkpoint")
    capsys.readouterr()
    assert seglstm(["fit", "--config", str(cfg), "--auto-resume", "--trainer.max_steps", "3"]) == 0
    assert not leftover.exists()
    assert "removed 1 partial file(s) a killed run left" in capsys.readouterr().err
    assert torch_load(run / "checkpoints" / "last.ckpt")["global_step"] == 3


@pytest.mark.slow
def test_two_auto_resume_processes_one_trains_the_other_is_refused(tmp_path, data):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", data, run, max_steps=3)
    doc = yaml.safe_load(cfg.read_text())
    doc["trainer"]["callbacks"].append({"class_path": "tests.reliability_helpers.WaitAt", "init_args": {"step": 1}})
    cfg.write_text(yaml.safe_dump(doc))
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "WAIT_AT_FILE": str(go)}
    cmd = [sys.executable, "-m", "tests.reliability_helpers", "fit", "--config", str(cfg), "--auto-resume",
           "--allow-class-path", "tests"]  # fmt: skip
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        lock = run / LOCK_NAME
        while not (lock.exists() and f"PID {first.pid} " in lock.read_text()):  # the first run holds the folder
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        go.touch()
        assert first.wait(300) == 0, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
        first.stderr.close()
    assert second.returncode == 1
    assert f"is in use by PID {first.pid} on host {socket.gethostname()}" in second.stderr
    names = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert not any("-v" in n for n in names), names
