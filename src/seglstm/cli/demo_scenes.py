"""``seglstm demo --scenes``: train on your own map, in miniature, on the CPU, with a report.

1. ``seglstm synth --scenes``: synthetic GeoTIFF scenes (UTM) with GeoPackage polygon labels (EPSG:4326)
   and a held-out scene (kept and reused when already there);
2. ``seglstm fit`` with ``configs/demo_scenes.yaml``: random windows of the training area;
3. ``seglstm test`` on the val split: the val blocks, spatially separate from every training window;
4. ``seglstm predict-scene`` maps the held-out scene, which is then scored against its labels;
5. ``report.md`` with the numbers, the map preview and the times.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from seglstm.cli.demo import PROG, DemoError, _run, demo_run, timed

CONFIG = Path(__file__).resolve().parents[3] / "configs" / "demo_scenes.yaml"
FULL = {"data": "data/synthetic-scenes", "n_scenes": 3, "size": 512, "overrides": []}
QUICK = {
    "data": "data/synthetic-scenes-quick",
    "n_scenes": 1,
    "size": 512,
    "overrides": ["--trainer.max_steps", "12", "--trainer.val_check_interval", "12", "--model.warmup_iters", "2",
                  "--data.batch_size", "4"],
}


def score_held_out(scenes_yaml: Path, class_map: Path, crop: tuple[int, int], scene_name: str) -> dict[str, Any]:
    """mmseg's metrics of predict-scene's class raster over the labelled pixels of the held-out scene (the
    test split's windows of that scene, read back from the raster)."""
    import rasterio
    import torch
    from rasterio.windows import Window

    from seglstm.data.scenes import SceneDataset
    from seglstm.metrics import SegmentationMetrics

    data = SceneDataset(None, "test", scenes_yaml, crop_size=crop)
    scene = [s.name for s in data.spec.scenes].index(scene_name)
    metric = SegmentationMetrics(data.num_classes)
    with rasterio.open(class_map) as src:
        for index in range(len(data)):
            if data.items[index][0] != scene:
                continue
            sample = data.load_item(0, index)
            _, x0, y0, w, h = sample["window"]
            pred = src.read(1, window=Window(x0, y0, w, h)).astype(np.int64)
            mask = sample["mask"]
            keep = torch.from_numpy(pred != 255) | (mask == 255)  # nodata in the map only where unlabelled
            if not bool(keep.all()):
                raise DemoError(f"{class_map}: nodata where the held-out scene has labels at {x0},{y0}")
            metric.update(torch.from_numpy(np.where(pred == 255, 0, pred)), mask)
    results = metric.compute()
    return {"mIoU": float(results["mIoU"]), "mAcc": float(results["mAcc"]), "aAcc": float(results["aAcc"]),
            "IoU": dict(zip(data.classes, [float(v) for v in results["IoU"]]))}


def _report(folder: Path, val: dict, held: dict, times: dict[str, float], spec: dict, config: Path) -> Path:
    from seglstm.utils.io import atomic_write_text

    table = (folder / "val" / "metrics.md").read_text(encoding="utf-8").split("\n", 2)[-1].strip()
    lines = [
        "# seglstm demo --scenes report",
        "",
        f"Synthetic GeoTIFF scenes with GeoPackage polygon labels in EPSG:4326 (`{spec['data']}`: "
        f"{spec['n_scenes']} scene(s) of {spec['size']} px and a held-out one), a small Seg-LSTM fitted on random "
        f"windows with `{config}`.",
        "",
        f"- val area (blocks held out of the training scenes, 64 px buffer): **mIoU {100 * val['mIoU']:.2f}**, "
        f"mAcc {100 * val['mAcc']:.2f}, aAcc {100 * val['aAcc']:.2f}",
        f"- held-out scene mapped with predict-scene: **mIoU {100 * held['mIoU']:.2f}**, mAcc {100 * held['mAcc']:.2f}, "
        f"aAcc {100 * held['aAcc']:.2f}",
        "",
        "## Time",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {stage} | {sec:.1f} |" for stage, sec in times.items()],
        f"| total | {sum(times.values()):.1f} |",
        "",
        "## Metrics on the val area",
        "",
        table,
        "",
        "## Held-out scene: IoU per class",
        "",
        "| class | IoU |",
        "|---|---|",
        *[f"| {name} | {100 * v:.2f} |" for name, v in held["IoU"].items()],
        "",
        "## Map of the held-out scene",
        "",
        "![map](heldout.png)",
        "",
    ]
    path = folder / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def main(args: argparse.Namespace) -> int:
    """Run the scenes demo with ``demo``'s parsed arguments (``--quick``, ``--out``, ``--data``, ``--config``)."""
    import sys

    from seglstm.data.io import write_dataset
    from seglstm.data.synthetic_scenes import HELD_OUT, write_synthetic_scenes

    run = demo_run(args, FULL, QUICK, "runs/demo-scenes", CONFIG)
    if run is None:
        return 2
    spec, out, config = run
    times: dict[str, float] = {}
    try:
        with timed(times, "scenes"):
            scenes_yaml = Path(spec["data"]) / "scenes.yaml"
            if not scenes_yaml.is_file():
                print(f"[{PROG}] scenes: {spec['n_scenes']} synthetic scene(s) + 1 held out at {spec['data']}")
                # built beside its folder and moved in when complete (a killed demo leaves no half-written scenes)
                write_dataset(
                    spec["data"],
                    lambda folder: write_synthetic_scenes(folder, spec["n_scenes"], size=spec["size"], overwrite=True),
                    f"seglstm demo --scenes --data {spec['data']}",
                    replace=True,
                )
            else:
                print(f"[{PROG}] scenes: reusing {scenes_yaml}")

        common = ["--config", str(config), "--data.scenes", str(scenes_yaml), "--trainer.default_root_dir", str(out)]
        with timed(times, "train"):
            _run("train", ["fit", *common, "--auto-resume", *spec["overrides"]])

        report = out / "report"
        with timed(times, "validate"):
            _run("validate", ["test", *common, "--ckpt_path", "last", "--data.test_split", "val", "--out",
                              str(report / "val")])

        class_map = report / "heldout.tif"
        with timed(times, "map"):
            image = scenes_yaml.parent / f"{HELD_OUT}.tif"
            _run("map", ["predict-scene", str(image), str(class_map), "--ckpt",
                         str(out / "checkpoints" / "last.ckpt"), "--preview", str(report / "heldout.png"),
                         "--precision", "fp32", "--quiet"])  # fmt: skip

        with timed(times, "score"):
            from seglstm.config import compose_config

            crop = tuple(compose_config(config)["data"]["crop_size"])
            held = score_held_out(scenes_yaml, class_map, crop, HELD_OUT)
            val = json.loads((report / "val" / "metrics.json").read_text(encoding="utf-8"))
        path = _report(report, val, held, times, spec, config)
    except (DemoError, ValueError, OSError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    print(
        f"\n[{PROG}] done in {sum(times.values()) / 60:.1f} min: val-area mIoU {100 * val['mIoU']:.2f}, "
        f"held-out scene mIoU {100 * held['mIoU']:.2f}\n[{PROG}] report: {path}"
    )
    return 0
