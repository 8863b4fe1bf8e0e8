"""Vision-LSTM encoder and its mLSTM cell (docs/design.md, sections 2-4). Modules, in reading order:

- ``encoder``: ``VisionLSTM`` (patch embedding, position table, stages of blocks), presets, checkpoint filter
- ``layer``: ``ViLBlock`` and ``ViLLayer`` (the reference forward step by step, the precision policy)
- ``modules``: the layer's submodules, whose forwards make up the reference forward
- ``fused``: the layer's forward, the one path that runs (every device, with and without autograd)
- ``kernels``: the output norm, skip and gate as one function, compiled for CPU inference
- ``mlstm``: the mLSTM cell's math: the stabilised parallel form (the reference) and the chunkwise form
- ``dispatch``: ``mlstm()``, which picks the cell per call; ``backends``: the mlstm_kernels ones
- ``workspace``: the named buffers of CPU inference
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
