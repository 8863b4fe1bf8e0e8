"""CPU speed of an exported segmentor under ONNX Runtime next to the same model in PyTorch, same run.

    python benchmarks/onnx_speed.py [--tile 512] [--batch 1] [--repeats 5] [--model seglstm_upernet_t]

The model is the demo config's shape (configs/demo.yaml: ViL-T width, one block per stage, patch 8,
64-channel heads) with seeded random weights unless --ckpt is given; it is exported with
seglstm.inference.export (torch.onnx, the chunkwise mLSTM's cummax translated) at one fixed tile and
batch. Both runtimes use every core. Prints a table (median seconds per batch, tiles per second, the
largest logit difference) and writes benchmarks/results/onnx_speed.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, time_call, write_json

RESULTS = Path(__file__).resolve().parent / "results" / "onnx_speed.json"
DEMO = dict(depths=[1, 1, 1, 1], patch_size=8, img_size=64, mlstm_backend="chunkwise", channels=64,
            aux_cfg={"channels": 32})


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="seglstm_upernet_t")
    p.add_argument("--ckpt", default=None, help="a checkpoint instead of random demo-shaped weights")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    import onnxruntime as ort

    import seglstm
    from seglstm.inference.export import export_segmentor
    from seglstm.inference.scene.onnx import OnnxSegmentor

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
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        path = export_segmentor(model, meta, Path(work) / "model.onnx", tile=args.tile, batch=args.batch)
        export_s = time.perf_counter() - start
        onnx_model = OnnxSegmentor(path)
        size_mib = path.stat().st_size / 2**20
        with torch.inference_mode():
            ref = model(x)
            diff = float((onnx_model(x) - ref).abs().max())
            cpu = torch.device("cpu")
            t_torch = time_call(lambda: model(x), cpu, repeats=args.repeats)
        t_ort = time_call(lambda: onnx_model(x), torch.device("cpu"), repeats=args.repeats)
    rows = [
        {"runtime": f"pytorch {torch.__version__}", "s_per_batch": t_torch, "tiles_per_s": args.batch / t_torch,
         "max_abs_diff": 0.0, "vs_pytorch": 1.0},
        {"runtime": f"onnxruntime {ort.__version__}", "s_per_batch": t_ort, "tiles_per_s": args.batch / t_ort,
         "max_abs_diff": diff, "vs_pytorch": t_torch / t_ort},
    ]
    text = print_table(rows, ["runtime", "s_per_batch", "tiles_per_s", "max_abs_diff", "vs_pytorch"])
    load = os.getloadavg()
    note = (f"{args.model}, tile {args.tile}, batch {args.batch}, {cores} threads; export {export_s:.0f} s, "
            f"{size_mib:.1f} MiB; load average {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}")
    print(note)
    write_json(args.out, {
        "benchmark": "onnx_speed", "config": {**vars(args), "model_kwargs": None if args.ckpt else DEMO},
        "machine": machine(), "rows": rows, "export_s": export_s, "onnx_mib": size_mib,
        "load_average": list(load), "table": text, "note": note,
    })
    return 0 if np.isfinite(diff) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
