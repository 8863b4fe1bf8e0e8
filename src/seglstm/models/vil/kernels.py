"""Fused elementwise kernels for CPU inference: pure functions of the fused path's memory-bound steps, each
compiled by Inductor into one C++/OpenMP loop nest (one read of every input, one write of the output,
where eager PyTorch makes a pass over memory per operator). One step pays today: the output norm with the
skip and the output gate (docs/design.md, section 3, steps 7-8), 3x faster than its eager in-place
passes at 1024x1024; the causal convolution compiled was slower than eager (its shifted reads do not
vectorise), so it stays eager.

Used only where they pay and can be built: CPU tensors without autograd, at least ``MIN_ELEMENTS`` per
call (a tile-sized input; small ones would pay a compile per shape for microseconds), and a C++
compiler on the PATH (Inductor's CPU backend writes and builds C++). ``SEGLSTM_INDUCTOR=0`` turns them off
and ``=1`` forces them on (tests); the default is ``auto``. Shapes are static: every new input shape
compiles once (seconds, cached on disk by Inductor across processes), which suits tiled scene inference,
where every tile has the same shape. A failed compile warns, naming the kernel and shapes, and that call
runs the eager path (nothing is switched off for later calls).
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from seglstm.models.vil.mlstm import normaliser

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
    den: torch.Tensor,
    m: torch.Tensor,
    a: torch.Tensor,
    z: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_eps: float,
    skip: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """out = (groupnorm(num / normaliser(den, m)) + skip * a) * silu(z) on (B, NH, DH, ...) views, the norm
    over DH (docs/design.md, section 3, steps 7-8), in float32; ``out`` may have a narrower dtype."""
    nh, dh = num.shape[1:3]
    shape = (nh, dh, *[1] * (num.ndim - 3))
    h = num / normaliser(den, m, eps=1e-6)
    cen = h - h.mean(2, keepdim=True)
    h = cen * torch.rsqrt(cen.square().mean(2, keepdim=True) + norm_eps) * (1.0 + norm_weight.view(shape))
    out.copy_((h + skip.view(shape) * a) * F.silu(z.float()))


def _signature(args: tuple) -> str:
    return ", ".join(f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else repr(t) for t in args)


@functools.cache
def _compiled(fn: Callable[..., None]) -> Callable[..., None]:
    return torch.compile(fn, dynamic=False, fullgraph=True)


def run(fn: Callable[..., None], *args: object) -> None:
    """``fn(*args)`` through Inductor; on a build failure a warning and ``fn`` in eager mode."""
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
