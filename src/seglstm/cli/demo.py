"""``seglstm demo``: the main job end to end on the built-in synthetic data, on the CPU, with a report.

1. generate the synthetic LoveDA-like dataset (kept and reused when it is already there and complete);
2. ``seglstm fit`` with ``configs/demo.yaml`` (a small Seg-LSTM: ViL-T width, 8x8 patches, UPerNet head,
   chunkwise mLSTM, the seed's recipe shape on a CPU budget);
3. ``seglstm test`` of the final checkpoint on the synthetic val split;
4. a report folder: metrics table, confusion matrix, a grid of predictions next to image and ground truth,
   loss / mIoU curves, and ``report.md`` tying them together with the measured times.

``--quick`` runs the same path on a smaller dataset for a few iterations (about 15 seconds on 2 cores), as a
smoke check.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from seglstm.errors import SeglstmError

PROG = "seglstm demo"
REPO_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "demo.yaml"
TARGET_MIOU = 0.60
TARGET_MINUTES = 15.0

# dataset and schedule of the full demo and of --quick (the quick run overrides the config's schedule)
FULL = {"data": "data/synthetic", "n_train": 400, "n_val": 40, "size": 256, "overrides": []}
QUICK = {
    "data": "data/synthetic-quick",
    "n_train": 16,
    "n_val": 4,
    "size": 128,
    "overrides": [
        "--trainer.max_steps",
        "12",
        "--trainer.val_check_interval",
        "12",
        "--model.warmup_iters",
        "2",
        "--data.batch_size",
        "4",
    ],
}
GRID_SAMPLES = 6


class DemoError(SeglstmError, RuntimeError):
    """A demo stage failed; the message says which and where its output is."""


def demo_run(
    args: argparse.Namespace, full: dict, quick: dict, out: str, config: Path
) -> tuple[dict, Path, Path] | None:
    """The spec, run folder and config a demo variant runs with (``--quick``, ``--data``, ``--out``,
    ``--config``); ``None``, after saying so, when the config is missing."""
    spec = dict(quick if args.quick else full)
    if args.data:
        spec["data"] = args.data
    path = Path(args.config or config)
    if not path.is_file():
        print(f"{PROG}: error: --config {path} does not exist (run from the repository, or pass --config)",
              file=sys.stderr)  # fmt: skip
        return None
    return spec, Path(args.out or (out + "-quick" if args.quick else out)), path


@contextlib.contextmanager
def timed(times: dict[str, float], stage: str) -> Iterator[None]:
    """Add the block's wall time to ``times[stage]`` (the report's time table)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        times[stage] = time.perf_counter() - start


def _run(stage: str, argv: list[str]) -> None:
    from seglstm.cli.main import main as seglstm

    print(f"\n[{PROG}] {stage}: seglstm {' '.join(argv)}", flush=True)
    rc = seglstm(argv)
    if rc != 0:
        raise DemoError(f"{stage} failed (seglstm {argv[0]} exited with {rc}); see the messages above")


def _prediction_grid(ckpt: Path, data_root: Path, out: Path, n: int) -> Path:
    """Image | ground truth | prediction for the first ``n`` val images, with the run's own settings."""
    import torch

    from seglstm.data.datamodule import SegDataModule
    from seglstm.inference.loading import load_segmentor
    from seglstm.training.reports import prediction_grid, resize_rgb, to_display_rgb

    model, meta = load_segmentor(ckpt)
    dm = SegDataModule(dataset="loveda", root=str(data_root), test_scale=None, num_workers=0)
    dm.setup("validate")
    data = dm.datasets["val"]
    rows, titles = [], []
    with torch.no_grad():
        for i in range(min(n, len(data))):
            sample = data[i]
            logits = model.inference(sample["image"][None], **meta["test_cfg"])
            pred = logits.argmax(1)[0].numpy()
            image = resize_rgb(to_display_rgb(sample["image"], meta["mean"], meta["std"]), pred.shape)
            rows.append((image, sample["mask"].numpy(), pred))
            titles.append(Path(sample["path"]).name)
    return prediction_grid(rows, meta["palette"], meta["classes"], out, titles)


def _write_report(
    out: Path,
    metrics: dict[str, Any],
    times: dict[str, float],
    args: argparse.Namespace,
    data_spec: dict[str, Any],
    config: Path,
) -> Path:
    from seglstm.utils.io import atomic_write_text

    total = sum(times.values())
    tensorboard = any((out.parent / "logs").glob("version_*/tb"))  # written only with the tensorboard extra
    table = (out / "metrics.md").read_text(encoding="utf-8").split("\n", 2)[-1].strip()
    miou = metrics["mIoU"]
    verdict = []
    if not args.quick:
        verdict.append(
            f"- target mIoU >= {TARGET_MIOU:.2f}: **{'met' if miou >= TARGET_MIOU else 'NOT met'}** "
            f"({miou:.4f})"
        )
        verdict.append(
            f"- target under {TARGET_MINUTES:.0f} minutes: **{'met' if total < 60 * TARGET_MINUTES else 'NOT met'}** "
            f"({total / 60:.1f} min on {os.cpu_count()} CPU cores)"
        )
    else:
        verdict.append("- quick run (CI smoke test): the numbers are not meant to be good")
    lines = [
        "# seglstm demo report",
        "",
        f"A small Seg-LSTM (ViL-T-width encoder with 8x8 patches, UPerNet head, chunkwise mLSTM; `{config}`) trained on the CPU",
        f"on the built-in synthetic LoveDA-like dataset ({data_spec['n_train']} train / {data_spec['n_val']} val "
        f"images of {data_spec['size']}x{data_spec['size']} under `{data_spec['data']}`), evaluated on its val split.",
        "",
        f"**mIoU {100 * miou:.2f}**, mAcc {100 * metrics['mAcc']:.2f}, aAcc {100 * metrics['aAcc']:.2f} "
        f"(percent, mmseg's IoUMetric).",
        "",
        *verdict,
        "",
        "## Time",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {stage} | {sec:.1f} |" for stage, sec in times.items()],
        f"| total | {total:.1f} |",
        "",
        "## Metrics on the val split",
        "",
        table,
        "",
        "## Predictions",
        "",
        "Image, ground truth and prediction for the first val images (colours: the LoveDA palette).",
        "",
        "![predictions](predictions.png)",
        "",
        "## Confusion matrix (rows: label, columns: prediction, row-normalised)",
        "",
        "![confusion matrix](confusion_matrix.png)",
        "",
        "## Training curves",
        "",
        "![curves](curves.png)",
        "",
        "## Files",
        "",
        "- `metrics.json`, `metrics.md`: the numbers above; `overlay/`, `color/`: every val prediction",
        f"- checkpoints: `{out.parent / 'checkpoints'}`; logs: `{out.parent / 'logs'}` "
        + (f"(TensorBoard: `tensorboard --logdir {out.parent / 'logs'}`)" if tensorboard else "(metrics.csv)")
        + f"; config: `{out.parent / 'config.yaml'}`",
        "",
    ]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the same path, tiny and short (about 15 seconds)")
    parser.add_argument(
        "--out", default=None, help="run folder (default runs/demo, runs/demo-quick with --quick)"
    )
    parser.add_argument(
        "--data", default=None, help="synthetic dataset folder (default data/synthetic[-quick])"
    )
    parser.add_argument(
        "--config", default=None, help="training config (default configs/demo.yaml, configs/demo_scenes.yaml)"
    )
    parser.add_argument(
        "--scenes",
        action="store_true",
        help="train on synthetic GeoTIFF scenes with GeoPackage labels, validate on a held-out area and map a "
        "held-out scene with predict-scene (seglstm.cli.demo_scenes)",
    )
    parser.add_argument(
        "--workers", type=int, default=min(2, os.cpu_count() or 1), help="dataset generation workers"
    )
    args = parser.parse_args(argv)
    if args.scenes:
        from seglstm.cli import demo_scenes

        return demo_scenes.main(args)
    run = demo_run(args, FULL, QUICK, "runs/demo", REPO_CONFIG)
    if run is None:
        return 2
    spec, out, config = run
    times: dict[str, float] = {}
    try:
        from seglstm.data.io import write_dataset
        from seglstm.data.synthetic import generate

        with timed(times, "dataset"):
            print(
                f"[{PROG}] dataset: {spec['n_train']} train + {spec['n_val']} val synthetic images at {spec['data']}"
            )
            data = Path(spec["data"])

            def write(folder: Path) -> Path:
                return generate(folder, spec["n_train"], spec["n_val"], size=spec["size"], seed=0,
                                workers=args.workers)  # fmt: skip

            # a new dataset is built beside its folder and moved in when complete (a killed demo leaves none)
            root = write_dataset(data, write, f"seglstm demo --data {data}")

        common = ["--config", str(config), "--data.root", str(root), "--trainer.default_root_dir", str(out)]
        with timed(times, "train"):
            # --auto-resume: a second demo continues (or, when finished, keeps) the run in its folder
            _run("train", ["fit", *common, "--auto-resume", *spec["overrides"]])

        report = out / "report"
        with timed(times, "evaluate"):
            _run("evaluate", ["test", *common, "--ckpt_path", "last", "--out", str(report)])

        with timed(times, "report"):
            from seglstm.cli.plot_log import find_csv_logs, plot_curves, read_curves

            _prediction_grid(out / "checkpoints" / "last.ckpt", root, report / "predictions.png", GRID_SAMPLES)
            # the newest log with training columns is this fit (the test run above logs in its own version)
            curves = {}
            for log in reversed(find_csv_logs(out)):
                curves = read_curves([log])
                if any(key.startswith("train/loss") for key in curves):
                    break
            plot_curves(curves, report / "curves.png", title=f"{PROG} ({out})")
        metrics = json.loads((report / "metrics.json").read_text(encoding="utf-8"))
        path = _write_report(report, metrics, times, args, spec, config)
    except FileExistsError as err:
        print(f"{PROG}: error: {err.args[0].split(';')[0]}, and it is not this demo's dataset: give another --data "
              "folder, or remove that one", file=sys.stderr)  # fmt: skip
        return 1
    except (DemoError, ValueError, OSError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    total = sum(times.values())
    print(
        f"\n[{PROG}] done in {total / 60:.1f} min: val mIoU {100 * metrics['mIoU']:.2f} "
        f"(mAcc {100 * metrics['mAcc']:.2f}, aAcc {100 * metrics['aAcc']:.2f})\n"
        f"[{PROG}] report: {path}"
    )
    return 0
