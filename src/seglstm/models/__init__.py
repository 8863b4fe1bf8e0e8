"""Encoders, necks, decode heads and segmentors. Importing this package registers every preset."""

from seglstm.models.registry import create_encoder, create_model, list_encoders, list_models

__all__ = ["create_encoder", "create_model", "list_encoders", "list_models"]
