"""Peak memory of whole-scene inference against scene size: it should follow the tile, batch and buffer,
not the number of pixels; and what each product (class raster, COG, polygons) adds, in the same run.

    python benchmarks/scene_memory.py [--sides 4096 8192] [--tile 1024] [--overlap 256] [--batch-size 4]
                                      [--products raster cog vector]

For each side it writes a 3-band uint8 GeoTIFF block row by block row (never whole in memory), then
segments it with a cheap 1x1-convolution model in a fresh child process and reads the child's peak RSS
from ``os.wait4``. A ``baseline`` child imports everything and builds the model without a scene, so the
scene's own share is the difference. This parent process imports only the standard library until the
measurements are done: Linux carries a parent's RSS high-water mark into a child it spawns, so a heavy
parent would inflate every number. Prints a table and writes benchmarks/results/scene_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "scene_memory.json"
NUM_CLASSES = 7


# ------------------------------------------------------------------------------------------ children
def _cheap_model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(inplace=True), nn.Conv2d(16, NUM_CLASSES, 1))


def child_make(side: int, path: str) -> dict[str, Any]:
    """A smooth pattern plus noise, written one 256-row block row at a time."""
    import numpy as np
    import rasterio
    from affine import Affine

    profile = dict(driver="GTiff", height=side, width=side, count=3, dtype="uint8", crs="EPSG:32633",
                   transform=Affine(0.5, 0.0, 500_000.0, 0.0, -0.5, 4_200_000.0), tiled=True,
                   blockxsize=256, blockysize=256, compress="deflate", photometric="MINISBLACK")
    rng = np.random.default_rng(side)
    xx = np.arange(side, dtype=np.float32)[None, :]
    with rasterio.open(path, "w", **profile) as dst:
        for y0 in range(0, side, 256):
            yy = np.arange(y0, min(y0 + 256, side), dtype=np.float32)[:, None]
            base = [np.sin(xx / 97.0 + k) * np.cos(yy / 131.0 - k) for k in range(3)]
            noise = rng.normal(0, 12, (3, yy.shape[0], side))
            block = np.clip(np.stack(base) * 90 + 128 + noise, 0, 255).astype(np.uint8)
            dst.write(block, window=rasterio.windows.Window(0, y0, side, yy.shape[0]))
    return {"bytes": os.path.getsize(path)}


def child_baseline() -> dict[str, Any]:
    import numpy as np
    import rasterio  # noqa: F401
    import torch

    import seglstm.inference.scene  # noqa: F401

    model = _cheap_model()
    with torch.inference_mode():
        model(torch.from_numpy(np.zeros((1, 3, 64, 64), np.float32)))
    return {}


def child_predict(
    src: str, out: str, tile: int, overlap: int, batch_size: int, buffer_mb: float, product: str = "raster"
) -> dict[str, Any]:
    import torch

    from seglstm.inference.scene import predict_scene

    vector = str(Path(out).with_suffix(".gpkg")) if product == "vector" else None

    result = predict_scene(
        _cheap_model(), src, out, mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
        classes=[f"class{i}" for i in range(NUM_CLASSES)],
        palette=[((40 * i) % 256, (90 * i + 30) % 256, (150 * i + 60) % 256) for i in range(NUM_CLASSES)],
        tile=tile, overlap=overlap, batch_size=batch_size, buffer_mb=buffer_mb, device="cpu", progress=False,
        cog=product == "cog", vector=vector,
    )  # fmt: skip
    answer = {"tiles": result.tiles, "strips": result.strips, "threads": torch.get_num_threads(),
              "output_bytes": os.path.getsize(out), "polygons": result.polygons if vector else "-"}
    if vector:
        answer["vector_bytes"] = os.path.getsize(vector)
        os.remove(vector)
    return answer


# -------------------------------------------------------------------------------------------- parent
def run_child(args: list[str]) -> dict[str, Any]:
    """Run this script as a child; return its JSON answer with its wall time and peak RSS."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, text=True)
    answer = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"child {args} failed with exit code {code}")
    result = json.loads(answer.strip().splitlines()[-1])
    result.update(wall_s=round(wall, 2), peak_rss_mib=round(usage.ru_maxrss / 1024, 1))  # Linux: KiB
    return result


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[str(r.get(c, "-")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [" | ".join(c.rjust(w) for c, w in zip(columns, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sides", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--overlap", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--buffer-mb", type=float, default=512.0)
    p.add_argument("--products", nargs="+", default=["raster"], choices=["raster", "cog", "vector"],
                   help="outputs to measure, each in its own child on the same scene (default raster)")
    p.add_argument("--workdir", default=None, help="where scenes go (default: a temporary directory)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        kind, *rest = args.child
        if kind == "make":
            answer = child_make(int(rest[0]), rest[1])
        elif kind == "baseline":
            answer = child_baseline()
        else:
            answer = child_predict(rest[0], rest[1], int(rest[2]), int(rest[3]), int(rest[4]), float(rest[5]),
                                   rest[6])
        print(json.dumps(answer))
        return 0

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        rows = [{"side": "baseline", "pixels": 0, **run_child(["baseline"])}]
        for side in args.sides:
            scene, out = Path(work) / f"scene_{side}.tif", Path(work) / f"classes_{side}.tif"
            made = run_child(["make", str(side), str(scene)])
            print(f"wrote {side}x{side} scene ({made['bytes'] / 2**20:.0f} MiB) in {made['wall_s']} s", flush=True)
            cfg = [str(v) for v in (args.tile, args.overlap, args.batch_size, args.buffer_mb)]
            for product in args.products:
                row = run_child(["predict", str(scene), str(out), *cfg, product])
                row.update(side=side, product=product, pixels=side * side,
                           mpix_per_s=round(side * side / 1e6 / row["wall_s"], 2))
                rows.append(row)
                print(f"segmented {side}x{side} ({product}): {row['wall_s']} s, peak RSS {row['peak_rss_mib']} MiB",
                      flush=True)
                out.unlink()
            scene.unlink()
    base = rows[0]["peak_rss_mib"]
    for row in rows[1:]:
        row["over_baseline_mib"] = round(row["peak_rss_mib"] - base, 1)
    text = table(rows, ["side", "product", "pixels", "tiles", "strips", "polygons", "wall_s", "mpix_per_s",
                        "peak_rss_mib", "over_baseline_mib"])  # fmt: skip
    load = os.getloadavg()
    text += f"\nload average (1, 5, 15 min) at the end: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}"
    print(text)

    import torch  # only now: see the module docstring

    from seglstm.utils.io import atomic_write_text

    payload = {
        "benchmark": "scene_memory",
        "config": {"tile": args.tile, "overlap": args.overlap, "batch_size": args.batch_size,
                   "buffer_mb": args.buffer_mb, "model": f"1x1 conv 3-16-{NUM_CLASSES}", "device": "cpu",
                   "products": args.products},
        "load_average": list(load),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cores": os.cpu_count(),
                    "cpu": platform.processor() or platform.machine()},
        "rows": rows,
        "table": text,
    }  # fmt: skip
    atomic_write_text(args.out, json.dumps(payload, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
