"""Training windows per second per worker: the ``scenes`` window sampler against the folder dataset reading
the same pixels pre-cut to chips, in one run.

    python benchmarks/window_sampler.py [--side 4096] [--polygons 20000] [--crop 512] [--items 64]
                                        [--gpu-step 0.25] [--batch-size 8]

Setup (not timed): a tiled (512 px), deflate-compressed 3-band uint8 GeoTIFF of ``side`` x ``side`` pixels
in UTM, about ``--polygons`` random polygons of 7 classes in a GeoPackage in EPSG:4326 (so every window
reprojects), and the same scene cut into ``crop`` x ``crop`` PNG chips with PNG masks (the labels
rasterised once, whole, for the chips only) in the folder dataset's layout.

Timed, in this one process (what one DataLoader worker does): ``--items`` random training windows from
``SceneDataset`` (random positions, the sampler's weighting) against as many chips from ``SegFolder`` in a
random order, each with no transform ("read": decode / read + rasterise) and with the seed's training
pipeline (random resize, crop, flip, photometric distortion, normalise). The one-off cost of a worker's
first window (opening the files, loading the polygons into the STRtree) is reported apart.

From the windows per second per worker and a GPU step time, the workers a GPU needs to never wait:
``ceil(batch_size / step_s / windows_per_s)``. Prints a table and writes benchmarks/results/window_sampler.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json

RESULTS = Path(__file__).resolve().parent / "results" / "window_sampler.json"
CLASSES = ["background", "building", "road", "water", "barren", "forest", "agricultural"]
COLOURS = np.array([[200, 200, 190], [180, 60, 50], [120, 120, 110], [40, 70, 150], [170, 150, 110],
                    [40, 120, 50], [150, 170, 80]], np.float32)


def build(folder: Path, side: int, n_polygons: int, crop: int, seed: int = 0) -> dict[str, Any]:
    """The scene, its labels, the scenes.yaml and the chips of the same pixels."""
    import pyogrio
    import rasterio
    import shapely
    import yaml
    from affine import Affine
    from rasterio.features import rasterize
    from rasterio.warp import transform as warp_transform

    from seglstm.data.io import write_png

    rng = np.random.default_rng(seed)
    transform = Affine(0.5, 0, 400_000.0, 0, -0.5, 4_650_000.0)
    # polygons: boxes and blobs of 10..60 px, classes drawn with unequal frequencies
    cx, cy = rng.uniform(0, side, n_polygons), rng.uniform(0, side, n_polygons)
    r = rng.uniform(5, 30, n_polygons)
    geoms = [shapely.box(x - s, y - 0.7 * s, x + s, y + 0.7 * s) if k % 2 else shapely.Point(x, y).buffer(s, quad_segs=4)
             for k, (x, y, s) in enumerate(zip(cx, cy, r))]
    ids = rng.choice(len(CLASSES), n_polygons, p=[0.3, 0.2, 0.15, 0.05, 0.1, 0.1, 0.1])
    pix = np.asarray(geoms, dtype=object)
    # labels rasterised whole, in pixel space, only to paint the image and cut the chip masks
    labels = rasterize(zip(pix, ids.tolist()), out_shape=(side, side), fill=255, dtype=np.uint8)

    def to_4326(c: np.ndarray) -> np.ndarray:
        x = transform.c + transform.a * c[:, 0]
        y = transform.f + transform.e * c[:, 1]
        return np.column_stack(warp_transform("EPSG:32633", "EPSG:4326", x, y))

    pyogrio.raw.write(str(folder / "labels.gpkg"), shapely.to_wkb(shapely.transform(pix, to_4326)),
                      [np.asarray([CLASSES[k] for k in ids], dtype=object)], fields=["class"], crs="EPSG:4326",
                      geometry_type="Polygon", driver="GPKG", layer="labels")
    image = np.empty((side, side, 3), np.uint8)
    for y in range(0, side, 1024):
        lab = labels[y : y + 1024]
        base = np.where(lab[..., None] == 255, 160.0, COLOURS[np.minimum(lab, 6)])
        image[y : y + 1024] = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    with rasterio.open(folder / "scene.tif", "w", driver="GTiff", height=side, width=side, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=transform, tiled=True, blockxsize=512, blockysize=512,
                       compress="deflate", photometric="RGB") as dst:
        dst.write(image.transpose(2, 0, 1))
    scenes = {"classes": CLASSES, "sampling": {"samples_per_epoch": 100_000},
              "scenes": [{"image": "scene.tif", "labels": "labels.gpkg", "label_field": "class", "split": "train"}]}
    (folder / "scenes.yaml").write_text(yaml.safe_dump(scenes), encoding="utf-8")
    chips = folder / "chips"
    (chips / "img_dir" / "train").mkdir(parents=True)
    (chips / "ann_dir" / "train").mkdir(parents=True)
    (chips / "classes.yaml").write_text(yaml.safe_dump({"classes": CLASSES}), encoding="utf-8")
    n = 0
    for y in range(0, side - crop + 1, crop):
        for x in range(0, side - crop + 1, crop):
            write_png(chips / "img_dir" / "train" / f"{y}_{x}.png", np.ascontiguousarray(image[y : y + crop, x : x + crop]), 1)
            write_png(chips / "ann_dir" / "train" / f"{y}_{x}.png", np.ascontiguousarray(labels[y : y + crop, x : x + crop]), 1)
            n += 1
    return {"scenes": folder / "scenes.yaml", "chips": chips, "n_chips": n,
            "labelled": float((labels != 255).mean()), "polygons": n_polygons}


def rates(datasets: list[Any], keys: list[list], repeat: int) -> list[float]:
    """Items per second of each dataset over its keys: the median of ``repeat`` passes, taken round robin
    (one pass of each in turn), so that a change in the machine's load falls on all of them alike."""
    times: list[list[float]] = [[] for _ in datasets]
    for _ in range(repeat):
        for data, key_list, out in zip(datasets, keys, times):
            t = time.perf_counter()
            for key in key_list:
                data[key]
            out.append(time.perf_counter() - t)
    return [len(k) / float(np.median(t)) for k, t in zip(keys, times)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=4096, help="scene side in pixels (default 4096)")
    p.add_argument("--polygons", type=int, default=20_000, help="label polygons (default 20000)")
    p.add_argument("--crop", type=int, default=512, help="window / chip side (default 512)")
    p.add_argument("--items", type=int, default=64, help="windows and chips timed per mode (default 64)")
    p.add_argument("--gpu-step", type=float, default=0.03,
                   help="seconds of one GPU training step of seglstm_upernet_s at --batch-size; default 0.03, an "
                   "ESTIMATE (benchmarks/NOTES.md: 115 GFLOP forward per 512x512 image, x3 for a training step, "
                   "batch 8 = 2.75 TFLOP at about 10%% of an H100's dense bf16 peak)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per GPU step (default 8)")
    p.add_argument("--repeat", type=int, default=5,
                   help="passes over the items, windows and chips in turn; the median is kept (default 5)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    import torch

    from seglstm.data.folder import SegFolder
    from seglstm.data.scenes import SceneDataset
    from seglstm.data.transforms import train_transforms
    from seglstm.study.measure import machine_info

    torch.set_num_threads(1)  # one DataLoader worker's share
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        setup = build(Path(tmp), args.side, args.polygons, args.crop)
        print(f"setup: {args.side}x{args.side} scene, {args.polygons} polygons, {setup['n_chips']} chips "
              f"({time.perf_counter() - t:.1f} s)", flush=True)
        crop = (args.crop, args.crop)
        pipeline = train_transforms(crop, (2048, 512), (0.5, 2.0), 0.75)
        rng = np.random.default_rng(1)
        for mode, transforms in (("read", None), ("train pipeline", pipeline)):
            windows = SceneDataset(None, "train", setup["scenes"], crop_size=crop, transforms=transforms)
            t = time.perf_counter()  # the dataset holds nothing open: this is a fresh worker's first window
            windows[(0, 0)]
            first = time.perf_counter() - t
            chips = SegFolder(setup["chips"], "train", img_suffix=".png", transforms=transforms)
            window_keys = [(1, int(i)) for i in rng.integers(0, len(windows), args.items)]
            chip_keys = [(1, int(i)) for i in rng.integers(0, len(chips), args.items)]
            w_rate, c_rate = rates([windows, chips], [window_keys, chip_keys], args.repeat)
            rows.append({"mode": mode, "windows_per_s": w_rate, "chips_per_s": c_rate, "ratio": w_rate / c_rate,
                         "first_window_s": first,
                         "workers_for_gpu": math.ceil(args.batch_size / args.gpu_step / w_rate),
                         "chip_workers_for_gpu": math.ceil(args.batch_size / args.gpu_step / c_rate)})
    print(f"\nper worker (one process, one torch thread), {args.crop}x{args.crop} RGB, {args.polygons} polygons "
          f"in EPSG:4326 over a {args.side}x{args.side} UTM GeoTIFF:")
    table = print_table(rows, ["mode", "windows_per_s", "chips_per_s", "ratio", "first_window_s", "workers_for_gpu",
                               "chip_workers_for_gpu"])
    print(f"workers_for_gpu: ceil({args.batch_size} windows / {args.gpu_step} s per step (estimate) / windows_per_s)")
    write_json(args.out, {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
                          "labelled_share": setup["labelled"], "rows": rows, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
