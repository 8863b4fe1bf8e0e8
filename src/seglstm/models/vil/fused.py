"""The fused path of the ViL layer: the function of ``ViLLayer.reference_forward`` in a feature-major
layout with folded weights, in place and in scratch buffers without autograd.

Feature-major (B, channels, S): the GEMMs then read and write their operands without transposes, the
causal convolution runs in PyTorch's native Conv1d layout, the gate pre-activations come from weights
folded through the block-diagonal projections (and, for the value path, through ``proj_up``), and the
output norm absorbs the cell's division by its normaliser. With autograd, and always on CUDA, every step is
one batched call (launches do not grow with batch or heads); CPU inference loops over the batch (and
heads) where that keeps GEMM results contiguous (measured faster there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from seglstm.models.vil import kernels
from seglstm.models.vil.dispatch import mlstm
from seglstm.models.vil.mlstm import chunk_length, chunkwise_feature_major, normaliser
from seglstm.models.vil.workspace import scratch

if TYPE_CHECKING:
    from seglstm.models.vil.layer import ViLLayer
    from seglstm.models.vil.modules import MultiHeadGroupNorm


def fused_forward(layer: ViLLayer, x: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
    """The layer (B, S, d) -> (B, S, d) with any cell but Triton's, in float32 with autocast off (see
    ``ViLLayer.forward``); ``amp``: the dtype of the two projections' GEMM operands, or None."""
    if layer.reverse:
        return _flip_tokens(_scan(layer, _flip_tokens(x, "layer.flip_in"), amp), "layer.flip_out")
    return _scan(layer, x, amp)


def _scan(layer: ViLLayer, x: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
    """The layer in its own scan order."""
    bsz, seq, _ = x.shape
    cell = layer.mlstm_cell
    nh, e = cell.num_heads, layer.learnable_skip.shape[0]
    dh = e // nh
    inplace = not torch.is_grad_enabled()
    chunkwise = layer.mlstm_backend == "chunkwise"
    chunk = chunk_length(seq, layer.chunk_size)
    pad = (-seq) % chunk if chunkwise else 0
    if pad:  # exact for the kept tokens: conv and cell are causal
        x = F.pad(x, (0, 0, 0, pad))
    sp = x.shape[1]

    # Gates read concat(q, k, v) with q, k, v block-diagonal maps of a and x_m, and x_m = proj_up(x):
    # fold those maps into the gate weights so the gates cost two skinny GEMMs (on a and on the block
    # input) and no GEMM reads q, k or v.
    w_gates = torch.cat([cell.igate.weight, cell.fgate.weight])  # (2 NH, 3e)
    wq, wk, wv = w_gates.chunk(3, dim=1)
    w_a = _fold_block_diag(wq, layer.q_proj.weight) + _fold_block_diag(wk, layer.k_proj.weight)
    w_x = _fold_block_diag(wv, layer.v_proj.weight) @ layer.proj_up.weight[:e]
    x_t = x.transpose(1, 2)
    # CPU inference under autocast: the activations outside the cell stay in the autocast dtype (no casts
    # back and forth around the projections); the cell's inputs are float32 as always.
    keep = amp is not None and _cpu_inference(x)
    xa_t = _cast(x, amp, "layer.x_amp").transpose(1, 2) if keep else x_t
    up = _left_matmul(layer.proj_up.weight, xa_t, "layer.up", amp)  # (B, 2e, S), in amp when kept
    x_m, z = up.chunk(2, dim=1)
    x_m = _cast(x_m, x.dtype, "layer.x_m")
    a = F.silu(_causal_conv(x_m, layer.conv1d.conv.weight, layer.conv1d.conv.bias), inplace)
    gate_bias = torch.cat([cell.igate.bias, cell.fgate.bias]).unsqueeze(-1)
    gates = torch.baddbmm(torch.matmul(w_x, x_t) + gate_bias, w_a.expand(bsz, -1, -1), a)  # (B, 2 NH, S)
    i, f = gates.chunk(2, dim=1)

    if chunkwise:
        # q and k only meet in dot products q_t . k_s (intra-chunk scores, and through the states), and
        # both are block-diagonal maps of a: q_t . k_s = a_t . (Wq^T Wk a_s) blockwise. So the kernel gets
        # q = a and k = (scaled Wq^T Wk) a, one projection instead of two.
        w_qk = torch.matmul(layer.q_proj.weight.transpose(1, 2), layer.k_proj.weight) * dh**-0.5
        k = _block_diag_matmul(w_qk, a, "layer.k").view(bsz, nh, dh, sp)
        v1 = _values_with_ones(layer.v_proj.weight, x_m, nh)
        out, m = chunkwise_feature_major(a.view(bsz, nh, dh, sp), k, v1, i, f, chunk_size=chunk)
        num, den = out.split([dh, 1], dim=2)  # (B, NH, DH | 1, NC, L)
        chunks = num.shape[3:]
        if kernels.enabled(num):  # norm, skip and gate in one pass, into a feature-major h for one output GEMM
            h = scratch("layer.h", (bsz, e, sp), up)
            a, z = (t.view(bsz, nh, dh, *chunks) for t in (a, z))
            args = (num, den, m.unsqueeze(2), a, z, cell.outnorm.weight, cell.outnorm.eps, layer.learnable_skip)
            kernels.run(kernels.norm_skip_gate, *args, h.view(bsz, nh, dh, *chunks))
            out = _cast(_tokens_matmul(h, layer.proj_down.weight, "layer.down", amp), x.dtype, "layer.out")
            return out[:, :seq] if pad else out
        nrm = normaliser(den, m.unsqueeze(2), eps=1e-6)  # the output norm absorbs the cell's division
    else:  # the parallel and recurrent cells, on token-major views of the same q, k, v
        q, k, v = (
            _block_diag_matmul(proj.weight, t, key).view(bsz, nh, dh, sp).transpose(2, 3)
            for proj, t, key in (
                (layer.q_proj, a, "layer.q"), (layer.k_proj, a, "layer.k"), (layer.v_proj, x_m, "layer.v")
            )
        )  # fmt: skip
        h = mlstm(q, k, v, i, f, backend=layer.mlstm_backend, kernel=layer.mlstm_kernel)
        num, nrm = h.transpose(2, 3).unsqueeze(3), None  # one "chunk" of S tokens
    h = _normalise_feature_major(cell.outnorm, num, nrm, inplace)
    a, z = (t.view(bsz, nh, dh, *num.shape[3:]) for t in (a, z))
    h = _skip_and_gate(h, a, z, layer.learnable_skip, inplace)
    out = _heads_matmul(h, layer.proj_down.weight, "layer.down", amp)  # (B, S, d)
    return out[:, :seq] if pad else out


def _normalise_feature_major(
    norm: MultiHeadGroupNorm, num: torch.Tensor, nrm: torch.Tensor | None, inplace: bool
) -> torch.Tensor:
    """``norm`` applied to h = num / nrm given as (B, NH, DH, ...) (tokens in the trailing dims), without
    forming h.

    Layer norm over DH of num / nrm equals (num - mean) / sqrt(var + eps * nrm**2) with mean and var
    taken over num: the cell's division folds into the norm's per-token scale.

    Args:
        num: (B, NH, DH, ...) numerator (any strides); overwritten when ``inplace``.
        nrm: (B, NH, 1, ...) positive divisor, or None for h = num.
    Returns:
        num's shape, normalised output times the per-channel weight (1 + stored).
    """
    nh, dh = num.shape[1:3]
    scale = (1.0 + norm.weight).view(nh, dh, *[1] * (num.ndim - 3))
    mean = num.sum(2, keepdim=True).div_(dh)
    cen = num.sub_(mean) if inplace else num - mean
    sq = torch.mul(cen, cen, out=scratch("norm.sq", cen.shape, cen)) if inplace else cen * cen
    var = sq.sum(2, keepdim=True).div_(dh)
    var = var.add_(norm.eps) if nrm is None else torch.addcmul(var, nrm, nrm, value=norm.eps)
    if inplace:
        return cen.mul_(var.rsqrt_()).mul_(scale)
    return cen * var.rsqrt() * scale


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


def _cast(t: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
    """t in ``dtype``, same layout if contiguous; into a scratch buffer without autograd on the CPU."""
    if t.dtype == dtype:
        return t
    if not _cpu_inference(t):
        return t.to(dtype)
    return scratch(key, t.shape, t.new_empty((), dtype=dtype)).copy_(t)


def _tokens_matmul(h: torch.Tensor, weight: torch.Tensor, key: str, amp: torch.dtype | None) -> torch.Tensor:
    """Output projection of feature-major h (B, e, S) -> (B, S, d) in h's dtype: one GEMM per image on
    h's transpose (BLAS reads it in place); the weight in ``amp`` when given (h is then in ``amp``)."""
    w = weight.t() if amp is None else weight.t().to(amp)
    out = scratch(key, (h.shape[0], h.shape[2], w.shape[1]), h)
    for b in range(h.shape[0]):
        torch.mm(h[b].t(), w, out=out[b])
    return out


def _heads_matmul(h: torch.Tensor, weight: torch.Tensor, key: str, amp: torch.dtype | None) -> torch.Tensor:
    """Output projection of chunked per-head h (B, NH, DH, NC, L) -> (B, NC * L, d) in h's dtype, the
    GEMM's operands in ``amp`` when given (h may be stored chunk-major, with gaps between heads)."""
    bsz, nh, dh, nc, length = h.shape
    dtype = h.dtype
    if amp is not None:
        h, weight = h.to(amp), weight.to(amp)
    if not _cpu_inference(h):
        # One token-major copy of h, then one GEMM over all heads. The copy's gradient is handed back in h's
        # own layout: as the copy's (token-major) layout, every elementwise backward step before it ran on
        # mismatched strides (a quarter of a ViL block's training step on the CPU).
        tokens = _GradLikeInput.apply(h).permute(0, 3, 4, 1, 2).reshape(bsz * nc * length, nh * dh)
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


class _GradLikeInput(torch.autograd.Function):
    """Identity whose backward returns the gradient with the input's strides."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.layout = (x.shape, x.stride())
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        shape, stride = ctx.layout
        return torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device).copy_(grad)


def _skip_and_gate(
    h: torch.Tensor, a: torch.Tensor, z: torch.Tensor, skip: torch.Tensor, inplace: bool
) -> torch.Tensor:
    """(h + skip * a) * silu(z) on (B, NH, DH, ...) views."""
    skip = skip.view(*h.shape[1:3], *[1] * (h.ndim - 3))
    if inplace:
        return h.addcmul_(a, skip).mul_(F.silu(z, inplace=True))
    return torch.addcmul(h, a, skip) * F.silu(z)
