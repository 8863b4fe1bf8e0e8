"""SIGKILL during a checkpoint write: the previous checkpoint still loads, and the run resumes from it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from seglstm.cli.main import main as seglstm
from seglstm.utils.io import torch_load
from tests.reliability_helpers import make_synth, write_config

pytestmark = pytest.mark.usefixtures("rel_tiny_seg")

ROOT = Path(__file__).resolve().parents[1]

# The child trains with a checkpoint every step; its 4th torch.save (last.ckpt at step 2) writes half the
# bytes, tells the parent, and hangs there until the parent kills it.
CHILD = textwrap.dedent(
    """
    import io, sys, time
    from pathlib import Path
    import torch
    from tests.reliability_helpers import register_rel_tiny_seg
    from seglstm.cli.main import main
    register_rel_tiny_seg()

    cfg, marker = sys.argv[1], Path(sys.argv[2])
    real_save, calls = torch.save, [0]

    def slow_save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] != 4:
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf)
        fh = f if hasattr(f, "write") else open(f, "wb")  # the checkpoint IO hands over an open file
        fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        fh.flush()
        marker.write_text(str(getattr(fh, "name", f)))
        time.sleep(600)

    torch.save = slow_save
    sys.exit(main(["fit", "--config", cfg]))
    """
)


@pytest.mark.parametrize("resume", ["ckpt_path_last", pytest.param("auto_resume", marks=pytest.mark.slow)])
def test_sigkill_mid_checkpoint_write_keeps_the_previous_one_and_resumes(tmp_path, monkeypatch, resume):
    data = make_synth(tmp_path / "loveda")
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", data, run, max_steps=4)
    marker = tmp_path / "writing"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(cfg), str(marker)], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the child never reached the slow checkpoint write"
            time.sleep(0.2)
        half_written = Path(marker.read_text())
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    ckpts = run / "checkpoints"
    # the half-written bytes went to a temporary name, never to last.ckpt
    assert half_written.parent == ckpts and half_written.name.startswith(".last.ckpt.")
    assert half_written.name.endswith(".part")
    last = torch_load(ckpts / "last.ckpt")
    assert last["global_step"] == 1
    assert torch_load(ckpts / "iter_2.ckpt")["global_step"] == 2

    if resume == "ckpt_path_last":
        assert seglstm(["fit", "--config", str(cfg), "--ckpt_path", "last"]) == 0
    else:  # what a torchrun elastic restart does: same command, restart count > 0
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
        assert seglstm(["fit", "--config", str(cfg)]) == 0
    resumed = torch_load(ckpts / "last.ckpt")
    assert resumed["global_step"] == 4
    # an uninterrupted run of the same config ends with the same weights
    ref_cfg = write_config(tmp_path / "ref.yaml", data, tmp_path / "ref", max_steps=4)
    assert seglstm(["fit", "--config", str(ref_cfg)]) == 0
    reference = torch_load(tmp_path / "ref" / "checkpoints" / "last.ckpt")["state_dict"]
    assert reference.keys() == resumed["state_dict"].keys()
    for key, value in reference.items():
        assert torch.equal(resumed["state_dict"][key], value), key
