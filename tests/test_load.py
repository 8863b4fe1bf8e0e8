"""A reduced ``benchmarks/load.py``: ``predict`` over 200 small images and ``predict-scene`` on a 2048x2048
GeoTIFF, each twice in fresh processes: outputs byte-identical, memory at the end of a run no higher than
near its start."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "load.py"


def _bench():
    spec = importlib.util.spec_from_file_location("seglstm_load_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_predict_and_predict_scene_under_load_are_flat_and_deterministic(tmp_path):
    results = _bench().run_load(tmp_path, images=200, size=64, side=2048, tile=512, workers=1)
    for name in ("predict", "predict_scene"):
        runs = results[name]["runs"]
        assert results[name]["identical"], f"{name}: the two runs wrote different bytes"
        for run in runs:
            # flat: the last quarter of the run peaks within 15% (or 128 MiB) of the first quarter's peak
            allowed = max(0.15 * run["rss_start_mib"], 128.0)
            assert run["rss_end_mib"] - run["rss_start_mib"] < allowed, (name, run)
    masks = sorted((tmp_path / "predict_1" / "masks").iterdir())
    assert len(masks) == 200
    with Image.open(masks[0]) as first:
        assert first.size == (64, 64) and first.mode == "L"
        assert max(first.getdata()) < 7
    assert (tmp_path / "predict_scene_1" / "classes.tif").stat().st_size > 0
