"""Inference beyond the training loop: whole-scene GeoTIFF segmentation (``scene``)."""

from seglstm.inference.scene import (
    SceneError,
    ScenePredictor,
    SceneResult,
    plan_strips,
    plan_tiles,
    predict_scene,
    window_weight,
)

__all__ = [
    "SceneError",
    "ScenePredictor",
    "SceneResult",
    "plan_strips",
    "plan_tiles",
    "predict_scene",
    "window_weight",
]
