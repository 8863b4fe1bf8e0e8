"""mLSTM cell backends: one call signature over the kernels of ``mlstm_kernels``.

Every backend computes the same function (DESIGN.md section 2, parallel form):

    h = mlstm(q, k, v, i, f)   with q, k, v: (B, NH, S, D) and i, f: (B, NH, S)

- ``chunkwise``: linear in S; the default. Native PyTorch on CPU. On CUDA the Triton kernel serves
  inference (outputs agree with the formula) while training keeps the native autograd kernel, because the
  hand-written backward passes of ``mlstm_kernels`` do not match the gradient of the formula (measured in
  DESIGN.md). ``kernel="triton"`` forces Triton for training too.
- ``parallel``: the quadratic form the seed runs.
- ``recurrent``: step by step; slow, the reference for tests.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from mlstm_kernels.torch import get_mlstm_kernel, get_mlstm_sequence_kernel

Backend = Literal["chunkwise", "parallel", "recurrent"]
KernelChoice = Literal["auto", "native", "triton"]
BACKENDS: tuple[str, ...] = ("chunkwise", "parallel", "recurrent")

_TRITON_CHUNKWISE = "chunkwise--triton_xl_chunk"
_NATIVE_CHUNKWISE = "chunkwise--native_autograd"


@functools.cache
def _kernel(name: str) -> Callable:
    return get_mlstm_kernel(name)


_triton_fn: Callable | None = None
_triton_off = False


def _disable_triton(err: BaseException) -> None:
    global _triton_off
    _triton_off = True
    warnings.warn(
        f"mLSTM Triton kernel unavailable ({type(err).__name__}: {err}); using the native PyTorch chunkwise "
        "kernel on CUDA from now on",
        RuntimeWarning,
        stacklevel=4,
    )


def _chunkwise(q, k, v, i, f, *, chunk_size: int, eps: float, kernel: KernelChoice) -> torch.Tensor:
    global _triton_fn
    seq = q.shape[2]
    use_triton = q.is_cuda and (kernel == "triton" or (kernel == "auto" and not torch.is_grad_enabled()))
    if use_triton and not _triton_off:
        try:  # import and compile failures both surface here, on the first call
            _triton_fn = _triton_fn or get_mlstm_kernel(_TRITON_CHUNKWISE)
            return _call_padded(_triton_fn, q, k, v, i, f, chunk_size=max(chunk_size, 64), eps=eps, seq=seq)
        except Exception as err:
            _disable_triton(err)
    return _call_padded(_kernel(_NATIVE_CHUNKWISE), q, k, v, i, f, chunk_size=chunk_size, eps=eps, seq=seq)


def _call_padded(fn: Callable, q, k, v, i, f, *, chunk_size: int, eps: float, seq: int) -> torch.Tensor:
    # The chunkwise kernels need S % chunk == 0. Padding at the end is exact for the kept outputs because
    # the recurrence is causal: token t never sees tokens after it.
    chunk = min(chunk_size, _next_pow2(seq))
    pad = (-seq) % chunk
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        i, f = (F.pad(t, (0, pad)) for t in (i, f))
    h = fn(q=q, k=k, v=v, i=i, f=f, chunk_size=chunk, eps=eps, autocast_kernel_dtype=q.dtype)
    return h[:, :, :seq] if pad else h


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


def mlstm(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    backend: Backend = "chunkwise",
    chunk_size: int = 64,
    eps: float = 1e-6,
    kernel: KernelChoice = "auto",
) -> torch.Tensor:
    """Run the mLSTM cell over whole sequences.

    Args:
        q, k, v: (B, NH, S, D) queries, keys, values (q is scaled by D**-0.5 inside).
        i, f: (B, NH, S) input and forget gate pre-activations.
        backend: ``chunkwise`` (linear), ``parallel`` (quadratic, the seed's) or ``recurrent``.
        chunk_size: chunk length of the chunkwise form (rounded down to the sequence's power of two).
        kernel: CUDA kernel choice for ``chunkwise``; ignored on CPU.
    Returns:
        h: (B, NH, S, D).
    """
    if backend == "chunkwise":
        return _chunkwise(q, k, v, i, f, chunk_size=chunk_size, eps=eps, kernel=kernel)
    if backend == "parallel":
        return _kernel("parallel--native_autograd")(q=q, k=k, v=v, i=i, f=f, eps=eps)
    if backend == "recurrent":
        return get_mlstm_sequence_kernel("native_sequence__native")(
            q=q, k=k, v=v, i=i, f=f, eps=eps, dtype_state=q.dtype
        )
    raise ValueError(f"mlstm_backend must be one of {BACKENDS}, got {backend!r}")
