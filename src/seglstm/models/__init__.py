"""Encoders, necks, decode heads and segmentors. Importing this package registers every preset."""

from seglstm.models import vision_lstm  # noqa: F401  (registers vil_* encoders)
from seglstm.models.checkpoint import CheckpointMismatchError, LoadReport, load_pretrained
from seglstm.models.registry import create_encoder, create_model, list_encoders, list_models
from seglstm.models.vision_lstm import VisionLSTM

__all__ = [
    "CheckpointMismatchError",
    "LoadReport",
    "VisionLSTM",
    "create_encoder",
    "create_model",
    "list_encoders",
    "list_models",
    "load_pretrained",
]
