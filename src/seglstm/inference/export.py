"""Export a segmentor for deployment: ONNX (run by onnxruntime, e.g. ``predict-scene --onnx``) or a
``torch.export`` program (``.pt2``), at a fixed tile and batch.

torch.onnx's exporter has no ONNX function for ``aten.cummax``, which the chunkwise mLSTM's stabiliser
uses over the chunk axis (``models/vil/mlstm.py``: ``(amax - G).cummax(-1)``); :func:`_cummax` supplies one as a
masked running maximum (``O(n^2)`` in the number of chunks, which is small: 16 for a 512 tile at patch 16).
The data facts inference needs (classes, palette, normalisation, tile, patch size) travel in the ONNX
file's metadata, so the file is all ``predict-scene`` needs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seglstm.config import META_KEY
from seglstm.inference.scene.plan import model_patch_size
from seglstm.utils.io import atomic_path
from seglstm.utils.optional import require

FORMATS = ("onnx", "pt2")


def _cummax(x, dim: int):
    """ONNX translation of ``aten.cummax`` (values, indices) along the last axis."""
    op = require("onnxscript", "ONNX export").opset18

    if dim not in (-1,):
        # the mLSTM only takes it over the last axis; a general axis would need a transpose first
        raise NotImplementedError(f"cummax over dim {dim}: only the last axis is supported")
    n = op.Squeeze(op.Shape(x, start=-1))
    idx = op.Range(op.Constant(value_int=0), n, op.Constant(value_int=1))
    earlier = op.LessOrEqual(op.Unsqueeze(idx, [0]), op.Unsqueeze(idx, [1]))  # [i, j]: j <= i
    masked = op.Where(earlier, op.Unsqueeze(x, [-2]), op.CastLike(op.Constant(value_float=float("-inf")), x))
    return op.ReduceMax(masked, [-1], keepdims=0), op.ArgMax(masked, axis=-1, keepdims=0, select_last_index=1)


def export_segmentor(
    model: nn.Module, meta: dict[str, Any], out: str | os.PathLike, *, tile: int, fmt: str = "onnx",
    batch: int = 4,
) -> Path:
    """Write ``model`` for ``batch x C x tile x tile`` inputs; returns the written path."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "onnx":  # torch.onnx's exporter writes through onnx and onnxscript
        require("onnx", "ONNX export")
        require("onnxscript", "ONNX export")
    patch = model_patch_size(model)
    if batch < 1:
        raise ValueError(f"--batch {batch} must be positive")
    if tile < 1 or (patch and tile % patch):
        raise ValueError(f"--tile {tile} must be a positive multiple of the model's patch size {patch}")
    model = model.eval()
    in_chans = len(meta["mean"])
    example = (torch.randn(batch, in_chans, tile, tile),)
    # A fixed batch: marked dynamic, the ViL segmentor's trace specialises it anyway (torch.export reports
    # "batch specialized to a constant") and the ONNX file then mixes the traced batch into other sizes.
    # OnnxSegmentor runs any number of tiles through a fixed-batch file, in chunks.
    facts = {k: meta[k] for k in ("classes", "palette", "mean", "std", "num_classes") if k in meta}
    facts.update(tile=tile, batch=batch, patch_size=patch, model=meta.get("model"))
    out = Path(out)
    with atomic_path(out) as tmp:
        if fmt == "pt2":
            program = torch.export.export(model, example)
            torch.export.save(program, tmp, extra_files={f"{META_KEY}.json": json.dumps(facts)})
        else:
            program = torch.onnx.export(
                model, example, dynamo=True, input_names=["image"], output_names=["logits"],
                custom_translation_table={torch.ops.aten.cummax.default: _cummax},
                verbose=False,
            )
            program.model.metadata_props[META_KEY] = json.dumps(facts)
            program.save(tmp, external_data=False)
    return out
