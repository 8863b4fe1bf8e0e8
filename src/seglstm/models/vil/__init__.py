"""Vision-LSTM encoder and its mLSTM cell (docs/design.md, sections 2-4). Modules, in reading order:

- ``encoder``: ``VisionLSTM`` (patch embedding, position table, stages of blocks), presets, checkpoint filter
- ``layer``: ``ViLBlock`` and ``ViLLayer`` (the reference forward, the choice of path, precision policy)
- ``modules``: the layer's submodules, whose forwards make up the reference forward
- ``fused``: the fused CPU path of the layer, tested against the reference
- ``mlstm``: the mLSTM cell's math, chunkwise and stabilised, with its backward pass
- ``dispatch``: ``mlstm()``, which picks the implementation per call; ``backends``: the mlstm_kernels ones
- ``workspace``: scratch buffers for CPU inference
"""

from seglstm.models.vil.dispatch import BACKENDS, KERNELS, mlstm, wants_triton
from seglstm.models.vil.encoder import VisionLSTM, checkpoint_filter_fn, resample_pos_embed
from seglstm.models.vil.layer import ViLBlock, ViLLayer

__all__ = [
    "BACKENDS",
    "KERNELS",
    "ViLBlock",
    "ViLLayer",
    "VisionLSTM",
    "checkpoint_filter_fn",
    "mlstm",
    "resample_pos_embed",
    "wants_triton",
]
