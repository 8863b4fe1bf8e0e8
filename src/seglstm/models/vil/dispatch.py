"""Chooses the mLSTM implementation per call (backend, kernel, device, autograd) and fixes the state precision:
``mlstm()`` is the one entry point (docs/design.md, section 4).

- ``chunkwise``: linear in S; the default. Our kernel (``seglstm.models.vil.mlstm``) on CPU and for
  training; on CUDA without autograd mlstm_kernels' Triton kernel (``kernel="auto"``). Training never runs
  through Triton: the hand-written backward passes of ``mlstm_kernels`` (Triton and ``*_custbw``) are not
  the gradient of the formula, so ``kernel="triton"`` refuses to train. With ``TRITON_INTERPRET=1``,
  ``kernel="triton"`` runs the Triton kernels on CPU tensors through Triton's interpreter (the GPU code
  path, for tests). A Triton failure is decided per call: ``auto`` warns naming the shape and runs our
  kernel for that call, ``triton`` raises; nothing is switched off for later calls.
- ``parallel``: the quadratic form the seed runs (``seglstm.models.vil.mlstm.parallel``, the reference the
  other kernels are tested against).
- ``recurrent``: step by step (``mlstm_kernels`` ``native_sequence__native``); slow, a reference.

Precision: whatever autocast is active, the cell runs in float32 (float64 stays float64) with autocast
switched off: the gates, stabiliser, cumulative sums and state updates need float32's range and
resolution, and the chunk GEMMs accumulate the states. ``mlstm`` returns h in that state dtype.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Literal

import torch

from seglstm.models.vil import backends
from seglstm.models.vil.mlstm import chunkwise, parallel

Backend = Literal["chunkwise", "parallel", "recurrent"]
KernelChoice = Literal["auto", "native", "triton"]
BACKENDS: tuple[str, ...] = ("chunkwise", "parallel", "recurrent")
KERNELS: tuple[str, ...] = ("auto", "native", "triton")


def wants_triton(x: torch.Tensor, kernel: KernelChoice) -> bool:
    """Whether the chunkwise backend would hand tensors like ``x`` to the Triton kernel.

    ``triton``: on CUDA, or on any device under Triton's interpreter. ``auto``: on CUDA without autograd.
    """
    if kernel not in KERNELS:
        raise ValueError(f"mlstm_kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "triton":
        return x.is_cuda or backends.triton_interpreted()
    return kernel == "auto" and x.is_cuda and not torch.is_grad_enabled()


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``device_type``; a no-op where torch has no autocast (``meta``, used to count
    FLOPs without arithmetic)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def state_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the cell's state math for inputs like ``x``: float32 at least (float64 stays)."""
    return torch.promote_types(x.dtype, torch.float32)


def _chunkwise(q, k, v, i, f, *, chunk_size: int, eps: float, kernel: KernelChoice) -> torch.Tensor:
    if not wants_triton(q, kernel):
        return chunkwise(q, k, v, i, f, chunk_size=chunk_size, eps=eps)
    try:
        return backends.triton_chunkwise(q, k, v, i, f, chunk_size=chunk_size, eps=eps)
    except backends.TritonTrainingError:
        raise
    except Exception as err:  # import, compile and launch failures all surface here; decided per call
        where = f"q of shape {tuple(q.shape)}, v of shape {tuple(v.shape)}, {q.dtype}"
        if kernel == "triton":
            raise RuntimeError(f"mLSTM Triton kernel failed for {where}: {type(err).__name__}: {err}") from err
        warnings.warn(
            f"mLSTM Triton kernel failed for {where} ({type(err).__name__}: {err}); this call runs the "
            "PyTorch chunkwise kernel",
            RuntimeWarning,
            stacklevel=3,
        )
        return chunkwise(q, k, v, i, f, chunk_size=chunk_size, eps=eps)


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
        kernel: kernel choice for ``chunkwise`` (see ``wants_triton``); ``native`` on CPU unless Triton
            runs its interpreter.
    Returns:
        h: (B, NH, S, D) in ``state_dtype(q)``, whatever autocast is active.
    """
    if backend not in BACKENDS:
        raise ValueError(f"mlstm_backend must be one of {BACKENDS}, got {backend!r}")
    dtype = state_dtype(q)
    with autocast_off(q.device.type):
        q, k, v, i, f = (t.to(dtype) for t in (q, k, v, i, f))
        if backend == "chunkwise":
            return _chunkwise(q, k, v, i, f, chunk_size=chunk_size, eps=eps, kernel=kernel).to(dtype)
        if backend == "parallel":
            return parallel(q, k, v, i, f, eps=eps)
        return backends.recurrent(q, k, v, i, f, eps=eps)
