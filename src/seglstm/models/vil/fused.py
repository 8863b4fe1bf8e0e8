"""The ViL layer's forward (``ViLLayer.forward``): the function of ``ViLLayer.reference_forward`` in a
feature-major layout with folded weights, one code path for every device, with and without autograd.

Feature-major (B, channels, S): the GEMMs then read and write their operands without transposes, the
causal convolution runs in PyTorch's native Conv1d layout, the gate pre-activations come from weights
folded through the block-diagonal projections (and, for the value path, through ``proj_up``). The cell is
our chunkwise kernel on feature-major operands (``seglstm.models.vil.mlstm``); the other cells (parallel,
recurrent, mlstm_kernels' Triton kernel) get token-major views of the same q, k, v through ``mlstm()``.
Steps 7-8 are ``kernels.norm_skip_gate`` (compiled for large CPU inference inputs).

Two variants of some steps, chosen by ``_cpu_inference``: with autograd, and always on CUDA, every step is
one batched call (launches do not grow with batch or heads); CPU inference writes into the layer's
``LayerBuffers`` (``seglstm.models.vil.workspace``) and loops over the batch (and heads) where that keeps
GEMM results contiguous (measured faster there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from seglstm.models.vil import kernels
from seglstm.models.vil.dispatch import mlstm, wants_triton
from seglstm.models.vil.mlstm import chunk_length, chunkwise_feature_major, normaliser
from seglstm.models.vil.workspace import Geometry, LayerBuffers, layer_buffers

if TYPE_CHECKING:
    from seglstm.models.vil.layer import ViLLayer


def fused_forward(layer: ViLLayer, x: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
    """The layer (B, S, d) -> (B, S, d), in float32 with autocast off (see ``ViLLayer.forward``); ``amp``: the
    dtype of the two projections' GEMM operands, or None. CPU inference runs in buffers claimed for the
    call; the result may be one of them (valid until the next layer call in the same workspace)."""
    native = layer.mlstm_backend == "chunkwise" and not wants_triton(x, layer.mlstm_kernel)
    seq = x.shape[1]
    chunk = chunk_length(seq, layer.chunk_size) if native else 0
    if not _cpu_inference(x):
        return _oriented(layer, x, amp, chunk, None)
    g = Geometry(
        batch=x.shape[0],
        tokens=seq,
        seq=seq + (-seq) % chunk if chunk else seq,
        dim=x.shape[2],
        inner=layer.learnable_skip.shape[0],
        heads=layer.mlstm_cell.num_heads,
        chunk=chunk,
        dtype=x.dtype,
        act=amp if amp is not None else x.dtype,
        device=x.device,
    )
    with layer_buffers(g).claim(g) as buf:
        return _oriented(layer, x, amp, chunk, buf)


def _oriented(
    layer: ViLLayer, x: torch.Tensor, amp: torch.dtype | None, chunk: int, buf: LayerBuffers | None
) -> torch.Tensor:
    """The scan in the layer's direction: reverse layers flip the tokens before and after."""
    if not layer.reverse:
        return _scan(layer, x, amp, chunk, buf)
    x = _flip_tokens(x, buf.flip_in if buf else None)
    return _flip_tokens(_scan(layer, x, amp, chunk, buf), buf.flip_out if buf else None)


def _scan(
    layer: ViLLayer, x: torch.Tensor, amp: torch.dtype | None, chunk: int, buf: LayerBuffers | None
) -> torch.Tensor:
    """The layer in its own scan order; ``chunk``: the chunk length of our chunkwise cell, 0 for ``mlstm()``."""
    bsz, seq, _ = x.shape
    cell = layer.mlstm_cell
    nh, e = cell.num_heads, layer.learnable_skip.shape[0]
    dh = e // nh
    inplace = buf is not None
    pad = (-seq) % chunk if chunk else 0
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
    keep = amp is not None and inplace
    xa_t = _cast(x, amp, buf.x_act if buf else None).transpose(1, 2) if keep else x_t
    up = _left_matmul(layer.proj_up.weight, xa_t, amp, buf.up if buf else None)  # (B, 2e, S), amp when kept
    x_m, z = up.chunk(2, dim=1)
    x_m = _cast(x_m, x.dtype, buf.x_m if buf else None)
    a = F.silu(_causal_conv(x_m, layer.conv1d.conv.weight, layer.conv1d.conv.bias, buf), inplace)
    gate_bias = torch.cat([cell.igate.bias, cell.fgate.bias]).unsqueeze(-1)
    gates = torch.baddbmm(torch.matmul(w_x, x_t) + gate_bias, w_a.expand(bsz, -1, -1), a)  # (B, 2 NH, S)
    i, f = gates.chunk(2, dim=1)

    if chunk:
        # q and k only meet in dot products q_t . k_s (intra-chunk scores, and through the states), and
        # both are block-diagonal maps of a: q_t . k_s = a_t . (Wq^T Wk a_s) blockwise. So the kernel gets
        # q = a and k = (scaled Wq^T Wk) a, one projection instead of two.
        w_qk = torch.matmul(layer.q_proj.weight.transpose(1, 2), layer.k_proj.weight) * dh**-0.5
        k = _block_diag_matmul(w_qk, a, buf.k if buf else None).view(bsz, nh, dh, sp)
        v1 = _values_with_ones(layer.v_proj.weight, x_m, nh, buf)
        out, m = chunkwise_feature_major(
            a.view(bsz, nh, dh, sp), k, v1, i, f, chunk_size=chunk, buffers=buf.cell if buf else None
        )
        num, den = out.split([dh, 1], dim=2)  # (B, NH, DH | 1, NC, L)
        nrm = normaliser(den, m.unsqueeze(2), eps=1e-6)  # the output norm absorbs the cell's division
    else:  # the parallel, recurrent and Triton cells, on token-major views of the same q, k, v
        q, k, v = (
            _block_diag_matmul(proj.weight, t, out).view(bsz, nh, dh, sp).transpose(2, 3)
            for proj, t, out in (
                (layer.q_proj, a, buf.q if buf else None),
                (layer.k_proj, a, buf.k if buf else None),
                (layer.v_proj, x_m, buf.v if buf else None),
            )
        )  # fmt: skip
        h = mlstm(q, k, v, i, f, backend=layer.mlstm_backend, chunk_size=layer.chunk_size, kernel=layer.mlstm_kernel)
        num, nrm = h.transpose(2, 3).unsqueeze(3), None  # one "chunk" of S tokens
    chunks = num.shape[3:]
    a, z = (t.view(bsz, nh, dh, *chunks) for t in (a, z))
    args = (num, nrm, a, z, cell.outnorm.weight, cell.outnorm.eps, layer.learnable_skip)
    if buf is None:
        out = _heads_matmul(kernels.norm_skip_gate(*args), layer.proj_down.weight, amp)  # (B, S, d)
        return out[:, :seq] if pad else out
    # CPU inference: steps 7-8 in one pass into a feature-major h, then one output GEMM per image
    kernels.run(kernels.norm_skip_gate_into, buf.h.view(bsz, nh, dh, *chunks), *args)
    out = _cast(_tokens_matmul(buf.h, layer.proj_down.weight, amp, buf.down), x.dtype, buf.out)
    return out[:, :seq] if pad else out


def _flip_tokens(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """x.flip(1), into ``out`` when given."""
    if out is None:
        return x.flip(1)
    rev = torch.arange(x.shape[1] - 1, -1, -1, device=x.device)
    return torch.index_select(x, 1, rev, out=out)


def _causal_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, buf: LayerBuffers | None
) -> torch.Tensor:
    """Depthwise causal convolution of feature-major x (B, C, S) with a (C, 1, K) kernel."""
    taps = weight.shape[-1]
    if buf is None:
        return F.conv1d(x, weight, bias, padding=taps - 1, groups=x.shape[1])[..., : x.shape[-1]]
    # Shifted multiply-adds into a buffer: as fast as Conv1d here, without a fresh output.
    w = weight[:, 0]
    out = torch.addcmul(bias[:, None], x, w[:, -1:], out=buf.conv)
    for shift in range(1, min(taps, x.shape[-1])):
        out[..., shift:].addcmul_(x[..., :-shift], w[:, taps - 1 - shift : taps - shift])
    return out


def _cpu_inference(x: torch.Tensor) -> bool:
    """Whether the CPU inference variants apply: buffers and Python loops over the batch (and heads) that
    keep each GEMM's result contiguous (measured faster on the CPU). With autograd, and always on CUDA,
    every step is one batched call whose launch count does not grow with batch or heads."""
    return x.is_cpu and not torch.is_grad_enabled()


def _block_diag_matmul(weight: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Block-diagonal map of feature-major x: (B, e, S) -> (B, e, S), as one bmm over the blocks (memory
    bound; merging blocks into larger zero-padded ones was measured slower); per image into ``out``."""
    nb, bs, _ = weight.shape
    if out is None:
        return torch.matmul(weight, x.unflatten(1, (nb, bs))).flatten(1, 2)
    for b in range(x.shape[0]):
        torch.bmm(weight, x[b].view(nb, bs, -1), out=out[b].view(nb, bs, -1))
    return out


def _values_with_ones(weight: torch.Tensor, x_m: torch.Tensor, nh: int, buf: LayerBuffers | None) -> torch.Tensor:
    """v = block-diagonal map of x_m as (B, NH, DH + 1, S) with a row of ones under each head's values."""
    bsz, e, seq = x_m.shape
    dh = e // nh
    bs = weight.shape[1]
    if buf is None or dh % bs:
        v = _block_diag_matmul(weight, x_m, buf.v if buf else None).view(bsz, nh, dh, seq)
        return torch.cat([v, v.new_ones(bsz, nh, 1, seq)], 2)
    w = weight.view(nh, dh // bs, bs, bs)
    v1 = buf.v1
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


def _left_matmul(
    weight: torch.Tensor, x: torch.Tensor, amp: torch.dtype | None, out: torch.Tensor | None
) -> torch.Tensor:
    """weight (P, K) @ x (B, K, S) -> (B, P, S) contiguous (torch.matmul would return a transposed view), in
    x's dtype, the GEMM's operands in ``amp`` when given; into ``out`` (x's dtype) when given."""
    dtype = x.dtype
    if amp is not None:
        weight, x = weight.to(amp), x.to(amp)
    w = weight.expand(x.shape[0], -1, -1)
    if out is None:
        return torch.bmm(w, x).to(dtype)
    return torch.bmm(w, x, out=out)


def _cast(t: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """t in ``dtype``, same layout if contiguous; into ``out`` when given."""
    if t.dtype == dtype:
        return t
    return t.to(dtype) if out is None else out.copy_(t)


def _tokens_matmul(h: torch.Tensor, weight: torch.Tensor, amp: torch.dtype | None, out: torch.Tensor) -> torch.Tensor:
    """Output projection of feature-major h (B, e, S) -> (B, S, d) into ``out`` (h's dtype): one GEMM per image
    on h's transpose (BLAS reads it in place); the weight in ``amp`` when given (h is then in ``amp``)."""
    w = weight.t() if amp is None else weight.t().to(amp)
    for b in range(h.shape[0]):
        torch.mm(h[b].t(), w, out=out[b])
    return out


def _heads_matmul(h: torch.Tensor, weight: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
    """Output projection of chunked per-head h (B, NH, DH, NC, L) -> (B, NC * L, d) in h's dtype, the
    GEMM's operands in ``amp`` when given: one token-major copy of h, then one GEMM over all heads.

    The copy's gradient is handed back in h's own layout: as the copy's (token-major) layout, every
    elementwise backward step before it ran on mismatched strides (a quarter of a ViL block's training step
    on the CPU).
    """
    bsz, nh, dh, nc, length = h.shape
    dtype = h.dtype
    if amp is not None:
        h, weight = h.to(amp), weight.to(amp)
    tokens = _GradLikeInput.apply(h).permute(0, 3, 4, 1, 2).reshape(bsz * nc * length, nh * dh)
    return torch.matmul(tokens, weight.t()).view(bsz, nc * length, -1).to(dtype)


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
