"""Whole-scene inference: windowed reads, blended sliding windows, bounded memory, resumable.

A scene can be far larger than memory, so nothing here ever holds a full-resolution raster:

* ``plan``: the scene is cut into a fixed grid of ``tile x tile`` windows with ``overlap`` (mmseg's
  ``slide`` grid: the last window in each axis is snapped to the scene edge, so every window has the same
  shape and can be batched). Output columns are split into *strips* whose width is a multiple of the
  256-pixel GeoTIFF block.
* ``source`` / ``scaling``: windows are read through GDAL (local files, URLs, ``/vsi*``, STAC assets,
  optionally warped to another grid) and brought to the training scale and normalisation.
* ``blend``: a strip runs every window that touches it (windows straddling a strip border run once per
  strip, about one extra window column per strip) and blends them in a rolling buffer of ``tile + 256``
  rows; rows are flushed a 256-row block row at a time once no later window can reach them. Each
  window's softmax probabilities are multiplied by the blending weight (``plan.window_weight``) and
  divided by the summed weights at flush time, so a pixel's result depends only on the windows covering
  it. The normalisation, softmax, buffer, division and arg-max run as torch ops on the model's device:
  only raw windows go to it and only uint8 classes (and uint8 probabilities) come back.
* ``background``: a reader thread reads and stacks the next batches' windows while the model runs, and a
  writer thread compresses and writes the finished chunks, each behind a queue of two.
* ``outputs``: flushed rows go to compressed per-block-row chunk files in a partial directory beside the
  output, with a JSON progress sidecar (recorded after the chunks it counts); every ``--resume`` decision
  is made there.
* ``writers`` / ``vector``: the GeoTIFF (or COG), probabilities and preview are assembled from the chunks
  in one deterministic pass, and polygons are traced strip by strip from the class raster, so ``--resume``
  after Ctrl-C gives the same bytes as an uninterrupted run and final names only ever hold complete files.

Memory bound, whatever the scene size: ``buffer_mb`` (default 512 MiB) covers the strip buffer, on the
model's device (``(K + 1) x (tile + 256) x strip_width`` float32 and as many validity bytes), plus the
host's read of one row of windows (``bands x tile x strip_width``); the strip width is derived from it.
Beyond it: on the device, ``batch_size x (bands + K) x tile^2`` float32 for a batch's inputs and
probabilities and the model's own activations for that batch; on the host, at most four batches of raw
windows (``batch_size x bands x tile^2`` values, float32 unless the input is uint8, and their masks: one
being read, two queued, one going to the device), the finished uint8 chunks of one flush plus at most
three in the writer's hands, GDAL's block cache (64 MiB) and, for polygons, one 64 MiB strip of the class raster and the
polygons crossing one strip border. On a CPU the device is the host, so both shares add up there. Disk:
the partial run holds the compressed class (and probability) chunks until the products are assembled.
"""

from seglstm.inference.scene.errors import SceneError
from seglstm.inference.scene.outputs import PartialRun, Progress
from seglstm.inference.scene.plan import BLOCK, Strip, TileGrid, plan_strips, plan_tiles, window_weight
from seglstm.inference.scene.predictor import (
    ScenePredictor,
    SceneResult,
    _model_digest,
    predict_scene,
)
from seglstm.inference.scene.scaling import ScaleSpec, compute_scaling, parse_bands, parse_scale
from seglstm.inference.scene.source import InputOptions, SceneInput, open_input
from seglstm.inference.scene.vector import VectorSpec
from seglstm.inference.scene.writers import NODATA

__all__ = [
    "BLOCK",
    "NODATA",
    "InputOptions",
    "PartialRun",
    "Progress",
    "ScaleSpec",
    "SceneError",
    "SceneInput",
    "ScenePredictor",
    "SceneResult",
    "Strip",
    "TileGrid",
    "VectorSpec",
    "_model_digest",
    "compute_scaling",
    "open_input",
    "parse_bands",
    "parse_scale",
    "plan_strips",
    "plan_tiles",
    "predict_scene",
    "window_weight",
]
