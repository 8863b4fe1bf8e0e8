"""CPU speed of the segmentor per inference precision and runtime, same run: PyTorch fp32 (the baseline), bf16
autocast, the ViL layers' reference path in fp32 and torchao int8 (which needs that path), ONNX Runtime fp32
and its dynamically quantised int8 files.

    python benchmarks/onnx_speed.py [--tile 512] [--batch 1] [--repeats 5] [--model seglstm_upernet_t]
        [--ckpt FILE] [--rows ...] [--per-channel]

The model is the demo config's shape (configs/demo.yaml: ViL-T width, one block per stage, patch 8,
64-channel heads) with seeded random weights unless --ckpt is given (e.g. runs/demo/checkpoints/last.ckpt).
The ONNX files are seglstm.inference.export's (torch.onnx, the chunkwise mLSTM's cummax translated) at one
fixed tile and batch; the int8 rows and the reference-path export are benchmarks/precision_accuracy.py's
(its docstring says what each quantises; it measures their accuracy on a trained run's val split). Both
runtimes use every core; the timed calls go round robin over the rows (median of --repeats rounds), so a
change in the machine's load hits every row alike. Prints a table (median seconds per batch, tiles per second, speed against PyTorch
fp32 and bf16, the largest logit difference and the pixel agreement with PyTorch fp32) and writes
benchmarks/results/onnx_speed.json. A row whose backend fails is reported with its error.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json
from precision_accuracy import export_onnx, onnx_int8, reference_path, torchao_int8

from seglstm.study.measure import machine_info, time_call
from seglstm.utils.optional import require

RESULTS = Path(__file__).resolve().parent / "results" / "onnx_speed.json"
DEMO = dict(depths=[1, 1, 1, 1], patch_size=8, img_size=64, mlstm_backend="chunkwise", channels=64,
            aux_cfg={"channels": 32})
ROWS = ("pytorch-fp32", "pytorch-bf16", "pytorch-fp32-ref", "pytorch-int8-torchao", "onnx-fp32", "onnx-int8", "onnx-int8-ref")
COLUMNS = ["row", "s_per_batch", "tiles_per_s", "vs_fp32", "vs_bf16", "max_abs_diff", "agreement", "note"]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="seglstm_upernet_t")
    p.add_argument("--ckpt", default=None, help="a checkpoint instead of random demo-shaped weights")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--per-channel", action="store_true", help="per-channel int8 weights in the ONNX rows")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    ort = require("onnxruntime", "the onnx rows")

    import seglstm
    from seglstm.inference.scene.onnx import OnnxSegmentor
    from seglstm.utils.device import cpu_has_native_bf16

    torch.manual_seed(0)
    if args.ckpt:
        from seglstm.inference.loading import load_segmentor

        model, meta = load_segmentor(args.ckpt)
    else:
        model = seglstm.create_model(args.model, num_classes=7, **DEMO).eval()
        meta = dict(classes=[f"c{i}" for i in range(7)], palette=[(i, i, i) for i in range(7)],
                    mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], num_classes=7, model=args.model)
    x = torch.randn(args.batch, len(meta["mean"]), args.tile, args.tile)
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    cpu = torch.device("cpu")
    load_before = os.getloadavg()
    rows, export_s = [], {}
    calls: dict[str, Callable[[], torch.Tensor]] = {}
    with tempfile.TemporaryDirectory() as work:  # not under inference_mode: torch.onnx cannot export there
        with torch.inference_mode():
            ref = model(x)
        exports: dict[bool, Path] = {}

        def onnx_file(reference: bool) -> Path:
            if reference not in exports:
                start = time.perf_counter()
                name = "reference.onnx" if reference else "model.onnx"
                exports[reference] = export_onnx(model, meta, Path(work) / name, args.tile, args.batch, reference)
                export_s["reference" if reference else "fused"] = time.perf_counter() - start
            return exports[reference]

        for row in ["pytorch-fp32", *[r for r in args.rows if r != "pytorch-fp32"]]:
            note = ""
            try:
                fn: Callable[[], torch.Tensor]
                if row == "pytorch-fp32":
                    fn, note = torch.inference_mode()(lambda: model(x)), f"torch {torch.__version__}"
                elif row == "pytorch-bf16":
                    @torch.inference_mode()
                    def fn() -> torch.Tensor:
                        with torch.autocast("cpu", dtype=torch.bfloat16):
                            return model(x)
                    note = "native bf16" if cpu_has_native_bf16() else "EMULATED bf16"
                elif row == "pytorch-fp32-ref":  # the path the torchao row needs, without quantising
                    reference = reference_path(model)
                    fn = torch.inference_mode()(lambda reference=reference: reference(x))
                    note = "ViL reference path"
                elif row == "pytorch-int8-torchao":
                    torchao = require("torchao", "the pytorch-int8-torchao row")

                    quantised = torchao_int8(model)
                    fn = torch.inference_mode()(lambda quantised=quantised: quantised(x))
                    note = f"torchao {torchao.__version__}, reference path"
                else:
                    path = onnx_file(row.endswith("-ref"))
                    if row != "onnx-fp32":
                        path = onnx_int8(path, Path(work) / f"{row}.onnx", args.per_channel)
                    session = OnnxSegmentor(path)
                    fn = lambda session=session: session(x)  # noqa: E731
                    note = f"onnxruntime {ort.__version__}, {path.stat().st_size / 2**20:.1f} MiB"
                out = fn().float()  # also the warm-up call
            except Exception as err:  # a backend that cannot run this model is a result too
                message = f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                print(f"{row}: {message}", file=sys.stderr)
                rows.append({"row": row, "note": message})
                continue
            calls[row] = fn
            rows.append({"row": row, "max_abs_diff": float((out - ref).abs().max()),
                         "agreement": 100.0 * float((out.argmax(1) == ref.argmax(1)).float().mean()),
                         "note": note})
        # round robin: one call of every row per round, so a change of the machine's load hits every row alike
        times: dict[str, list[float]] = {row: [] for row in calls}
        for _ in range(args.repeats):
            for row, fn in calls.items():
                times[row].append(time_call(fn, cpu, repeats=1, warmup=0))
    for r in rows:
        if r["row"] in times:
            r["s_per_batch"] = statistics.median(times[r["row"]])
            r["tiles_per_s"] = args.batch / r["s_per_batch"]
    base = {r["row"]: r.get("s_per_batch") for r in rows}
    for r in rows:
        if "s_per_batch" in r:
            r["vs_fp32"] = base["pytorch-fp32"] / r["s_per_batch"]
            if base.get("pytorch-bf16"):
                r["vs_bf16"] = base["pytorch-bf16"] / r["s_per_batch"]
    text = print_table(rows, COLUMNS)
    load = os.getloadavg()
    exported = ", ".join(f"{k} {v:.0f} s" for k, v in export_s.items()) or "none"
    note = (f"{args.model}{' ' + args.ckpt if args.ckpt else ''}, tile {args.tile}, batch {args.batch}, "
            f"{cores} threads; export {exported}; load average (1 min) before {load_before[0]:.2f}, "
            f"after {load[0]:.2f}")
    print(note)
    write_json(args.out, {
        "benchmark": "onnx_speed", "config": {**vars(args), "model_kwargs": None if args.ckpt else DEMO},
        "machine": machine_info(), "rows": rows, "export_s": export_s,
        "load_average": {"before": list(load_before), "after": list(load)}, "table": text, "note": note,
    })
    return 0 if all(np.isfinite(r.get("max_abs_diff", 0.0)) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
