"""Accuracy of the reduced-precision CPU inference paths on a trained run's val split, against float32.

    flock /tmp/seglstm-bench.lock python benchmarks/precision_accuracy.py [--run runs/demo] [--ckpt FILE]
        [--variants fp32 bf16 int8-torchao onnx-fp32 int8-onnx int8-onnx-ref] [--per-channel]

The run's checkpoint (default ``RUN/checkpoints/last.ckpt``, what ``seglstm demo`` / ``make demo`` leave in
``runs/demo``) and its data section (``RUN/config.yaml``) are evaluated with the code ``seglstm test`` runs:
``SegDataModule``'s val split and ``SegmentationTask``'s per-image predictions (the run's ``test_cfg``,
logits cropped and resized to each label's size) scored by ``seglstm.metrics.SegmentationMetrics``
(mmseg's IoUMetric). Only the network's forward pass changes between the variants:

- ``fp32``: the baseline;
- ``bf16``: ``torch.autocast("cpu", torch.bfloat16)``, the path ``predict-scene --precision bf16`` takes;
  the table says whether this CPU has native bf16 GEMMs or emulates them;
- ``int8-torchao``: torchao's dynamic int8 activation + int8 weight quantisation of the ViL layers' up and
  down projections (``nn.Linear``), on the layers' reference path (the fused CPU path cannot take torchao's
  weight tensors: :func:`reference_path`);
- ``onnx-fp32``: the ``seglstm export`` ONNX file under onnxruntime (isolates the export from quantising);
- ``int8-onnx``: that file through ``onnxruntime.quantization.quantize_dynamic`` (int8 weights and
  dynamically quantised activations of every MatMul / Gemm by a constant weight: in the fused path's export
  that is ``proj_down`` and not ``proj_up``, whose weight is sliced and folded in the graph);
- ``int8-onnx-ref``: the same quantiser on an export of the reference path, where both projections are
  MatMuls by a weight. ``--per-channel`` quantises the ONNX weights per output channel.

Per variant: mIoU, mAcc, aAcc (percent), the mIoU difference to fp32 in points, the share of pixels whose
class equals the fp32 prediction, whether both meet the bar (|delta| <= 0.3 points, agreement >= 99%) and
the seconds of the val pass (batches are loaded once beforehand and one batch is run untimed first, so only
inference and scoring are timed).
A variant that fails is a row with its error, not a crash. Writes benchmarks/results/precision_accuracy.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json

from seglstm.study.measure import machine_info
from seglstm.utils.optional import require

RESULTS = Path(__file__).resolve().parent / "results" / "precision_accuracy.json"
VARIANTS = ("fp32", "bf16", "int8-torchao", "onnx-fp32", "int8-onnx", "int8-onnx-ref")
MAX_DELTA_MIOU = 0.3  # points
MIN_AGREEMENT = 99.0  # percent
PROJECTIONS = ("proj_up", "proj_down")  # the ViL layer's nn.Linear projections
COLUMNS = ["variant", "mIoU", "mAcc", "aAcc", "delta_mIoU", "agreement", "meets", "seconds", "note"]


# -- the run and its val split ---------------------------------------------------------------------------

def load_run(run: str | os.PathLike, ckpt: str | os.PathLike | None = None,
             data_root: str | None = None) -> tuple[Any, Any]:
    """``(task, datamodule)`` of a ``seglstm fit`` run folder, the task in eval mode on the CPU."""
    from seglstm.config import compose_config
    from seglstm.data.datamodule import SegDataModule
    from seglstm.training.task import SegmentationTask

    run = Path(run)
    ckpt = Path(ckpt) if ckpt else run / "checkpoints" / "last.ckpt"
    config = run / "config.yaml"
    for path, what in ((ckpt, "--ckpt"), (config, "--run")):
        if not path.is_file():
            raise SystemExit(f"{what}: {path} does not exist (train the run first, e.g. `make demo`)")
    data = dict(compose_config(config).get("data") or {})
    if not data:
        raise SystemExit(f"--run: {config} has no data section")
    if data_root:
        data["root"] = data_root
    data["num_workers"] = 0
    task = SegmentationTask.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    dm = SegDataModule(**data)
    dm.setup("validate")
    return task.eval(), dm


def load_batches(dm: Any) -> list[dict[str, Any]]:
    """The val split's batches, read once so every variant sees the same tensors and no loading is timed."""
    return list(dm.val_dataloader())


# -- one evaluation -------------------------------------------------------------------------------------

def evaluate(task: Any, batches: Sequence[dict[str, Any]],
             autocast: torch.dtype | None = None) -> tuple[dict[str, Any], list[torch.Tensor], float]:
    """Score ``task`` on ``batches`` as ``seglstm test`` does; returns (metrics, per-image class maps, seconds).

    ``autocast``: the CPU autocast dtype of the forward pass (None = float32), as the inference commands use.
    The first batch is predicted once untimed first (one-off costs: weight packing, allocator, ONNX session).
    """
    from seglstm.metrics import SegmentationMetrics

    metrics = SegmentationMetrics(task.hparams.num_classes, task.hparams.ignore_index)
    preds: list[torch.Tensor] = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        task._item_predictions(batches[0])
        start = time.perf_counter()
        for batch in batches:
            preds += task._evaluate(batch, metrics)  # the test step's predictions and metric update
    seconds = time.perf_counter() - start
    return metrics.compute(), preds, seconds


def pixel_agreement(preds: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """Percent of pixels whose class equals the reference prediction, over every image's label-size map."""
    if len(preds) != len(reference):
        raise ValueError(f"{len(preds)} predictions against {len(reference)} reference maps")
    same = total = 0
    for p, r in zip(preds, reference):
        if p.shape != r.shape:
            raise ValueError(f"prediction of shape {tuple(p.shape)} against a reference of {tuple(r.shape)}")
        same += int((p == r).sum())
        total += r.numel()
    return 100.0 * same / total


def result_row(variant: str, metrics: dict[str, Any], preds: Sequence[torch.Tensor], seconds: float,
               reference: tuple[dict[str, Any], Sequence[torch.Tensor]] | None, note: str = "") -> dict[str, Any]:
    """One table row, in percent; ``reference`` is the fp32 (metrics, predictions), None for fp32 itself."""
    ref_metrics, ref_preds = reference if reference is not None else (metrics, preds)
    delta = 100.0 * (metrics["mIoU"] - ref_metrics["mIoU"])
    agreement = pixel_agreement(preds, ref_preds)
    return {
        "variant": variant, "mIoU": 100.0 * metrics["mIoU"], "mAcc": 100.0 * metrics["mAcc"],
        "aAcc": 100.0 * metrics["aAcc"], "delta_mIoU": delta, "agreement": agreement,
        "meets": "yes" if abs(delta) <= MAX_DELTA_MIOU and agreement >= MIN_AGREEMENT else "no",
        "seconds": seconds, "note": note,
    }


# -- the int8 variants ----------------------------------------------------------------------------------

def reference_path(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ViL layers run their reference path (``ViLLayer.reference_forward``: one call
    of each projection module, the same chunkwise cell), not the fused CPU path.

    The fused path reads the projection weights as plain tensors (it concatenates, slices and folds them):
    torchao's Int8Tensor implements none of that, and in an ONNX export of it ``proj_up`` is no longer a
    MatMul by a weight, so onnxruntime's quantiser cannot see it. Both int8 backends need the module calls.
    """
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "reference_forward"):
            module.forward = module.reference_forward
    return model.eval()


def torchao_int8(model: nn.Module, names: Sequence[str] = PROJECTIONS) -> nn.Module:
    """A copy of ``model`` on the reference path (:func:`reference_path`) whose ``nn.Linear`` layers named
    ``*.<name>`` (default: the ViL layers' up and down projections, most of the encoder's GEMM work) hold
    int8 weights and quantise their input per token at run time (torchao's
    ``Int8DynamicActivationInt8WeightConfig``); an empty ``names`` takes every Linear."""
    require("torchao", "the int8-torchao rows")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    def chosen(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and (not names or fqn.rsplit(".", 1)[-1] in names)

    model = reference_path(model)
    quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=chosen)
    return model


def export_onnx(model: nn.Module, meta: dict[str, Any], path: Path, tile: int, batch: int,
                reference: bool = False) -> Path:
    """The project's ONNX export (``seglstm export --format onnx``) for ``batch x C x tile x tile``;
    ``reference``: of the model on its reference path (:func:`reference_path`)."""
    from seglstm.inference.export import export_segmentor

    return export_segmentor(reference_path(model) if reference else model, meta, path, tile=tile, batch=batch)


def onnx_int8(src: Path, out: Path, per_channel: bool = False) -> Path:
    """``quantize_dynamic`` of an exported file: int8 weights of the MatMul / Gemm ops by a constant weight,
    their other input quantised at run time (uint8, onnxruntime's default for dynamic quantisation)."""
    require("onnxruntime", "the int8-onnx rows")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, out, op_types_to_quantize=["MatMul", "Gemm"], per_channel=per_channel,
                     weight_type=QuantType.QInt8)
    return out


@contextlib.contextmanager
def network(task: Any, forward: Callable[[torch.Tensor], torch.Tensor] | nn.Module) -> Iterator[None]:
    """Run ``task``'s evaluation with ``forward`` as the segmentor's network pass (``encode_decode``), keeping
    its inference modes (whole/slide, test-time augmentation) and everything around them."""
    if isinstance(forward, nn.Module):  # a quantised copy of the whole segmentor
        saved, task.model = task.model, forward
        try:
            yield
        finally:
            task.model = saved
        return
    task.model.encode_decode = forward  # instance attribute: shadows the method
    try:
        yield
    finally:
        del task.model.encode_decode


def eval_tile(task: Any, batches: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """(tile, batch) a fixed-shape export must take: the slide window, or the val images' (square) size."""
    cfg = task.model._merge_test_cfg(task.model.test_cfg, dict(task.test_cfg))
    if cfg.get("scales") or cfg.get("flip"):
        raise SystemExit("the ONNX variants need a test_cfg without scales/flip (one input size)")
    if cfg["mode"] == "slide":
        crop = cfg["crop_size"]
        h, w = (crop, crop) if isinstance(crop, int) else crop
    else:
        shapes = {tuple(b["image"].shape[2:]) for b in batches}
        if len(shapes) != 1:
            raise SystemExit(f"the ONNX variants need one val image size, got {sorted(shapes)}")
        ((h, w),) = shapes
    if h != w:
        raise SystemExit(f"the ONNX export takes square tiles, the val inputs are {h}x{w}")
    return h, max(len(b["image"]) for b in batches)


# -- the measurement ------------------------------------------------------------------------------------

def measure(task: Any, batches: Sequence[dict[str, Any]], variants: Sequence[str], work: Path,
            per_channel: bool = False) -> list[dict[str, Any]]:
    """One row per variant; fp32 always runs first (every other row is compared with it)."""
    from seglstm.utils.device import cpu_has_native_bf16

    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    metrics, preds, seconds = evaluate(task, batches)
    reference = (metrics, preds)
    rows = [result_row("fp32", metrics, preds, seconds, None, "pytorch, baseline")]
    exports: dict[bool, Path] = {}  # reference path or not -> fp32 ONNX file
    for variant in [v for v in variants if v != "fp32"]:
        note, autocast, forward = "", None, None
        try:
            if variant == "bf16":
                autocast = torch.bfloat16
                note = "native bf16 (AVX512-BF16/AMX)" if cpu_has_native_bf16() else "EMULATED: no native bf16"
            elif variant == "int8-torchao":
                torchao = require("torchao", "the int8-torchao row")

                forward, note = torchao_int8(task.model), f"torchao {torchao.__version__}, reference path"
            else:
                ort = require("onnxruntime", "the ONNX rows")

                from seglstm.inference.scene.onnx import OnnxSegmentor

                ref_path = variant.endswith("-ref")
                if ref_path not in exports:
                    tile, batch = eval_tile(task, batches)
                    meta = {**task.meta, "model": task.hparams.model}
                    if "mean" not in meta or "std" not in meta:
                        raise ValueError("the checkpoint records no normalisation (mean/std) for the ONNX file")
                    name = "reference.onnx" if ref_path else "model.onnx"
                    exports[ref_path] = export_onnx(task.model, meta, work / name, tile, batch, ref_path)
                path = exports[ref_path]
                if variant != "onnx-fp32":
                    path = onnx_int8(path, work / f"{variant}.onnx", per_channel)
                forward = OnnxSegmentor(path)
                note = (f"onnxruntime {ort.__version__}{', reference path' if ref_path else ''}"
                        f"{', per channel' if per_channel and variant != 'onnx-fp32' else ''}, "
                        f"{path.stat().st_size / 2**20:.1f} MiB")
            with network(task, forward) if forward is not None else contextlib.nullcontext():
                metrics, preds, seconds = evaluate(task, batches, autocast)
            rows.append(result_row(variant, metrics, preds, seconds, reference, note))
        except Exception as err:  # a backend that cannot run this model is a result too
            message = f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            print(f"{variant}: {message}", file=sys.stderr)
            rows.append({"variant": variant, "note": message})
    return rows


def _display(row: dict[str, Any]) -> dict[str, Any]:
    """The row as printed: metrics with 2 decimals (mmseg prints percent so), the delta and the agreement with 3."""
    digits = {"mIoU": 2, "mAcc": 2, "aAcc": 2, "delta_mIoU": 3, "agreement": 3, "seconds": 1}
    return {k: f"{v:.{digits[k]}f}" if k in digits and isinstance(v, float) else v for k, v in row.items()}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/demo", help="a `seglstm fit` run folder (default: make demo's)")
    p.add_argument("--ckpt", default=None, help="checkpoint (default RUN/checkpoints/last.ckpt)")
    p.add_argument("--data-root", default=None, help="dataset root, when it moved since training")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--per-channel", action="store_true", help="per-channel int8 weights in the ONNX variants")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    task, dm = load_run(args.run, args.ckpt, args.data_root)
    batches = load_batches(dm)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as work:
        rows = measure(task, batches, args.variants, Path(work), args.per_channel)
    load_after = os.getloadavg()
    text = print_table([_display(r) for r in rows], COLUMNS)
    n_images = sum(len(b["image"]) for b in batches)
    note = (f"{args.run}: {n_images} val images, {args.threads} threads; load average before "
            f"{load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    print(note)
    write_json(args.out, {
        "benchmark": "precision_accuracy", "config": vars(args), "machine": machine_info(), "rows": rows,
        "criterion": {"max_delta_mIoU_points": MAX_DELTA_MIOU, "min_agreement_percent": MIN_AGREEMENT},
        "load_average": {"before": list(load_before), "after": list(load_after)}, "table": text, "note": note,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
