"""The output norm, skip and output gate of the ViL layer (docs/design.md, section 3, steps 7-8) as one pure
function, ``norm_skip_gate``, that every path runs: eagerly with autograd and on CUDA, and for CPU inference
compiled by Inductor into one C++/OpenMP loop nest (one read of every input, one write of the output, where
eager PyTorch makes a pass over memory per operator; 3x faster at 1024x1024). The causal convolution
compiled the same way was slower than eager (its shifted reads do not vectorise), so it stays eager.

Compiled only where it pays and can be built: CPU tensors without autograd, at least ``MIN_ELEMENTS`` per
call (a tile-sized input; small ones would pay a compile per shape for microseconds), and a C++
compiler on the PATH (Inductor's CPU backend writes and builds C++). ``SEGLSTM_INDUCTOR=0`` turns it off
and ``=1`` forces it on (tests); the default is ``auto``. Shapes are static: every new input shape
compiles once (seconds, cached on disk by Inductor across processes), which suits tiled scene inference,
where every tile has the same shape. A failed compile warns, naming the kernel and shapes, and that call
runs the same function eagerly (nothing is switched off for later calls).
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

MIN_ELEMENTS = 1 << 18  # vil_s at 512x512: 768 x 1024 per layer
_MODES = ("auto", "0", "1")


def _mode() -> str:
    mode = os.environ.get("SEGLSTM_INDUCTOR", "auto").strip().lower()
    if mode not in _MODES:
        raise ValueError(f"SEGLSTM_INDUCTOR must be one of {_MODES}, got {mode!r}")
    return mode


@functools.cache
def _have_compiler() -> bool:
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return any(shutil.which(n) for n in names)


def enabled(x: torch.Tensor) -> bool:
    """Whether the fused kernels run for activations like ``x`` (module docstring)."""
    mode = _mode()
    if mode == "0" or not x.is_cpu or torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # exports trace the eager path
        return False
    return mode == "1" or (x.numel() >= MIN_ELEMENTS and _have_compiler())


def norm_skip_gate(
    num: torch.Tensor,
    nrm: torch.Tensor | None,
    a: torch.Tensor,
    z: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_eps: float,
    skip: torch.Tensor,
) -> torch.Tensor:
    """(outnorm(num / nrm) + skip * a) * silu(z) on (B, NH, DH, ...) views (tokens in the trailing dims), the
    norm over DH, in float32 (or wider); ``nrm`` (B, NH, 1, ...) the cell's positive divisor, None for 1.

    The cell's division folds into the norm: a layer norm over DH of num / nrm equals
    (num - mean) / sqrt(var + eps * nrm**2) with mean and var taken over num, so h = num / nrm is never formed.
    """
    nh, dh = num.shape[1:3]
    shape = (nh, dh, *[1] * (num.ndim - 3))
    cen = num - num.mean(2, keepdim=True)
    var = cen.square().mean(2, keepdim=True)
    var = var + norm_eps if nrm is None else var + norm_eps * nrm.square()
    h = cen * torch.rsqrt(var) * (1.0 + norm_weight.view(shape))
    return torch.addcmul(h, skip.view(shape), a) * F.silu(z.to(h.dtype))


def norm_skip_gate_into(out: torch.Tensor, *args: object) -> None:
    """``out.copy_(norm_skip_gate(*args))``: the form Inductor compiles (it writes straight into ``out``)."""
    out.copy_(norm_skip_gate(*args))


def _signature(args: tuple) -> str:
    return ", ".join(f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else repr(t) for t in args)


@functools.cache
def _compiled(fn: Callable[..., None]) -> Callable[..., None]:
    return torch.compile(fn, dynamic=False, fullgraph=True)


def run(fn: Callable[..., None], *args: object) -> None:
    """``fn(*args)``: through Inductor when ``enabled`` for the first tensor argument, eagerly otherwise;
    on a build failure a warning and ``fn`` eagerly."""
    tensor = next(t for t in args if isinstance(t, torch.Tensor))
    if not enabled(tensor):
        fn(*args)
        return
    try:
        _compiled(fn)(*args)
    except Exception as err:  # compile and build failures all surface here; decided per call
        warnings.warn(
            f"fused kernel {fn.__name__} could not be compiled for ({_signature(args)}): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; this call runs it in "
            "eager PyTorch (SEGLSTM_INDUCTOR=0 skips the attempt)",
            RuntimeWarning,
            stacklevel=2,
        )
        fn(*args)
