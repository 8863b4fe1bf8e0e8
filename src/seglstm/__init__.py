"""seglstm: semantic segmentation of remotely sensed images with Vision-LSTM encoders."""

from seglstm.models import create_encoder, create_model, list_encoders, list_models, load_pretrained

__version__ = "0.1.0"
__all__ = ["create_encoder", "create_model", "list_encoders", "list_models", "load_pretrained"]
