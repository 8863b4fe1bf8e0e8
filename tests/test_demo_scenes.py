"""End to end on synthetic scenes: ``seglstm demo --scenes --quick`` (synth, fit, evaluate on the val area,
predict-scene on the held-out scene, report), with the held-out score recomputed from GDAL's rasterisation."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import torch
from rasterio.features import rasterize
from rasterio.warp import transform_geom

from seglstm.metrics import SegmentationMetrics

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_scenes_quick_end_to_end(tmp_path, monkeypatch):
    from seglstm.cli.main import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--scenes", "--quick", "--config", str(REPO / "configs" / "demo_scenes.yaml")]) == 0
    report = (tmp_path / "runs/demo-scenes-quick/report/report.md").read_text()
    held = float(re.search(r"held-out scene mapped with predict-scene: \*\*mIoU ([\d.]+)", report).group(1))

    data = tmp_path / "data/synthetic-scenes-quick"
    with rasterio.open(tmp_path / "runs/demo-scenes-quick/report/heldout.tif") as src:
        pred, crs, transform = src.read(1), src.crs, src.transform
    meta, _, wkb, fields = pyogrio.raw.read(data / "heldout.gpkg", columns=["class"])
    classes = ["background", "building", "road", "water", "barren", "forest", "agricultural"]
    shapes = [(transform_geom(meta["crs"], crs, shapely.geometry.mapping(g)), classes.index(c))
              for g, c in zip(shapely.from_wkb(wkb), fields[0])]
    ref = rasterize(shapes, out_shape=pred.shape, transform=transform, fill=255, dtype=np.uint8)
    assert (ref != 255).mean() > 0.9 and (pred != 255).all()
    metric = SegmentationMetrics(len(classes))
    metric.update(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(ref.astype(np.int64)))
    assert held == pytest.approx(100 * float(metric.compute()["mIoU"]), abs=0.006)  # the report rounds to 2 decimals


@pytest.mark.slow
def test_window_sampler_benchmark_runs(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "ws.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "window_sampler.py"), "--side", "1024", "--polygons",
                    "600", "--items", "4", "--repeat", "1", "--out", str(out)], check=True, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["read", "train pipeline"]
    assert all(r["windows_per_s"] > 0 and r["chips_per_s"] > 0 and r["workers_for_gpu"] >= 1 for r in rows)
