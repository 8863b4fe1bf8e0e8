"""The ViL layer and block (docs/design.md, section 3): the reference forward step by step, the forward that
runs (``seglstm.models.vil.fused``), and the precision policy under autocast."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from seglstm.models.vil.dispatch import (
    BACKENDS,
    Backend,
    KernelChoice,
    autocast_off,
    state_dtype,
)
from seglstm.models.vil.fused import fused_forward
from seglstm.models.vil.modules import BlockDiagonalLinear, CausalConv1d, MLSTMCell, OffsetLayerNorm


class ViLLayer(nn.Module):
    """The mLSTM layer of a ViL block, scanning in one direction (docs/design.md, section 3).

    ``reference_forward`` is the layer's math step by step through its submodules, the reference the fused
    path is tested against; ``forward`` runs the same function through the fused path
    (``seglstm.models.vil.fused``) on every device, with and without autograd.
    """

    def __init__(
        self,
        dim: int,
        reverse: bool,
        expansion: int = 2,
        qkv_block_size: int = 4,
        conv_kernel_size: int = 4,
        num_heads: int = 4,
        mlstm_backend: Backend = "chunkwise",
        chunk_size: int = 64,
        mlstm_kernel: KernelChoice = "auto",
    ) -> None:
        super().__init__()
        if mlstm_backend not in BACKENDS:
            raise ValueError(f"mlstm_backend must be one of {BACKENDS}, got {mlstm_backend!r}")
        inner = expansion * dim
        if inner % num_heads:
            raise ValueError(f"inner dim {inner} is not divisible by num_heads {num_heads}")
        self.dim, self.reverse = dim, reverse
        self.mlstm_backend, self.chunk_size, self.mlstm_kernel = mlstm_backend, chunk_size, mlstm_kernel
        self.proj_up = nn.Linear(dim, 2 * inner, bias=False)
        self.q_proj = BlockDiagonalLinear(inner, qkv_block_size)
        self.k_proj = BlockDiagonalLinear(inner, qkv_block_size)
        self.v_proj = BlockDiagonalLinear(inner, qkv_block_size)
        self.conv1d = CausalConv1d(inner, conv_kernel_size)
        self.mlstm_cell = MLSTMCell(inner, num_heads)
        self.learnable_skip = nn.Parameter(torch.ones(inner))
        self.proj_down = nn.Linear(inner, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        small = math.sqrt(2 / (5 * self.dim))
        for w in (self.proj_up.weight, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight):
            nn.init.normal_(w, std=small)
        nn.init.normal_(self.proj_down.weight, std=2 / math.sqrt(self.dim))
        self.conv1d.conv.reset_parameters()
        self.mlstm_cell.reset_parameters()
        nn.init.ones_(self.learnable_skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, d) -> (B, S, d) in float32 (or the input's wider dtype), under autocast too.

        Under autocast the two projections (``proj_up``, ``proj_down``: most of the layer's GEMM work
        outside the cell) take the autocast dtype; everything else (causal conv, gates, q/k/v, the cell,
        the norm) runs in float32 with autocast off, so no in-place or ``out=`` call ever mixes dtypes.
        """
        dev = x.device.type
        autocast = torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)
        amp = torch.get_autocast_dtype(dev) if autocast else None
        with autocast_off(dev):
            return fused_forward(self, x.to(state_dtype(self.proj_up.weight)), amp)

    def reference_forward(self, x: torch.Tensor, amp: torch.dtype | None = None) -> torch.Tensor:
        """docs/design.md, section 3, step by step: (B, S, d) -> (B, S, d). ``amp``: the dtype of the two
        projections' operands (call ``forward`` under autocast: it switches autocast off around this)."""
        if self.reverse:  # 1. this block scans bottom-right to top-left
            x = x.flip(1)
        x_m, z = _project(self.proj_up, x, amp).chunk(2, dim=-1)  # 2. up-projection, two branches
        a = F.silu(self.conv1d(x_m))  # 3. causal depthwise conv
        q, k, v = self.q_proj(a), self.k_proj(a), self.v_proj(x_m)  # 4. block-diagonal q, k, v
        h = self.mlstm_cell(q, k, v, self.mlstm_backend, self.chunk_size, self.mlstm_kernel)  # 5-6. cell, norm
        h = (h + self.learnable_skip * a) * F.silu(z)  # 7. skip and output gate
        out = _project(self.proj_down, h, amp)
        return out.flip(1) if self.reverse else out  # 8. back to image order


def _project(linear: nn.Linear, x: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
    """``linear(x)``, with the GEMM's operands in ``amp`` when given; the result in x's dtype."""
    if amp is None:
        return linear(x)
    return F.linear(x.to(amp), linear.weight.to(amp)).to(x.dtype)


class ViLBlock(nn.Module):
    """Pre-norm residual block: ``x + drop_path(layer(norm(x)))``.

    ``forward(x, inplace=True)`` adds the residual into x itself (inference, for a caller that owns x, such
    as the encoder's trunk after a stage's first block): no fresh tensor per block.
    """

    def __init__(self, dim: int, reverse: bool, drop_path: float = 0.0, **layer_kwargs: Any) -> None:
        super().__init__()
        self.norm = OffsetLayerNorm(dim)
        self.layer = ViLLayer(dim, reverse=reverse, **layer_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        if inplace and torch.is_grad_enabled():
            raise ValueError("ViLBlock(inplace=True) overwrites its input: only without autograd")
        out = self.drop_path(self.layer(self.norm(x)))
        return x.add_(out) if inplace else x + out
