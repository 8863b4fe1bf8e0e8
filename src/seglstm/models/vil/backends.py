"""The mlstm_kernels implementations behind ``mlstm()``'s call signature (B, NH, S, D): its Triton forward made
safe for every shape, and its recurrent kernel; ours are in ``seglstm.models.vil.mlstm``."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from mlstm_kernels.torch import get_mlstm_kernel, get_mlstm_sequence_kernel

from seglstm.errors import SeglstmError
from seglstm.models.vil.mlstm import chunk_length

_TRITON_CHUNKWISE = "chunkwise--triton_xl_chunk"
_TRITON_MIN_SEQ = 16  # the Triton kernels tile the sequence in blocks of at least 16 tokens


@functools.cache
def _kernel(name: str) -> Callable:
    return get_mlstm_kernel(name)


def triton_interpreted() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET=1``): Triton kernels then take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonTrainingError(SeglstmError, RuntimeError):
    """Raised when autograd would run through mlstm_kernels' Triton backward (wrong gradients)."""


def triton_head_dim(d: int) -> int:
    """The head dim the Triton kernels compute ``d`` in: ``d`` itself when they handle it (a power of two
    from 16, or a multiple of 64), else the next such size. mlstm_kernels 2.0.6 loads and stores the head
    dim in blocks of min(64, next_pow2(d)) without masks: d = 96 gives 38% error, d = 48 corrupts the heap.
    """
    if d % 64 == 0 or (d >= 16 and d & (d - 1) == 0):
        return d
    return max(16, 1 << (d - 1).bit_length()) if d < 64 else -(-d // 64) * 64


def triton_chunkwise(q, k, v, i, f, *, chunk_size: int, eps: float) -> torch.Tensor:
    """mlstm_kernels' Triton chunkwise forward on inputs padded to shapes it handles, cropped back.

    Zero rows at the end of the sequence are exact for the kept tokens (the recurrence is causal); zero
    columns in the head dim leave every q . k and the normaliser unchanged, and q is pre-scaled by
    sqrt(Dp / D) because the kernel scales q . k by Dp**-0.5 instead of D**-0.5.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, i, f)):
        raise TritonTrainingError(
            "mlstm_kernel='triton' cannot train: the Triton backward of mlstm_kernels 2.0.6 is not the "
            "gradient of the mLSTM (80-90% off for q, k, i, f); use mlstm_kernel='auto' (Triton for "
            "inference, the PyTorch chunkwise kernel with exact gradients for training)"
        )
    seq, d, dv = q.shape[2], q.shape[3], v.shape[3]
    dp, dvp = triton_head_dim(d), triton_head_dim(dv)
    # Below 128 tokens the kernel wants a power-of-two sequence of at least 16; above, multiples of 64.
    chunk = max(_TRITON_MIN_SEQ, chunk_length(seq, max(chunk_size, 64)))
    pad = (-seq) % chunk
    q = q.float() * (dp / d) ** 0.5
    q, k = (F.pad(t.float(), (0, dp - d, 0, pad)).contiguous() for t in (q, k))
    v = F.pad(v.float(), (0, dvp - dv, 0, pad)).contiguous()
    i, f = (F.pad(t.float(), (0, pad)).contiguous() for t in (i, f))
    h = _kernel(_TRITON_CHUNKWISE)(
        q=q, k=k, v=v, i=i, f=f, chunk_size=chunk, eps=eps, autocast_kernel_dtype=torch.float32
    )
    return h[:, :, :seq, :dv]


def recurrent(q, k, v, i, f, *, eps: float) -> torch.Tensor:
    """Token by token (mlstm_kernels' ``native_sequence__native``): slow, a reference."""
    return get_mlstm_sequence_kernel("native_sequence__native")(
        q=q, k=k, v=v, i=i, f=f, eps=eps, dtype_state=q.dtype
    )
