"""Inference under load: ``seglstm predict`` over many small images and ``seglstm predict-scene`` on a large
GeoTIFF, each run twice. Memory must stay flat (peak RSS in the first quarter of the run against the last
quarter) and the two runs' outputs must be byte-identical.

    python benchmarks/load.py [--images 2000] [--size 64] [--side 8192] [--tile 1024] [--out DIR]

Every step runs in a fresh child process (``--child``) whose RSS this stdlib-only parent samples from
``/proc/<pid>/status`` every 50 ms; progress for ``predict`` is the number of masks written, for
``predict-scene`` the elapsed time. The model is a small registered convolutional segmentor
(``load_bench_seg``): the benchmark measures the data, inference and writing pipeline, not an encoder.
Prints a table and writes benchmarks/results/load.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "load.json"
NUM_CLASSES = 7


# ------------------------------------------------------------------------------------------ children
def register_model() -> None:
    """Register ``load_bench_seg``: conv 3x3 + BatchNorm + conv 1x1, with the segmentor interface."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from seglstm.models.registry import list_models, register_model

    class LoadBenchSeg(nn.Module):
        def __init__(self, num_classes: int) -> None:
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.neck = None
            self.decode_head = nn.Conv2d(16, num_classes, 1)
            self.auxiliary_head = None

        def forward(self, img: torch.Tensor) -> torch.Tensor:
            return self.decode_head(self.backbone(img))

        def loss(self, img: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
            ce = F.cross_entropy(self(img), mask, ignore_index=255)
            return {"loss": ce}

        @torch.no_grad()
        def inference(self, img: torch.Tensor, mode: str | None = None) -> torch.Tensor:
            return self(img)

    if "load_bench_seg" not in list_models():

        def load_bench_seg(num_classes: int) -> LoadBenchSeg:
            return LoadBenchSeg(num_classes)

        register_model(load_bench_seg)


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` random RGB PNGs of ``size`` x ``size`` (deterministic)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img_{i:05d}.png")


def make_scene(path: Path, side: int, seed: int = 0) -> None:
    """A 3-band uint8 GeoTIFF written block row by block row (never whole in memory)."""
    import numpy as np
    import rasterio
    from rasterio.transform import Affine
    from rasterio.windows import Window

    rng = np.random.default_rng(seed)
    profile = dict(driver="GTiff", height=side, width=side, count=3, dtype="uint8", crs="EPSG:32633",
                   transform=Affine(0.3, 0, 5e5, 0, -0.3, 4.2e6), tiled=True, blockxsize=256, blockysize=256)  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        for y in range(0, side, 256):
            rows = min(256, side - y)
            dst.write(rng.integers(0, 256, (3, rows, side), dtype=np.uint8), window=Window(0, y, side, rows))


def make_checkpoint(path: Path, seed: int = 0) -> None:
    """A checkpoint as ``seglstm fit`` writes it (weights under ``model.``, hyper-parameters, meta)."""
    import lightning
    import torch

    from seglstm.config import META_KEY
    from seglstm.models.registry import create_model

    register_model()
    torch.manual_seed(seed)
    model = create_model("load_bench_seg", num_classes=NUM_CLASSES)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    meta = {"model": "load_bench_seg", "model_kwargs": {}, "num_classes": NUM_CLASSES, "test_cfg": {},
            "classes": [f"class_{i}" for i in range(NUM_CLASSES)], "palette": [[30 * i, 255 - 30 * i, 90] for i in range(NUM_CLASSES)],
            "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}  # fmt: skip
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "pytorch-lightning_version": lightning.__version__,
            "hyper_parameters": {"model": "load_bench_seg", "num_classes": NUM_CLASSES},
            META_KEY: meta,
        },
        path,
    )


def write_predict_config(path: Path, images: Path, workers: int = 2, batch: int = 16) -> None:
    import yaml

    cfg = {
        "model": {"model": "load_bench_seg"},
        "data": {"dataset": "loveda", "root": str(images), "predict_root": str(images), "val_batch_size": batch,
                 "num_workers": workers, "test_scale": None},
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_model_summary": False},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")


def run_cli(argv: list[str]) -> int:
    """Import everything first, then tell the parent (``LOAD_BENCH_READY`` file) that the run proper starts."""
    register_model()
    import seglstm.cli.lightning
    import seglstm.inference.loading
    import seglstm.inference.scene  # noqa: F401
    from seglstm.cli.main import main

    Path(os.environ["LOAD_BENCH_READY"]).touch()
    return main(argv)


# ------------------------------------------------------------------------------------------ parent
def _rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def measured(argv: list[str], ready: Path, progress: Any = None, timeout: float = 3600) -> dict[str, Any]:
    """Run ``--child argv`` and sample its RSS; ``progress()`` (0..1) splits the run into quarters, else the
    time since the child's imports were done (it touches ``ready``).

    Returns wall seconds and the peak RSS (MiB) of the first and the last quarter of the run, counted from
    the first sample with progress > 0.
    """
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *argv]
    ready.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "LOAD_BENCH_READY": str(ready)})  # fmt: skip
    began: list[float] = []

    def since_ready() -> float:
        if not began and ready.exists():
            began.append(time.perf_counter())
        return time.perf_counter() - began[0] if began else 0.0

    progress = progress or since_ready
    samples: list[tuple[float, float, int]] = []  # (time, progress, rss KiB)
    while proc.poll() is None:
        rss = _rss_kib(proc.pid)
        now = time.perf_counter() - start
        if rss is not None:
            samples.append((now, progress(), rss))
        if now > timeout:
            proc.kill()
            raise TimeoutError(f"{argv[0]} took more than {timeout} s")
        time.sleep(0.05)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"child {argv} failed ({proc.returncode}):\n{err[-3000:]}")
    wall = time.perf_counter() - start
    running = [s for s in samples if s[1] > 0] or samples
    lo, hi = running[0][1], running[-1][1]
    span = max(hi - lo, 1e-9)
    first = [r for _, p, r in running if (p - lo) / span <= 0.25]
    last = [r for _, p, r in running if (p - lo) / span >= 0.75]
    return {
        "seconds": round(wall, 2),
        "rss_start_mib": round(max(first) / 1024, 1),
        "rss_end_mib": round(max(last) / 1024, 1),
        "samples": len(samples),
    }


def tree_sha256(folder: Path) -> str:
    """One digest over every file's relative name and bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(os.fspath(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def run_load(work: Path, images: int, size: int, side: int, tile: int, workers: int = 2) -> dict[str, Any]:
    """The whole benchmark in ``work``; returns the results dictionary."""
    scene, ckpt, cfg, ready = work / "scene.tif", work / "model.ckpt", work / "predict.yaml", work / ".ready"
    subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "setup", str(work), str(images),
                    str(size), str(side), str(workers)], check=True)  # fmt: skip
    results: dict[str, Any] = {"images": images, "image_size": size, "scene_side": side, "tile": tile}
    for name in ("predict", "predict_scene"):
        runs = []
        for rep in (1, 2):
            out = work / f"{name}_{rep}"
            if name == "predict":
                masks = out / "masks"
                argv = ["cli", "predict", "--config", str(cfg), "--ckpt_path", str(ckpt), "--out", str(out)]
                stats = measured(argv, ready, lambda m=masks: len(os.listdir(m)) / images if m.is_dir() else 0.0)
            else:
                argv = ["cli", "predict-scene", str(scene), str(out / "classes.tif"), "--ckpt", str(ckpt),
                        "--tile", str(tile), "--device", "cpu", "--quiet"]  # fmt: skip
                stats = measured(argv, ready)
            stats["sha256"] = tree_sha256(out)
            runs.append(stats)
        results[name] = {"runs": runs, "identical": runs[0]["sha256"] == runs[1]["sha256"]}
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, args = sys.argv[2], sys.argv[3:]
        if kind == "setup":
            work, n, size, side, workers = Path(args[0]), int(args[1]), int(args[2]), int(args[3]), int(args[4])
            make_images(work / "images", n, size)
            make_scene(work / "scene.tif", side)
            make_checkpoint(work / "model.ckpt")
            write_predict_config(work / "predict.yaml", work / "images", workers)
            return
        sys.exit(run_cli(args))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--side", type=int, default=8192)
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = run_load(work, args.images, args.size, args.side, args.tile, args.workers)
    results["machine"] = {"python": platform.python_version(), "cores": os.cpu_count(), "cpu": platform.machine()}
    print(f"{'workload':<14} {'run':>3} {'seconds':>8} {'RSS start MiB':>14} {'RSS end MiB':>12}  identical")
    for name in ("predict", "predict_scene"):
        for i, run in enumerate(results[name]["runs"], 1):
            print(f"{name:<14} {i:>3} {run['seconds']:>8} {run['rss_start_mib']:>14} {run['rss_end_mib']:>12}  "
                  f"{results[name]['identical']}")  # fmt: skip
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"results written to {args.results}")


if __name__ == "__main__":
    main()
