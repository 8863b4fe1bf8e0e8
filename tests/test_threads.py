"""seglstm.utils.threads and the console entry's thread options: physical cores from the CPU topology, the
OpenMP wait policy on an oversubscribed CPU, and both applied before torch is imported."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from seglstm.utils import threads as th

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def _fake_topology(root: Path, cores: dict[int, tuple[int, int]]) -> None:
    for cpu, (package, core) in cores.items():
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")


def test_physical_cores_count_hyperthreads_once(tmp_path, monkeypatch):
    # 2 packages x 2 cores x 2 hyper-threads; the process may run on CPUs 0-5 only.
    _fake_topology(tmp_path, {c: (c // 4, (c % 4) // 2) for c in range(8)})
    monkeypatch.setattr(th, "_SYS_CPU", tmp_path)
    monkeypatch.setattr(th, "_available_cpus", lambda: {0, 1, 2, 3, 4, 5})
    assert th.physical_cores_available() == 3  # (0,0), (0,1), (1,0)
    monkeypatch.setattr(th, "_available_cpus", lambda: {6, 9})  # cpu9 has no topology: counted as itself
    assert th.physical_cores_available() == 2


@pytest.mark.parametrize(("load", "over"), [(1.0, False), (2.0, False), (2.5, True), (9.0, True)])
def test_cpu_oversubscribed(monkeypatch, load, over):
    monkeypatch.setattr(th, "_available_cpus", lambda: {0, 1})
    monkeypatch.setattr(th.os, "getloadavg", lambda: (load, 0.0, 0.0))
    assert th.cpu_oversubscribed() is over


@pytest.mark.parametrize(
    ("policy", "over", "before", "after"),
    [
        ("auto", True, None, "PASSIVE"),
        ("auto", False, None, None),  # idle machine: the OpenMP default (spinning) is fastest
        ("auto", True, "ACTIVE", "ACTIVE"),  # the user's environment wins under auto
        ("passive", False, "ACTIVE", "PASSIVE"),
        ("active", True, None, "ACTIVE"),
        ("inherit", True, None, None),
    ],
)
def test_apply_omp_wait_policy(clean_env, monkeypatch, policy, over, before, after):
    monkeypatch.setattr(th, "cpu_oversubscribed", lambda: over)
    if before:
        monkeypatch.setenv("OMP_WAIT_POLICY", before)
    assert th.apply_omp_wait_policy(policy) == (after or "default")
    assert os.environ.get("OMP_WAIT_POLICY") == after
    with pytest.raises(ValueError, match="--omp-wait-policy 'spin'"):
        th.apply_omp_wait_policy("spin")


def test_choose_inference_threads(clean_env, monkeypatch):
    monkeypatch.setattr(th, "physical_cores_available", lambda: 6)
    assert th.choose_inference_threads() == 6 and os.environ["OMP_NUM_THREADS"] == "6"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert th.choose_inference_threads() == 3  # the environment is kept
    assert th.choose_inference_threads(2) == 2 and os.environ["OMP_NUM_THREADS"] == "2"  # --threads wins
    with pytest.raises(ValueError, match="--threads must be at least 1"):
        th.choose_inference_threads(0)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**base, "PYTHONPATH": SRC, **env})  # fmt: skip


def test_console_entry_applies_thread_options_before_torch():
    """The options leave the command's arguments, reach the environment before torch loads, and torch's
    pool takes the thread count."""
    code = (
        "import os, sys\n"
        "from seglstm.cli import main as m\n"
        "rest = m._apply_thread_options('predict', ['--config', 'c.yaml', '--threads', '1',"
        " '--omp-wait-policy=passive', '--data.root', 'x'])\n"
        "print(rest, os.environ['OMP_NUM_THREADS'], os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)\n"
        "import torch\n"
        "print(torch.get_num_threads())\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.strip().splitlines()
    assert first == "['--config', 'c.yaml', '--data.root', 'x'] 1 PASSIVE False"
    assert second == "1"


def test_predict_scene_help_states_the_thread_options():
    proc = _python("import sys; from seglstm.cli.main import main; sys.exit(main(['predict-scene', '--help']))")
    assert proc.returncode == 0, proc.stderr
    assert "--threads N" in proc.stdout and "--omp-wait-policy {auto,passive,active,inherit}" in proc.stdout
    assert "usage: seglstm predict-scene" in proc.stdout  # the command's own help follows


def test_bad_thread_option_is_a_clear_error():
    proc = _python("import sys; from seglstm.cli.main import main; sys.exit(main(['predict', '--threads', '0']))")
    assert proc.returncode == 2
    assert "seglstm predict: error: --threads must be at least 1, got 0" in proc.stderr
