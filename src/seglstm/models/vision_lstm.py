"""Vision-LSTM (ViL) encoder as Seg-LSTM uses it: patch embedding, a learned 2-D position table and
stages of mLSTM blocks that alternate their scan direction, returning one 1/16 map per stage.

Parameter names follow the seed's mmseg checkpoints (``patch_embed.proj``, ``pos_embed.embed``,
``blocks1`` .. ``blocksN``, ``layer.mlstm_cell.igate`` ...), so those load without renaming; the
Vision-LSTM v1 classification checkpoints (``blocks.{i}``) go through ``checkpoint_filter_fn``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from seglstm.models.mlstm import (
    BACKENDS,
    Backend,
    KernelChoice,
    chunk_length,
    chunkwise_feature_major,
    mlstm,
    normaliser,
    scratch,
    state_dtype,
    wants_triton,
    workspace,
)
from seglstm.models.registry import register_encoder

__all__ = ["ViLBlock", "ViLLayer", "VisionLSTM", "checkpoint_filter_fn"]


class OffsetLayerNorm(nn.Module):
    """LayerNorm without bias whose stored weight is an offset from 1 (ViL's ``residual_weight``)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), weight=1.0 + self.weight, eps=self.eps)


class MultiHeadGroupNorm(nn.Module):
    """Per-head normalisation of the cell output; weight stored as an offset, no bias."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.num_heads = num_heads
        self.eps = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, NH, S, DH) cell output -> normalised (B, S, e)."""
        h = F.layer_norm(h, (h.shape[-1],), eps=self.eps)
        return h.transpose(1, 2).flatten(-2) * (1.0 + self.weight)

    def normalise_feature_major(
        self, num: torch.Tensor, nrm: torch.Tensor | None = None, inplace: bool = False
    ) -> torch.Tensor:
        """Normalise h = num / nrm given as (B, NH, DH, ...) (tokens in the trailing dims), without forming h.

        Layer norm over DH of num / nrm equals (num - mean) / sqrt(var + eps * nrm**2) with mean and var
        taken over num: the cell's division folds into the norm's per-token scale.

        Args:
            num: (B, NH, DH, ...) numerator (any strides); overwritten when ``inplace``.
            nrm: (B, NH, 1, ...) positive divisor, or None for 1.
        Returns:
            num's shape, normalised output times the per-channel weight (1 + stored).
        """
        nh, dh = num.shape[1:3]
        scale = (1.0 + self.weight).view(nh, dh, *[1] * (num.ndim - 3))
        mean = num.sum(2, keepdim=True).div_(dh)
        cen = num.sub_(mean) if inplace else num - mean
        sq = torch.mul(cen, cen, out=scratch("norm.sq", cen.shape, cen)) if inplace else cen * cen
        var = sq.sum(2, keepdim=True).div_(dh)
        var = var.add_(self.eps) if nrm is None else torch.addcmul(var, nrm, nrm, value=self.eps)
        if inplace:
            return cen.mul_(var.rsqrt_()).mul_(scale)
        return cen * var.rsqrt() * scale


class BlockDiagonalLinear(nn.Module):
    """Linear map made of independent ``block x block`` matrices over consecutive feature groups."""

    def __init__(self, dim: int, block_size: int) -> None:
        super().__init__()
        if dim % block_size:
            raise ValueError(f"dim {dim} is not divisible by qkv_block_size {block_size}")
        self.block_size = block_size
        self.weight = nn.Parameter(torch.empty(dim // block_size, block_size, block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unflatten(-1, (-1, self.block_size))  # (..., nb, d_in)
        return torch.einsum("...hd,hod->...ho", x, self.weight).flatten(-2)


class CausalConv1d(nn.Module):
    """Depthwise causal convolution along the token sequence (left padding kernel-1)."""

    def __init__(self, dim: int, kernel_size: int = 4) -> None:
        super().__init__()
        self.pad = kernel_size - 1
        self.conv = nn.Conv1d(dim, dim, kernel_size, groups=dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, S, C) -> (B, S, C)
        x = F.pad(x.transpose(1, 2), (self.pad, 0))
        return self.conv(x).transpose(1, 2)


class MLSTMCell(nn.Module):
    """Gates + the mLSTM recurrence + per-head output norm."""

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
        backend: Backend,
        chunk_size: int,
        kernel: KernelChoice,
    ) -> torch.Tensor:
        """(B, S, e) queries, keys, values -> normalised cell output (B, S, NH, DH)."""
        # Gates read concat(q, k, v); three skinny matmuls on the weight's column blocks give the same
        # pre-activations without materialising the (B, S, 3e) concatenation.
        w = torch.cat([self.igate.weight, self.fgate.weight])  # (2 NH, 3e)
        wq, wk, wv = w.chunk(3, dim=1)
        gates = (
            F.linear(q, wq, torch.cat([self.igate.bias, self.fgate.bias])) + F.linear(k, wk) + F.linear(v, wv)
        )
        i, f = gates.transpose(1, 2).chunk(2, dim=1)  # (B, NH, S) each

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, S, e) -> (B, NH, S, DH)
            return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        h = mlstm(heads(q), heads(k), heads(v), i, f, backend=backend, chunk_size=chunk_size, kernel=kernel)
        return self.outnorm(h)


class ViLLayer(nn.Module):
    """The mLSTM layer of a ViL block (DESIGN.md section 2), scanning in one direction.

    The forward pass computes the same function as the step-by-step description but in a feature-major
    layout (B, channels, S): the GEMMs then read and write their operands without transposes, the causal
    convolution runs in PyTorch's native Conv1d layout, the gate pre-activations come from weights folded
    through the block-diagonal projections (and, for the value path, through ``proj_up``), and with the
    ``chunkwise`` backend the output norm absorbs the cell's division by its normaliser. Without autograd
    the elementwise steps run in place.
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
        amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        with torch.autocast(dev, enabled=False):
            x = x.to(state_dtype(self.proj_up.weight))
            if self.reverse:
                return _flip_tokens(self._scan(_flip_tokens(x, "layer.flip_in"), amp), "layer.flip_out")
            return self._scan(x, amp)

    def _scan(self, x: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
        """The layer in its own scan order: (B, S, d) -> (B, S, d); ``amp``: the projections' GEMM dtype."""
        bsz, seq, _ = x.shape
        cell = self.mlstm_cell
        nh, e = cell.num_heads, self.learnable_skip.shape[0]
        dh = e // nh
        inplace = not torch.is_grad_enabled()
        fused = self.mlstm_backend == "chunkwise" and not wants_triton(x, self.mlstm_kernel)
        chunk = chunk_length(seq, self.chunk_size)
        pad = (-seq) % chunk if fused else 0
        if pad:  # exact for the kept tokens: conv and cell are causal
            x = F.pad(x, (0, 0, 0, pad))
        sp = x.shape[1]

        # Gates read concat(q, k, v) with q, k, v block-diagonal maps of a and x_m, and x_m = proj_up(x):
        # fold those maps into the gate weights so the gates cost two skinny GEMMs (on a and on the block
        # input) and no GEMM reads q, k or v.
        w_gates = torch.cat([cell.igate.weight, cell.fgate.weight])  # (2 NH, 3e)
        wq, wk, wv = w_gates.chunk(3, dim=1)
        w_a = _fold_block_diag(wq, self.q_proj.weight) + _fold_block_diag(wk, self.k_proj.weight)
        w_x = _fold_block_diag(wv, self.v_proj.weight) @ self.proj_up.weight[:e]
        x_t = x.transpose(1, 2)
        up = _left_matmul(self.proj_up.weight, x_t, "layer.up", amp)  # (B, 2e, S)
        x_m, z = up.chunk(2, dim=1)
        a = F.silu(_causal_conv(x_m, self.conv1d.conv.weight, self.conv1d.conv.bias), inplace)
        gate_bias = torch.cat([cell.igate.bias, cell.fgate.bias]).unsqueeze(-1)
        gates = torch.baddbmm(torch.matmul(w_x, x_t) + gate_bias, w_a.expand(bsz, -1, -1), a)  # (B, 2 NH, S)
        i, f = gates.chunk(2, dim=1)

        if fused:
            # q and k only meet in dot products q_t . k_s (intra-chunk scores, and through the states), and
            # both are block-diagonal maps of a: q_t . k_s = a_t . (Wq^T Wk a_s) blockwise. So the kernel gets
            # q = a and k = (scaled Wq^T Wk) a, one projection instead of two.
            w_qk = torch.matmul(self.q_proj.weight.transpose(1, 2), self.k_proj.weight) * dh**-0.5
            k = _block_diag_matmul(w_qk, a, "layer.k").view(bsz, nh, dh, sp)
            v1 = _values_with_ones(self.v_proj.weight, x_m, nh)
            out, m = chunkwise_feature_major(a.view(bsz, nh, dh, sp), k, v1, i, f, chunk_size=chunk)
            num, den = out.split([dh, 1], dim=2)  # (B, NH, DH | 1, NC, L)
            nrm = normaliser(den, m.unsqueeze(2), eps=1e-6)
        else:
            q = _block_diag_matmul(self.q_proj.weight, a, "layer.q").view(bsz, nh, dh, sp)
            k = _block_diag_matmul(self.k_proj.weight, a, "layer.k").view(bsz, nh, dh, sp)
            v = _block_diag_matmul(self.v_proj.weight, x_m, "layer.v").view(bsz, nh, dh, sp)
            h = mlstm(
                q.transpose(2, 3),
                k.transpose(2, 3),
                v.transpose(2, 3),
                i,
                f,
                backend=self.mlstm_backend,
                chunk_size=self.chunk_size,
                kernel=self.mlstm_kernel,
            )
            num, nrm = h.transpose(2, 3).unsqueeze(3), None  # one "chunk" of S tokens
        tokens = num.shape[3:]  # (NC, L)
        h = cell.outnorm.normalise_feature_major(num, nrm, inplace=inplace)
        a, z = (t.view(bsz, nh, dh, *tokens) for t in (a, z))
        h = _skip_and_gate(h, a, z, self.learnable_skip, inplace)
        out = _heads_matmul(h, self.proj_down.weight, "layer.down", amp)  # (B, S, d)
        return out[:, :seq] if pad else out


def _flip_tokens(x: torch.Tensor, key: str) -> torch.Tensor:
    """x.flip(1), into a scratch buffer without autograd."""
    if torch.is_grad_enabled():
        return x.flip(1)
    rev = torch.arange(x.shape[1] - 1, -1, -1, device=x.device)
    return torch.index_select(x, 1, rev, out=scratch(key, x.shape, x))


def _causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise causal convolution of feature-major x (B, C, S) with a (C, 1, K) kernel."""
    taps = weight.shape[-1]
    if torch.is_grad_enabled():
        return F.conv1d(x, weight, bias, padding=taps - 1, groups=x.shape[1])[..., : x.shape[-1]]
    # Shifted multiply-adds into a scratch buffer: as fast as Conv1d here, without a fresh output.
    w = weight[:, 0]
    out = torch.addcmul(bias[:, None], x, w[:, -1:], out=scratch("layer.conv", x.shape, x))
    for shift in range(1, min(taps, x.shape[-1])):
        out[..., shift:].addcmul_(x[..., :-shift], w[:, taps - 1 - shift : taps - shift])
    return out


def _cpu_inference(x: torch.Tensor) -> bool:
    """Whether the CPU inference variants apply: scratch buffers and Python loops over the batch (and
    heads) that keep each GEMM's result contiguous (measured faster on the CPU). With autograd, and always
    on CUDA, every step is one batched call whose launch count does not grow with batch or heads."""
    return x.is_cpu and not torch.is_grad_enabled()


def _block_diag_matmul(weight: torch.Tensor, x: torch.Tensor, key: str) -> torch.Tensor:
    """Block-diagonal map of feature-major x: (B, e, S) -> (B, e, S), as one bmm over the blocks (memory
    bound; merging blocks into larger zero-padded ones was measured slower)."""
    nb, bs, _ = weight.shape
    if not _cpu_inference(x):
        return torch.matmul(weight, x.unflatten(1, (nb, bs))).flatten(1, 2)
    out = scratch(key, x.shape, x)
    for b in range(x.shape[0]):
        torch.bmm(weight, x[b].view(nb, bs, -1), out=out[b].view(nb, bs, -1))
    return out


def _values_with_ones(weight: torch.Tensor, x_m: torch.Tensor, nh: int) -> torch.Tensor:
    """v = block-diagonal map of x_m as (B, NH, DH + 1, S) with a row of ones under each head's values."""
    bsz, e, seq = x_m.shape
    dh = e // nh
    bs = weight.shape[1]
    if not _cpu_inference(x_m) or dh % bs:
        v = _block_diag_matmul(weight, x_m, "layer.v").view(bsz, nh, dh, seq)
        return torch.cat([v, v.new_ones(bsz, nh, 1, seq)], 2)
    w = weight.view(nh, dh // bs, bs, bs)
    v1 = scratch("layer.v1", (bsz, nh, dh + 1, seq), x_m)
    v1[:, :, dh].fill_(1.0)
    for b in range(bsz):
        xb = x_m[b].view(nh, dh // bs, bs, seq)
        for h in range(nh):
            torch.bmm(w[h], xb[h], out=v1[b, h, :dh].view(dh // bs, bs, seq))
    return v1


def _fold_block_diag(w_gate: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Gate weight (G, e) applied after a block-diagonal map -> the equivalent weight on the map's input."""
    nb, bs, _ = weight.shape
    return torch.einsum("gbo,boi->gbi", w_gate.reshape(-1, nb, bs), weight).reshape(w_gate.shape[0], -1)


def _left_matmul(weight: torch.Tensor, x: torch.Tensor, key: str, amp: torch.dtype | None) -> torch.Tensor:
    """weight (P, K) @ x (B, K, S) -> (B, P, S) contiguous in x's dtype (torch.matmul would return a
    transposed view); the GEMM's operands in ``amp`` when given."""
    dtype = x.dtype
    if amp is not None:
        weight, x = weight.to(amp), x.to(amp)
    w = weight.expand(x.shape[0], -1, -1)
    if not _cpu_inference(x):
        return torch.bmm(w, x).to(dtype)
    out = torch.bmm(w, x, out=scratch(key, (x.shape[0], weight.shape[0], x.shape[2]), x))
    return out if amp is None else out.to(dtype)


def _heads_matmul(h: torch.Tensor, weight: torch.Tensor, key: str, amp: torch.dtype | None) -> torch.Tensor:
    """Output projection of chunked per-head h (B, NH, DH, NC, L) -> (B, NC * L, d) in h's dtype, the
    GEMM's operands in ``amp`` when given (h may be stored chunk-major, with gaps between heads)."""
    bsz, nh, dh, nc, length = h.shape
    dtype = h.dtype
    if amp is not None:
        h, weight = h.to(amp), weight.to(amp)
    if not _cpu_inference(h):  # one token-major copy of h, then one GEMM over all heads
        tokens = h.permute(0, 3, 4, 1, 2).reshape(bsz * nc * length, nh * dh)
        return torch.matmul(tokens, weight.t()).view(bsz, nc * length, -1).to(dtype)
    # CPU inference: per head one batched GEMM over the chunks, accumulated into a scratch buffer
    parts = [weight[:, j * dh : (j + 1) * dh].t().expand(nc, -1, -1) for j in range(nh)]
    out = scratch(key, (bsz, nc, length, weight.shape[0]), h)
    for b in range(bsz):
        for j in range(nh):
            lhs = h[b, j].permute(1, 2, 0)  # (NC, L, DH)
            if j:
                out[b].baddbmm_(lhs, parts[j])
            else:
                torch.bmm(lhs, parts[j], out=out[b])
    out = out.view(bsz, nc * length, -1)
    return out if amp is None else out.to(dtype)


def _skip_and_gate(
    h: torch.Tensor, a: torch.Tensor, z: torch.Tensor, skip: torch.Tensor, inplace: bool
) -> torch.Tensor:
    """(h + skip * a) * silu(z) on (B, NH, DH, ...) views."""
    skip = skip.view(*h.shape[1:3], *[1] * (h.ndim - 3))
    if inplace:
        return h.addcmul_(a, skip).mul_(F.silu(z, inplace=True))
    return torch.addcmul(h, a, skip) * F.silu(z)


class ViLBlock(nn.Module):
    """Pre-norm residual block: ``x + drop_path(layer(norm(x)))``."""

    def __init__(self, dim: int, reverse: bool, drop_path: float = 0.0, **layer_kwargs: Any) -> None:
        super().__init__()
        self.norm = OffsetLayerNorm(dim)
        self.layer = ViLLayer(dim, reverse=reverse, **layer_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.layer(self.norm(x)))


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        nn.init.xavier_uniform_(self.proj.weight.view(dim, -1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (B, Hp, Wp, C)


class PosEmbed2d(nn.Module):
    """Learned (1, Hp, Wp, C) table, resampled bicubically to whatever token grid arrives."""

    def __init__(self, grid: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.embed = nn.Parameter(torch.zeros(1, *grid, dim))
        trunc_normal_(self.embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + resample_pos_embed(self.embed, tuple(x.shape[1:3]))


def resample_pos_embed(embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resampling of a (1, H, W, C) position table to ``grid``; a no-op at the stored size."""
    if tuple(embed.shape[1:3]) == tuple(grid):
        return embed
    table = F.interpolate(embed.permute(0, 3, 1, 2), size=grid, mode="bicubic", align_corners=False)
    return table.permute(0, 2, 3, 1)


def _to_2tuple(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class VisionLSTM(nn.Module):
    """ViL encoder returning the token map after every stage, each (B, C, ceil(H/p), ceil(W/p)).

    Args:
        img_size: size the position table is stored for (the seed's 512 -> a 32x32 table); any input size
            runs, the table is resampled.
        depths: blocks per stage; block direction alternates inside each stage, restarting at 0.
        drop_path_rate: maximum stochastic-depth rate; ``drop_path_decay="linear"`` ramps it over blocks,
            ``"constant"`` uses it everywhere.
        mlstm_backend: ``chunkwise`` (linear time, default), ``parallel`` (the seed's quadratic form) or
            ``recurrent`` (reference).
        chunk_size: chunk length of the chunkwise kernel.
        mlstm_kernel: CUDA kernel choice, see ``seglstm.models.mlstm``.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 512,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depths: Sequence[int] = (6, 6, 6, 6),
        drop_path_rate: float = 0.0,
        drop_path_decay: str = "linear",
        expansion: int = 2,
        qkv_block_size: int = 4,
        conv_kernel_size: int = 4,
        num_heads: int = 4,
        mlstm_backend: Backend = "chunkwise",
        chunk_size: int = 64,
        mlstm_kernel: KernelChoice = "auto",
    ) -> None:
        super().__init__()
        img_size = _to_2tuple(img_size)
        if any(s % patch_size for s in img_size):
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        if not depths or any(int(d) < 1 for d in depths):
            raise ValueError(f"depths must be a non-empty sequence of positive ints, got {depths!r}")
        if drop_path_decay not in ("linear", "constant"):
            raise ValueError(f"drop_path_decay must be 'linear' or 'constant', got {drop_path_decay!r}")
        self.patch_size, self.embed_dim, self.depths = patch_size, embed_dim, tuple(int(d) for d in depths)
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.pos_embed = PosEmbed2d((img_size[0] // patch_size, img_size[1] // patch_size), embed_dim)

        total = sum(self.depths)
        if drop_path_decay == "linear":
            rates = [drop_path_rate * n / max(total - 1, 1) for n in range(total)]
        else:
            rates = [drop_path_rate] * total
        layer_kwargs = dict(
            expansion=expansion,
            qkv_block_size=qkv_block_size,
            conv_kernel_size=conv_kernel_size,
            num_heads=num_heads,
            mlstm_backend=mlstm_backend,
            chunk_size=chunk_size,
            mlstm_kernel=mlstm_kernel,
        )
        start = 0
        for s, depth in enumerate(self.depths):
            blocks = nn.ModuleList(
                ViLBlock(embed_dim, reverse=j % 2 == 1, drop_path=rates[start + j], **layer_kwargs)
                for j in range(depth)
            )
            self.add_module(f"blocks{s + 1}", blocks)
            start += depth
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks{s + 1}")
            for s in range(len(self.depths))
        ]

    @property
    def out_channels(self) -> list[int]:
        return [f["num_chs"] for f in self.feature_info]

    @property
    def stages(self) -> list[nn.ModuleList]:
        return [getattr(self, f"blocks{s + 1}") for s in range(len(self.depths))]

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed.embed"}

    def set_mlstm_backend(self, backend: Backend, chunk_size: int | None = None) -> None:
        """Switch every block's cell backend in place (weights unchanged)."""
        if backend not in BACKENDS:
            raise ValueError(f"mlstm_backend must be one of {BACKENDS}, got {backend!r}")
        for m in self.modules():
            if isinstance(m, ViLLayer):
                m.mlstm_backend = backend
                m.chunk_size = chunk_size or m.chunk_size

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Token maps after each stage as (B, Hp, Wp, C), channels last."""
        if x.ndim != 4:
            raise ValueError(f"expected a (B, C, H, W) image batch, got shape {tuple(x.shape)}")
        p = self.patch_size
        pad_h, pad_w = (-x.shape[2]) % p, (-x.shape[3]) % p
        if pad_h or pad_w:  # partial patches at the bottom/right see zeros; the grid is ceil(H/p) x ceil(W/p)
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.pos_embed(self.patch_embed(x))
        b, hp, wp, c = x.shape
        # The patch conv leaves the tokens channel-major: every LayerNorm would copy them and every residual
        # add would run strided. One copy here makes the whole trunk token-major.
        x = x.reshape(b, hp * wp, c).contiguous()
        outs = []
        if torch.is_grad_enabled() or self.training:
            for stage in self.stages:
                for block in stage:
                    x = block(x)
                outs.append(x.view(b, hp, wp, c))
            return outs
        # Inference: layers share scratch buffers, and residual sums after a stage's first block go in place
        # (the first one must not overwrite the previous stage's output).
        with workspace():
            for stage in self.stages:
                for j, block in enumerate(stage):
                    x = x.add_(block.layer(block.norm(x))) if j else block(x)
                outs.append(x.view(b, hp, wp, c))
        return outs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [t.permute(0, 3, 1, 2).contiguous() for t in self.forward_features(x)]


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: VisionLSTM) -> dict[str, torch.Tensor]:
    """Map a Vision-LSTM v1 classification checkpoint onto our stages, drop the classifier parts and
    resample the position table to the model's grid."""
    out: dict[str, torch.Tensor] = {}
    # flat block index -> (stage, index in stage)
    where = [(s, j) for s, d in enumerate(model.depths) for j in range(d)]
    dropped = ("legacy_norm.", "norm.", "head.", "cls_token")
    n_blocks = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")), default=-1)
    if n_blocks and n_blocks != len(where):
        raise ValueError(
            f"checkpoint has {n_blocks} blocks but the model has {len(where)} (depths {model.depths})"
        )
    for key, value in state_dict.items():
        if key.startswith(dropped):
            continue
        if key.startswith("blocks."):
            _, idx, rest = key.split(".", 2)
            s, j = where[int(idx)]
            key = f"blocks{s + 1}.{j}.{rest}"
        out[key] = value
    if "pos_embed.embed" in out:
        out["pos_embed.embed"] = resample_pos_embed(
            out["pos_embed.embed"], tuple(model.pos_embed.embed.shape[1:3])
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# presets


def _create_vil(default_dim: int, default_depths: tuple[int, ...], **overrides: Any) -> VisionLSTM:
    # Preset values are defaults: a user's embed_dim / depths override them instead of colliding.
    pretrained = overrides.pop("pretrained", None)
    kwargs: dict[str, Any] = dict(embed_dim=default_dim, depths=default_depths)
    kwargs.update(overrides)
    model = VisionLSTM(**kwargs)
    if pretrained:
        from seglstm.models.checkpoint import load_pretrained

        load_pretrained(model, pretrained, strict=True)
    return model


@register_encoder
def vil_t(**kwargs: Any) -> VisionLSTM:
    """ViL-T width (192), Seg-LSTM's (6,6,6,6) layout."""
    return _create_vil(192, (6, 6, 6, 6), **kwargs)


@register_encoder
def vil_s(**kwargs: Any) -> VisionLSTM:
    """ViL-S width (384), the seed encoder: 22.72 M parameters at a 512 input table."""
    return _create_vil(384, (6, 6, 6, 6), **kwargs)


@register_encoder
def vil_b(**kwargs: Any) -> VisionLSTM:
    """ViL-B width (768), (6,6,6,6) layout."""
    return _create_vil(768, (6, 6, 6, 6), **kwargs)


@register_encoder
def vil_t_44124(**kwargs: Any) -> VisionLSTM:
    """ViL-T width, (4,4,12,4) layout."""
    return _create_vil(192, (4, 4, 12, 4), **kwargs)


@register_encoder
def vil_s_44124(**kwargs: Any) -> VisionLSTM:
    """ViL-S width, (4,4,12,4) layout (the seed's second configuration)."""
    return _create_vil(384, (4, 4, 12, 4), **kwargs)


@register_encoder
def vil_b_44124(**kwargs: Any) -> VisionLSTM:
    """ViL-B width, (4,4,12,4) layout."""
    return _create_vil(768, (4, 4, 12, 4), **kwargs)
