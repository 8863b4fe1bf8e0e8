"""seglstm: semantic segmentation of remotely sensed images with Vision-LSTM encoders."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from seglstm.errors import SeglstmError  # no dependencies: ``except seglstm.SeglstmError`` costs nothing

__version__ = "0.1.0"

__all__ = ["SeglstmError", "create_encoder", "create_model", "list_encoders", "list_models", "load_pretrained"]
_MODEL_API = ("create_encoder", "create_model", "list_encoders", "list_models", "load_pretrained")
_SUBPACKAGES = ("cli", "config", "data", "inference", "metrics", "models", "study", "training", "utils")

if TYPE_CHECKING:
    from seglstm.models import create_encoder, create_model, list_encoders, list_models, load_pretrained


def __getattr__(name: str) -> Any:
    """The model API, imported on first use: ``import seglstm`` (and the ``seglstm`` console entry) must
    not load torch before the thread settings are in the environment (seglstm.utils.threads)."""
    if name in _MODEL_API:
        from seglstm import models

        return getattr(models, name)
    if name in _SUBPACKAGES:  # ``import seglstm; seglstm.models...`` keeps working
        return importlib.import_module(f"seglstm.{name}")
    raise AttributeError(f"module 'seglstm' has no attribute {name!r}")
