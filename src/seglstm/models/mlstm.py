"""Import path kept for existing code: the mLSTM cell now lives in ``seglstm.models.vil`` (``mlstm`` the
math, ``dispatch`` the entry point)."""

from seglstm.models.vil.dispatch import (
    BACKENDS,
    KERNELS,
    Backend,
    KernelChoice,
    mlstm,
    state_dtype,
    wants_triton,
)
from seglstm.models.vil.mlstm import chunk_length, chunkwise_feature_major, normaliser

__all__ = [
    "BACKENDS",
    "KERNELS",
    "Backend",
    "KernelChoice",
    "chunk_length",
    "chunkwise_feature_major",
    "mlstm",
    "normaliser",
    "state_dtype",
    "wants_triton",
]
