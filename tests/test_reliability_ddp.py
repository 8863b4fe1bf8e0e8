"""DDP on CPU (gloo) under the launchers a cluster uses: a rank that dies makes the survivor fail after
``trainer.ddp_timeout`` instead of hanging, under torchrun's elastic restart the job resumes from ``last.ckpt``
and finishes, and two tasks started the way ``srun`` starts them form one job."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from seglstm.utils.io import torch_load
from tests.reliability_helpers import make_synth, write_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _ddp_config(tmp_path: Path, timeout_s: float, die: bool = True) -> Path:
    cfg = write_config(tmp_path / "c.yaml", make_synth(tmp_path / "loveda"), tmp_path / "run", max_steps=4)
    doc = yaml.safe_load(cfg.read_text())
    doc["trainer"].update(devices=2, strategy="ddp", ddp_timeout=timeout_s)
    if die:
        doc["trainer"]["callbacks"].append({"class_path": "tests.reliability_helpers.DieOnce"})
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    return cfg


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "LOCAL_RANK", "RANK", "WORLD_SIZE"))}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env["MASTER_PORT"] = str(29500 + os.getpid() % 1000)
    return env


def _fit_args(cfg: Path) -> list[str]:
    """``seglstm fit`` with the helpers' registered model, as each launcher starts it (after ``python``)."""
    return ["-m", "tests.reliability_helpers", "fit", "--config", str(cfg),
            "--allow-class-path", "tests.reliability_helpers"]  # fmt: skip


def test_a_dead_rank_makes_the_other_fail_instead_of_hanging(tmp_path):
    """A rank that exits closes its gloo connection, and the survivor fails with an error."""
    cfg = _ddp_config(tmp_path, timeout_s=20)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, *_fit_args(cfg)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert elapsed < 240, f"rank 0 hung for {elapsed:.0f} s"
    # gloo words it either way, depending on whether the peer's socket closed or reset first
    assert re.search(r"Connection (closed|reset) by peer", proc.stderr), proc.stderr[-3000:]
    assert torch_load(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] in (1, 2)


@pytest.mark.parametrize("rendezvous", ["static", "c10d", "c10d_store_per_round"])
def test_torchrun_elastic_restart_resumes_from_last_checkpoint(tmp_path, rendezvous):
    """static and c10d keep one store across restarts, so this also checks that the restarted ranks do not
    read the previous attempt's gloo addresses (which failed about one run in two before); the third case is
    the README's multi-node setting, where torch builds a new store for every rendezvous round."""
    cfg = _ddp_config(tmp_path, timeout_s=60)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = _env()
    port = str(int(env["MASTER_PORT"]) + (rendezvous != "static"))
    launch = ["--master-port", port]
    if rendezvous != "static":
        launch = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]
    if rendezvous == "c10d_store_per_round":
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    proc = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--max-restarts", "1", *launch, *_fit_args(cfg)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "auto-resume from" in proc.stderr, proc.stderr[-4000:]
    assert "Restoring states from the checkpoint path at" in proc.stderr
    assert torch_load(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_two_tasks_started_like_srun_form_one_slurm_job(tmp_path):
    """What ``srun --ntasks-per-node=2 seglstm fit ...`` gives each task: Lightning's SLURM environment
    takes rank and world size from it, and nothing is spawned on top."""
    cfg = _ddp_config(tmp_path, timeout_s=60, die=False)
    base = _env()
    env = {k: v for k, v in base.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    job_id = str(int(base["MASTER_PORT"]) - 29500 + 7000)  # Lightning's port: 15000 + last 4 digits
    env.update(SLURM_JOB_ID=job_id, SLURM_JOB_NAME="seglstm", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2",
               SLURM_NNODES="1", SLURM_NODEID="0", SLURM_NODELIST="localhost")  # fmt: skip
    # logs go to files: a full pipe would stall one rank inside a collective while the other is read
    log_files = [tmp_path / f"task{r}.log" for r in (0, 1)]
    procs = []
    for r, log_file in enumerate(log_files):
        with log_file.open("w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, *_fit_args(cfg)], cwd=ROOT,
                env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)}, stdout=log, stderr=log,
            ))  # fmt: skip
    for proc in procs:
        proc.wait(timeout=300)
    logs = [f.read_text() for f in log_files]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    for rank in (0, 1):
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in logs[rank]
    assert "Starting with 2 processes" in logs[0]
    assert torch_load(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 4
