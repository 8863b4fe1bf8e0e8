"""The ViL layer's submodules (docs/design.md, section 3); their forward methods are the reference forward
of the layer, step by step in the token-major layout (B, S, C), that the fused path is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seglstm.models.vil.dispatch import Backend, KernelChoice, mlstm


class OffsetLayerNorm(nn.Module):
    """LayerNorm without bias whose stored weight is an offset from 1 (ViL's ``residual_weight``)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), weight=1.0 + self.weight, eps=self.eps)


class MultiHeadGroupNorm(nn.Module):
    """Per-head normalisation of the cell output (a layer norm over each head's DH features); weight
    stored as an offset from 1, no bias."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.num_heads = num_heads
        self.eps = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, NH, S, DH) cell output -> normalised (B, S, e)."""
        h = F.layer_norm(h, (h.shape[-1],), eps=self.eps)
        return h.transpose(1, 2).flatten(-2) * (1.0 + self.weight)


class BlockDiagonalLinear(nn.Module):
    """Linear map made of independent ``block x block`` matrices over consecutive feature groups."""

    def __init__(self, dim: int, block_size: int) -> None:
        super().__init__()
        if dim % block_size:
            raise ValueError(f"dim {dim} is not divisible by qkv_block_size {block_size}")
        self.block_size = block_size
        self.weight = nn.Parameter(torch.empty(dim // block_size, block_size, block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim): block b maps features b*bs .. (b+1)*bs - 1 by weight[b] (out, in)."""
        x = x.unflatten(-1, (-1, self.block_size))  # (..., nb, d_in)
        return torch.einsum("...hd,hod->...ho", x, self.weight).flatten(-2)


class CausalConv1d(nn.Module):
    """Depthwise causal convolution along the token sequence (left padding kernel-1)."""

    def __init__(self, dim: int, kernel_size: int = 4) -> None:
        super().__init__()
        self.pad = kernel_size - 1
        self.conv = nn.Conv1d(dim, dim, kernel_size, groups=dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, C) -> (B, S, C); output t sees inputs t - kernel + 1 .. t."""
        x = F.pad(x.transpose(1, 2), (self.pad, 0))
        return self.conv(x).transpose(1, 2)


class MLSTMCell(nn.Module):
    """Gates + the mLSTM recurrence + per-head output norm (docs/design.md, sections 3 and 4)."""

    def __init__(self, inner_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.igate = nn.Linear(3 * inner_dim, num_heads)
        self.fgate = nn.Linear(3 * inner_dim, num_heads)
        self.outnorm = MultiHeadGroupNorm(inner_dim, num_heads)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.fgate.weight)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))
        nn.init.zeros_(self.igate.weight)
        nn.init.normal_(self.igate.bias, std=0.1)
        nn.init.zeros_(self.outnorm.weight)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        backend: Backend = "chunkwise",
        chunk_size: int = 64,
        kernel: KernelChoice = "auto",
    ) -> torch.Tensor:
        """(B, S, e) queries, keys, values -> normalised cell output (B, S, e)."""
        qkv = torch.cat([q, k, v], dim=-1)  # the gates read all three
        i, f = self.igate(qkv).transpose(1, 2), self.fgate(qkv).transpose(1, 2)  # (B, NH, S) each

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, S, e) -> (B, NH, S, DH)
            return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        h = mlstm(heads(q), heads(k), heads(v), i, f, backend=backend, chunk_size=chunk_size, kernel=kernel)
        return self.outnorm(h)
