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
  window's softmax probabilities are multiplied by a separable Hann window with a floor and divided by
  the summed weights at flush time, so a pixel's result depends only on the windows covering it.
* ``outputs``: flushed rows go to compressed per-block-row chunk files in a partial directory beside the
  output, with a JSON progress sidecar; every ``--resume`` decision is made there.
* ``writers`` / ``vector``: the GeoTIFF (or COG), probabilities and preview are assembled from the chunks
  in one deterministic pass, and polygons are traced strip by strip from the class raster, so ``--resume``
  after Ctrl-C gives the same bytes as an uninterrupted run and final names only ever hold complete files.

Memory bound, whatever the scene size: ``buffer_mb`` (default 512 MiB; the strip buffer of
``(K + 1) x (tile + 256) x strip_width`` float32 plus one ``bands x tile x strip_width`` read, from which the
strip width is derived) + ``batch_size x (bands + K) x tile^2`` float32 for a batch's inputs and
probabilities + the model's own activations for that batch + GDAL's block cache (64 MiB) + for polygons
one 64 MiB strip of the class raster and the polygons crossing one strip border. Disk: the partial run
holds the compressed class (and probability) chunks until the products are assembled.
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
