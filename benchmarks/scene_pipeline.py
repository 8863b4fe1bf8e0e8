"""How much of predict-scene's wall time is not the model: a null model against the read/arg-max/write floor,
and vil_s with a profile of the rest, for a baseline source tree and this one, in one run.

    python benchmarks/scene_pipeline.py [--baseline REV] [--side 4096] [--tile 1024] [--overlap 256]
                                        [--vil-side 1792] [--vil-tile 1024] [--rounds 2] [--threads N]
                                        [--omp-wait-policy auto] [--out JSON]

Rows, each in a fresh child process with the tree's ``src/`` first on PYTHONPATH (``git archive REV src``
for the baseline, as compare_trees.py does); rounds alternate the order of the trees and each number is
the minimum over the rounds:

* ``floor``: read the scene once (256-row block rows, every pixel once), arg-max a fake output of K
  classes whose cost does not depend on any model, write the uint8 class GeoTIFF (tiled, deflate) once.
  Nothing can be faster than this; it does not depend on the tree (it is measured in each).
* ``null``: predict-scene with a 1x1 convolution (3 -> 7 classes, float32): what the pipeline itself costs.
  Its class rasters from the two trees are compared pixel for pixel.
* ``vil_s``: predict-scene with seglstm_upernet_s (precision auto: bf16 on a CPU with native bf16), the
  model's forward timed inside a wrapper; ``outside`` is the share of the wall time not in the forward.

For the working tree the predictor's own profile (``ScenePredictor.profile``: reader wait, normalise,
forward, blend, flush, writer wait, assembling; the reader and writer threads' busy time) is printed too.
Prints tables and writes benchmarks/results/scene_pipeline.json with the machine description. On a shared,
loaded CPU pass ``--threads 1``: two OpenMP threads there measure the load more than the code.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import print_table, write_json  # noqa: E402
from compare_trees import _export  # noqa: E402

from seglstm.utils.threads import add_omp_wait_policy, apply_omp_wait_policy, choose_inference_threads  # noqa: E402

RESULTS = HERE / "results" / "scene_pipeline.json"
NUM_CLASSES = 7
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
# the last commit whose predict-scene blended on the host in NumPy and read windows in the main thread
DEFAULT_BASELINE = "200ad51"


# ------------------------------------------------------------------------------------------ children
def _timed_model(model):
    """``model`` with its forward time summed in ``.forward_s`` (synchronised on CUDA)."""
    import torch
    from torch import nn

    class Timed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.forward_s, self.calls = model, 0.0, 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            y = self.model(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            self.forward_s += time.perf_counter() - t0
            self.calls += 1
            return y

    return Timed()


def child_floor(scene: str, out: str) -> dict[str, Any]:
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    t0 = time.perf_counter()
    with rasterio.open(scene) as src:
        profile = dict(driver="GTiff", height=src.height, width=src.width, count=1, dtype="uint8", crs=src.crs,
                       transform=src.transform, tiled=True, blockxsize=256, blockysize=256, compress="deflate",
                       nodata=255)  # fmt: skip
        fake = np.random.default_rng(0).random((NUM_CLASSES, 256, src.width), dtype=np.float32) * 255
        with rasterio.open(out, "w", **profile) as dst:
            for y0 in range(0, src.height, 256):
                window = Window(0, y0, src.width, min(256, src.height - y0))
                block = src.read(window=window)
                valid = src.dataset_mask(window=window) > 0
                scores = fake[:, : block.shape[1]]
                scores[0] = block[0]  # the classes depend on the data, so the raster compresses like a real one
                classes = np.where(valid, scores.argmax(axis=0), 255).astype(np.uint8)
                dst.write(classes, 1, window=window)
    return {"seconds": time.perf_counter() - t0}


def child_predict(kind: str, scene: str, out: str, tile: int, overlap: int, batch_size: int) -> dict[str, Any]:
    import torch
    from torch import nn

    from seglstm.inference.scene import ScenePredictor

    torch.manual_seed(0)
    if kind == "null":
        model, precision = nn.Conv2d(3, NUM_CLASSES, 1), "fp32"
    else:
        import seglstm

        model, precision = seglstm.create_model("seglstm_upernet_s", num_classes=NUM_CLASSES), "auto"
    timed = _timed_model(model)
    predictor = ScenePredictor(
        timed, MEAN, STD, [f"c{i}" for i in range(NUM_CLASSES)], [(30 * i, 60, 90) for i in range(NUM_CLASSES)],
        tile=tile, overlap=overlap, batch_size=batch_size, device="auto", precision=precision, progress=False,
    )  # fmt: skip
    t0 = time.perf_counter()
    result = predictor.predict(scene, out)
    wall = time.perf_counter() - t0
    profile = getattr(predictor, "profile", None)  # the baseline tree has none
    return {"seconds": wall, "forward_s": timed.forward_s, "forwards": timed.calls, "tiles": result.tiles,
            "device": str(predictor.device), "precision": str(predictor.amp_dtype), "profile": profile}  # fmt: skip


def child_machine() -> dict[str, Any]:
    from seglstm.study.measure import machine_info

    return machine_info()


# -------------------------------------------------------------------------------------------- parent
def run_child(src: Path, args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, "--child", *args], env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} ({src}) failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _differing_pixels(a: Path, b: Path) -> int:
    import numpy as np
    import rasterio

    with rasterio.open(a) as ra, rasterio.open(b) as rb:
        return int(np.count_nonzero(ra.read(1) != rb.read(1)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default=DEFAULT_BASELINE, help=f"git revision to compare with ({DEFAULT_BASELINE})")
    p.add_argument("--side", type=int, default=4096, help="side of the null-model scene (3-band uint8)")
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--overlap", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--vil-side", type=int, default=1792, help="side of the vil_s scene (0: no vil_s rows)")
    p.add_argument("--vil-tile", type=int, default=1024)
    p.add_argument("--vil-batch-size", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="rounds of the floor and null rows")
    p.add_argument("--vil-rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the children (default: as predict-scene, the physical cores)")
    add_omp_wait_policy(p, default="auto")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        kind, *rest = args.child
        if kind == "make":
            from scene_memory import child_make

            answer = child_make(int(rest[0]), rest[1])
        elif kind == "floor":
            answer = child_floor(*rest)
        elif kind == "machine":
            answer = child_machine()
        else:
            answer = child_predict(kind, rest[0], rest[1], *(int(v) for v in rest[2:]))
        print(json.dumps(answer))
        return 0

    # what the predict-scene command does before torch starts; the children inherit it
    omp_wait_policy = apply_omp_wait_policy(args.omp_wait_policy)
    threads = choose_inference_threads(args.threads)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "baseline").mkdir()
        trees = {"baseline": _export(args.baseline, work / "baseline"), "current": HERE.parent / "src"}
        machine = run_child(trees["current"], ["machine"])
        scene, vil_scene = work / "scene.tif", work / "vil_scene.tif"
        run_child(trees["current"], ["make", str(args.side), str(scene)])
        if args.vil_side:
            run_child(trees["current"], ["make", str(args.vil_side), str(vil_scene)])
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {t: {"floor": [], "null": [], "vil_s": []} for t in trees}
        for r in range(max(args.rounds, args.vil_rounds)):
            for tree in ("baseline", "current") if r % 2 == 0 else ("current", "baseline"):
                src = trees[tree]
                if r < args.rounds:
                    runs[tree]["floor"].append(run_child(src, ["floor", str(scene), str(work / "floor.tif")]))
                    null_out = work / f"null_{tree}.tif"
                    runs[tree]["null"].append(run_child(src, ["null", str(scene), str(null_out), str(args.tile),
                                                              str(args.overlap), str(args.batch_size)]))  # fmt: skip
                if args.vil_side and r < args.vil_rounds:
                    runs[tree]["vil_s"].append(run_child(src, ["vil_s", str(vil_scene), str(work / "vil.tif"),
                                                               str(args.vil_tile), str(args.vil_tile // 4),
                                                               str(args.vil_batch_size)]))  # fmt: skip
                print(f"round {r + 1}: {tree} done ({time.time() - started:.0f}s)", flush=True)
        differing = _differing_pixels(work / "null_baseline.tif", work / "null_current.tif")

    def best(tree: str, kind: str) -> dict[str, Any]:
        return min(runs[tree][kind], key=lambda row: row["seconds"])

    mpx = args.side**2 / 1e6
    rows = []
    for tree in trees:
        floor, null = best(tree, "floor"), best(tree, "null")
        row = {"tree": tree, "floor_s": floor["seconds"], "null_s": null["seconds"],
               "null_over_floor": null["seconds"] / floor["seconds"], "null_mpx_s": mpx / null["seconds"]}  # fmt: skip
        if runs[tree]["vil_s"]:
            vil = best(tree, "vil_s")
            row.update(vil_s=vil["seconds"], vil_forward_s=vil["forward_s"],
                       vil_outside=1 - vil["forward_s"] / vil["seconds"], vil_mpx_s=args.vil_side**2 / 1e6 / vil["seconds"])
        rows.append(row)
    print(f"\nscene {args.side}x{args.side} (null model, tile {args.tile}, overlap {args.overlap}, batch "
          f"{args.batch_size}); vil_s scene {args.vil_side}x{args.vil_side} (tile {args.vil_tile}, batch "
          f"{args.vil_batch_size}); baseline {args.baseline}; minimum of {args.rounds} (vil_s {args.vil_rounds}) "
          f"round(s); {machine.get('cpu')}, {machine.get('cores')} cores, {threads} torch thread(s), OMP_WAIT_POLICY "
          f"{omp_wait_policy}, load {os.getloadavg()[0]:.1f}")  # fmt: skip
    table = print_table(rows, list(rows[0]))
    print(f"null-model class rasters, baseline vs current: {differing} differing pixels")
    profiles = []
    for kind in ("null", "vil_s"):
        if runs["current"][kind]:
            run = best("current", kind)
            wall = run["seconds"]
            prof = {k: v for k, v in (run["profile"] or {}).items()}
            profiles.append({"run": kind, "wall_s": wall, **prof,
                             "main_other": wall - sum(v for k, v in prof.items() if k not in ("reader", "writer", "normalise"))})
    profile_table = print_table(profiles, list(profiles[0])) if profiles else ""
    write_json(args.out, {"benchmark": "scene_pipeline", "machine": machine, "args": vars(args), "threads": threads,
                          "omp_wait_policy": omp_wait_policy, "load_average": os.getloadavg(), "rows": rows,
                          "profiles": profiles, "differing_pixels": differing, "raw": runs, "table": table,
                          "profile_table": profile_table})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
