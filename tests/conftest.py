"""Fixtures every test module may use: seeded random sources, a fake clock, run folders, a tiny synthetic
LoveDA-like dataset, and the model registry restored after each test.

Independent references (float64 formulas, second implementations) live in ``tests/references/``; file-tree
builders for the data tests in ``tests/data_helpers.py``, the scene tests' rasters and rule models in
``tests/scene_helpers.py``, the reliability tests' tiny segmentor and configs in ``tests/reliability_helpers.py``.
Test modules import from those, never from each other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from seglstm.models import registry as model_registry


class FakeClock:
    """A time source that moves only when told to: code under test reads it where it would read
    ``time.perf_counter``, and the test advances it, so timing logic is checked exactly and without sleeping."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock does not go back, got {seconds}")
        self.now += seconds


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rng() -> np.random.Generator:
    """A NumPy generator with a fixed seed: fresh random inputs that are the same on every run."""
    return np.random.default_rng(0)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """An empty folder for one run's outputs (checkpoints, logs, tables)."""
    path = tmp_path / "run"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def tiny_loveda(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic LoveDA-like dataset in mmseg's layout: 4 train and 2 val tiles of 64x64, seed 0.

    Shared by the whole run (generated once): tests must only read it.
    """
    from seglstm.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("tiny_loveda") / "data", 4, 2, 0, size=64, seed=0, progress=False)


class RegistryScope:
    """Registers presets for one test only; everything registered through it, or by the test in any other
    way, is gone when the test ends."""

    def model(self, fn: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
        return model_registry.register_model(fn)

    def encoder(self, fn: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
        return model_registry.register_encoder(fn)


def _snapshot() -> tuple[dict, dict]:
    model_registry.list_models()  # load the built-in presets first, so they are part of the snapshot
    return dict(model_registry._MODELS), dict(model_registry._ENCODERS)


def _restore(saved: tuple[dict, dict]) -> None:
    for table, before in zip((model_registry._MODELS, model_registry._ENCODERS), saved):
        table.clear()
        table.update(before)


@pytest.fixture(autouse=True)
def _restore_registry() -> Iterator[None]:
    """Undo any preset a test registers in the production registry, so no test sees another's models."""
    saved = _snapshot()
    yield
    _restore(saved)


@pytest.fixture(scope="module")
def rel_tiny_seg() -> Iterator[None]:
    """The reliability tests' ``rel_tiny_seg`` preset, for one test module (its module-scoped runs need it
    before the first test starts); removed when the module ends."""
    from tests.reliability_helpers import register_rel_tiny_seg

    saved = _snapshot()
    register_rel_tiny_seg()
    yield
    _restore(saved)


@pytest.fixture
def registry() -> Iterator[RegistryScope]:
    """``registry.model(fn)`` registers ``fn`` as a model preset for this test only."""
    saved = _snapshot()
    yield RegistryScope()
    _restore(saved)


@pytest.fixture
def one_thread():
    """One torch thread: toy models run tiny kernels, where extra threads only spin (and halve the speed on a
    busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
