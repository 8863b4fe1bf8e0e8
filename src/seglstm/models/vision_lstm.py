"""Import path kept for existing code: the ViL encoder now lives in ``seglstm.models.vil``."""

from seglstm.models.vil import ViLBlock, ViLLayer, VisionLSTM, checkpoint_filter_fn, resample_pos_embed

__all__ = ["ViLBlock", "ViLLayer", "VisionLSTM", "checkpoint_filter_fn", "resample_pos_embed"]
