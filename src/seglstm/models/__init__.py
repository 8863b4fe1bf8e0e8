"""Encoders, necks, decode heads and segmentors. Importing this package registers every preset."""

# Importing these modules runs their @register_* decorators: vil_* and vmamba_* encoders, seglstm_* and the
# comparison segmentors.
from seglstm.models import comparison, mamba, seglstm, vil  # noqa: F401
from seglstm.models.checkpoint import CheckpointMismatchError, LoadReport, load_pretrained
from seglstm.models.registry import create_encoder, create_model, list_encoders, list_models
from seglstm.models.vil import VisionLSTM

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
