"""mLSTM cell backends: one call signature over several implementations of one function.

Every backend computes the same function (DESIGN.md section 2, parallel form):

    h = mlstm(q, k, v, i, f)   with q, k, v: (B, NH, S, D) and i, f: (B, NH, S)

- ``chunkwise``: linear in S; the default. On CPU (and for CUDA training) it runs our own chunkwise kernel
  ``chunkwise_feature_major``: plain PyTorch, so autograd differentiates it, and organised so that all
  chunks' K^T V and Q C products are single batched GEMMs with only the D x D state recurrence left as a
  Python loop (mlstm_kernels' native kernel loops over chunks with one small bmm each and zero-fills an
  (NC+1) D x D state tensor). Its outputs and gradients are tested against ``mlstm_kernels``'
  ``parallel--native_autograd`` and ``chunkwise--native_autograd`` in float64. On CUDA the Triton kernel
  serves inference; training stays on our kernel because the hand-written backward passes of
  ``mlstm_kernels`` do not match the gradient of the formula (DESIGN.md). ``kernel="triton"`` forces Triton
  for training too.
- ``parallel``: the quadratic form the seed runs (``mlstm_kernels`` ``parallel--native_autograd``).
- ``recurrent``: step by step (``mlstm_kernels`` ``native_sequence__native``); slow, a reference.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from mlstm_kernels.torch import get_mlstm_kernel, get_mlstm_sequence_kernel

Backend = Literal["chunkwise", "parallel", "recurrent"]
KernelChoice = Literal["auto", "native", "triton"]
BACKENDS: tuple[str, ...] = ("chunkwise", "parallel", "recurrent")
KERNELS: tuple[str, ...] = ("auto", "native", "triton")

_TRITON_CHUNKWISE = "chunkwise--triton_xl_chunk"


@functools.cache
def _kernel(name: str) -> Callable:
    return get_mlstm_kernel(name)


_triton_fn: Callable | None = None
_triton_off = False


def _disable_triton(err: BaseException) -> None:
    global _triton_off
    _triton_off = True
    warnings.warn(
        f"mLSTM Triton kernel unavailable ({type(err).__name__}: {err}); using the PyTorch chunkwise kernel on "
        "CUDA from now on",
        RuntimeWarning,
        stacklevel=4,
    )


def wants_triton(x: torch.Tensor, kernel: KernelChoice) -> bool:
    """Whether the chunkwise backend would hand tensors like ``x`` to the Triton kernel."""
    if kernel not in KERNELS:
        raise ValueError(f"mlstm_kernel must be one of {KERNELS}, got {kernel!r}")
    return (
        x.is_cuda
        and not _triton_off
        and (kernel == "triton" or (kernel == "auto" and not torch.is_grad_enabled()))
    )


def chunk_length(seq: int, chunk_size: int) -> int:
    """Chunk length used for a sequence: ``chunk_size``, or less for short sequences (to limit padding)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    return min(chunk_size, _next_pow2(seq))


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


# ----------------------------------------------------------------------------------------------------------
# scratch buffers


class Workspace:
    """Scratch buffers that successive layers of one inference pass reuse.

    A fresh multi-megabyte tensor costs a page fault per 4 KiB page on first touch (about 1.5 us each on the
    benchmark VM): at 1024x1024 that was a quarter of a ViL block's time. Buffers taken from a workspace are
    valid until the same key is taken again, i.e. within one layer call.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, key: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffers[key] = like.new_empty(numel)
        return buf[:numel].view(shape)


_local = threading.local()


@contextlib.contextmanager
def workspace() -> Iterator[Workspace]:
    """Let ``scratch`` reuse buffers for the duration of the block (inference only; ignored under autograd)."""
    previous = getattr(_local, "workspace", None)
    _local.workspace = Workspace()
    try:
        yield _local.workspace
    finally:
        _local.workspace = previous


def scratch(key: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor: the active workspace's buffer for ``key`` when there is one and autograd is
    off, else a new one. ``key`` must be unique among the buffers alive at the same time."""
    ws = getattr(_local, "workspace", None)
    if ws is None or torch.is_grad_enabled():
        return like.new_empty(shape)
    return ws.take(key, tuple(shape), like)


# ----------------------------------------------------------------------------------------------------------
# our chunkwise kernel


def _chunks(t: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """(..., R, S) -> (..., NC, R, L): chunk views of a feature-major matrix, no copy."""
    return t.unflatten(-1, (num_chunks, -1)).transpose(-3, -2)


def _gemm_batches(bsz: int, nh: int, nc: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Selectors that turn (B, NH, NC, R, C) chunk views into the batches of one bmm call each.

    With several chunks, the (B, NH) dims of a strided chunk view do not merge without a copy, so there is
    one call per (b, h). With a single chunk (short sequences: small crops, training batches of many
    images) every view merges: one call for the whole batch instead of B * NH small ones.
    """
    if nc == 1:
        return [lambda t: t.flatten(0, 2)]
    return [lambda t, b=b, h=h: t[b, h] for b in range(bsz) for h in range(nh)]


# exp() of float32 arguments below about -87 gives denormals and takes a slow path (30x slower on this CPU);
# weights that small (< 2e-35 relative to the largest, which is 1) are below float32 resolution anyway.
_EXP_FLOOR = -80.0


def _exp(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return x.clamp_min_(_EXP_FLOOR).exp_() if inplace else x.clamp_min(_EXP_FLOOR).exp()


def _stabilisers(lf: torch.Tensor, i: torch.Tensor) -> dict[str, torch.Tensor]:
    """Log-space gate terms of every chunk, with the same max-stabilisers as mlstm_kernels' chunkwise kernel.

    lf, i: (B, NH, NC, L) log forget gates and input gate pre-activations.
    """
    cum = lf.cumsum(-1)  # b_l: log decay from the chunk start to token l (inclusive)
    g = cum[..., -1]  # log decay over the whole chunk
    # Differences of cumulative sums before adding i: |b| reaches hundreds when forget gates are near 0,
    # and i - b would round away the small i (mlstm_kernels orders the terms the same way).
    a = (g.unsqueeze(-1) - cum) + i  # log weight of token s in the state at the chunk end
    # State stabiliser m_k = max(g_k + m_{k-1}, max_s a_s) with m_{-1} = 0, i.e.
    # m_k = G_k + max(0, cummax_j (amax_j - G_j)) with G = cumsum(g). In float64 the G_k cancellation is
    # harmless (|G| < 1e5 -> error < 1e-11); m only has to be used consistently, not exactly.
    g64, amax64 = g.double(), a.amax(-1).double()
    big_g = g64.cumsum(-1)
    m_state = (big_g + (amax64 - big_g).cummax(-1).values.clamp_min(0.0)).to(lf.dtype)
    m_prev = F.pad(m_state[..., :-1], (1, 0))  # stabiliser of the state entering chunk k
    return dict(cum=cum, a=a, g=g, m_state=m_state, m_prev=m_prev)


def chunkwise_feature_major(
    q: torch.Tensor, k: torch.Tensor, v1: torch.Tensor, i: torch.Tensor, f: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise mLSTM on feature-major operands, returning the numerator, denominator and stabiliser.

    Feature-major (head dim before the sequence) lets the projections write their outputs straight into the
    layout the GEMMs read, and lets the denominator ride along as an extra row of ``v1``.

    Args:
        q, k: (B, NH, D, S); q already scaled by D**-0.5. Any strides with a unit stride on S or D.
        v1: (B, NH, Dv + 1, S), values with a last row of ones (it yields the denominator).
        i, f: (B, NH, S) gate pre-activations.
        chunk_size: chunk length L; S must be a multiple of it.
    Returns:
        out: (B, NH, Dv + 1, NC, L) chunked view, rows :Dv the stabilised numerator, row Dv the stabilised
            denominator (stored chunk-major: the sequence is not one stride).
        m: (B, NH, NC, L) the stabiliser; h = out[:, :, :Dv] / (max(|out[:, :, Dv]|, exp(-m)) + eps).
    """
    bsz, nh, _, seq = q.shape
    if seq % chunk_size:
        raise ValueError(f"sequence length {seq} is not a multiple of chunk_size {chunk_size}")
    nc, L = seq // chunk_size, chunk_size
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v1, i, f))

    st = _stabilisers(F.logsigmoid(f.reshape(bsz, nh, nc, L)), i.reshape(bsz, nh, nc, L))
    cum, m_prev = st["cum"], st["m_prev"].unsqueeze(-1)
    past = torch.ones(L, L, dtype=q.dtype, device=q.device).tril_()  # s <= l
    i = i.reshape(bsz, nh, nc, 1, L)
    if grad:
        log_d = (cum.unsqueeze(-1) - cum.unsqueeze(-2)) + (i + past.log())
    else:
        log_d = torch.sub(
            cum.unsqueeze(-1), cum.unsqueeze(-2), out=scratch("cell.log_d", (bsz, nh, nc, L, L), q)
        )
        log_d = log_d.add_(i).add_(past.log())  # (B, NH, NC, L, L): b_l - b_s + i_s, -inf for s > l
    m = torch.maximum(cum + m_prev, log_d.amax(-1))  # per-token stabiliser
    if grad:
        dmat = _exp(log_d - m.unsqueeze(-1)) * past
    else:  # the floor turns the -inf of future tokens into tiny weights: zero them again
        dmat = _exp(log_d.sub_(m.unsqueeze(-1)), inplace=True).mul_(past)
    sigma = _exp(cum + m_prev - m).view(bsz, nh, 1, seq)  # weight of the inter-chunk term
    w = _exp(st["a"] - st["m_state"].unsqueeze(-1)).view(bsz, nh, 1, seq)  # weight of k_s in its state
    decay = _exp(st["g"] + st["m_prev"] - st["m_state"])  # (B, NH, NC): state carry-over factor
    if grad:
        out = _ChunkwiseProducts.apply(q, k, v1, w, sigma, decay, dmat)
    else:
        out = _products(q, k, v1, w, sigma, decay, dmat, scratch)[0]
    return out.transpose(2, 3), m


def _fresh(key: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(shape)


def _products(q, k, v1, w, sigma, decay, dmat, alloc: Callable) -> tuple[torch.Tensor, ...]:
    """The GEMM part of the chunkwise form, given the gate weights (see ``_ChunkwiseProducts``).

    Runs bmm calls (per head, or one for all, see ``_gemm_batches``) on strided chunk views of the
    feature-major inputs (torch.matmul would copy the non-mergeable (B, NH, NC) batch) into contiguous chunk-major buffers from ``alloc``: with a contiguous
    result PyTorch hands the whole batch to one MKL batched GEMM, with a strided one it loops over
    single-matrix GEMMs, each a separate (and, under load, slow) thread synchronisation.
    Returns out (B, NH, NC, Dv1, L) and what the backward pass needs: the states entering chunks 1..,
    the raw scores Q^T K, the masked scores P, kg = k w and qs = q sigma.
    """
    bsz, nh, d, _ = q.shape
    dv1, nc, L = v1.shape[2], dmat.shape[2], dmat.shape[3]
    kg = torch.mul(k, w, out=alloc("cell.kg", k.shape, k))
    qs = torch.mul(q, sigma, out=alloc("cell.qs", q.shape, q))
    qc, kc, v1c, kgc, qsc = (_chunks(t, nc) for t in (q, k, v1, kg, qs))
    # States are kept as (Dv + 1, D) = V^T K: the inter-chunk product is then a plain NN GEMM.
    states = alloc("cell.states", (bsz, nh, nc, dv1, d), q)
    qk = alloc("cell.qk", (bsz, nh, nc, L, L), q)
    out = alloc("cell.out", (bsz, nh, nc, dv1, L), q)
    batches = _gemm_batches(bsz, nh, nc)
    for sel in batches:
        torch.bmm(sel(v1c), sel(kgc).transpose(1, 2), out=sel(states))
        torch.bmm(sel(qc).transpose(1, 2), sel(kc), out=sel(qk))
    per_chunk, carry = states.unbind(2), decay[..., None, None].unbind(2)  # views, indexed once
    for c in range(1, nc - 1):  # states[c] becomes the state after chunk c, i.e. entering chunk c + 1
        per_chunk[c].addcmul_(per_chunk[c - 1], carry[c])
    p = qk.mul_(dmat) if alloc is scratch else qk * dmat
    out[:, :, 0].zero_()  # no state enters the first chunk
    for sel in batches:
        if nc > 1:
            torch.bmm(sel(states)[:-1], sel(qsc)[1:], out=sel(out)[1:])
        sel(out).baddbmm_(sel(v1c), sel(p).transpose(1, 2))
    return out, states[:, :, :-1], qk, p, kg, qs


def _unchunk(t: torch.Tensor) -> torch.Tensor:
    """(B, NH, NC, R, L) -> (B, NH, R, NC * L), a copy."""
    return t.transpose(2, 3).flatten(3)


class _ChunkwiseProducts(torch.autograd.Function):
    """out = intra + inter chunk products of the chunkwise mLSTM, with a hand-written backward pass.

    Per chunk c (feature-major, columns are tokens): P_c = (Q_c^T K_c) * Dmat_c,
    E_0 = 0, E_{c+1} = V1_c (K_c w_c)^T + decay_c E_c, out_c = V1_c P_c^T + E_c (Q_c sigma_c).
    The backward runs the same batched GEMMs in reverse and the state recurrence backwards; autograd
    differentiates the small gate terms (w, sigma, decay, Dmat) that feed it. Checked against autograd
    through a direct implementation in float64 (tests/test_fast_paths.py).
    """

    @staticmethod
    def forward(ctx, q, k, v1, w, sigma, decay, dmat):
        out, entering, qk, p, kg, qs = _products(q, k, v1, w, sigma, decay, dmat, _fresh)
        ctx.save_for_backward(q, k, v1, w, sigma, decay, dmat, entering, qk, p, kg, qs)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v1, w, sigma, decay, dmat, entering, qk, p, kg, qs = ctx.saved_tensors
        bsz, nh, d, _ = q.shape
        dv1, nc, L = v1.shape[2], dmat.shape[2], dmat.shape[3]
        g = grad_out.contiguous()  # (B, NH, NC, Dv1, L)
        # Gradients are accumulated chunk-major (contiguous bmm results, see _products), then unchunked.
        dq, dk, dqs, dkg = (q.new_empty(bsz, nh, nc, d, L) for _ in range(4))
        dv = v1.new_empty(bsz, nh, nc, dv1, L)
        dp = torch.empty_like(p)
        acc = v1.new_empty(bsz, nh, nc, dv1, d)  # dL/dE_c for c = 1 .. NC - 1 (E_0 = 0 needs none)
        qc, kc, v1c, kgc, qsc = (_chunks(t, nc) for t in (q, k, v1, kg, qs))
        batches = _gemm_batches(bsz, nh, nc)
        dqs[:, :, 0].zero_()
        for sel in batches:
            torch.bmm(sel(g).transpose(1, 2), sel(v1c), out=sel(dp))  # dP = G^T V1
            torch.bmm(sel(g), sel(p), out=sel(dv))  # intra: dV1 = G P
            if nc > 1:
                torch.bmm(sel(g)[1:], sel(qsc)[1:].transpose(1, 2), out=sel(acc)[1:])  # dE = G Qs^T
                torch.bmm(sel(entering).transpose(1, 2), sel(g)[1:], out=sel(dqs)[1:])  # dQs = E^T G
        d_dmat = dp * qk
        ds = dp.mul_(dmat)  # gradient of the raw scores Q^T K
        # Reverse the recurrence: acc[c] = dE_c + decay_c acc[c + 1]; then dL/d(V1_c Kg_c^T) = acc[c + 1].
        per_chunk, carry = acc.unbind(2), decay[..., None, None].unbind(2)
        for c in range(nc - 2, 0, -1):
            per_chunk[c].addcmul_(per_chunk[c + 1], carry[c])
        d_decay = torch.zeros_like(decay)
        if nc > 2:
            for b in range(bsz):  # <dE_{c+1}, E_c> as batched dot products (no state-sized temporary)
                for h in range(nh):
                    dots = torch.bmm(
                        acc[b, h, 2:].view(nc - 2, 1, -1), entering[b, h, :-1].view(nc - 2, -1, 1)
                    )
                    d_decay[b, h, 1:-1] = dots.view(nc - 2)
        dkg[:, :, -1].zero_()  # the last chunk's keys feed no later chunk
        for sel in batches:
            torch.bmm(sel(kc), sel(ds).transpose(1, 2), out=sel(dq))  # dQ = K dS^T
            torch.bmm(sel(qc), sel(ds), out=sel(dk))  # dK = Q dS
            if nc > 1:
                torch.bmm(sel(acc)[1:].transpose(1, 2), sel(v1c)[:-1], out=sel(dkg)[:-1])  # dKg = dU^T V1
                sel(dv)[:-1].baddbmm_(sel(acc)[1:], sel(kgc)[:-1])  # dV1 += dU Kg
        sigma_c, w_c = _chunks(sigma, nc), _chunks(w, nc)
        d_sigma = _unchunk((dqs * qc).sum(3, keepdim=True))
        d_w = _unchunk((dkg * kc).sum(3, keepdim=True))
        dq.addcmul_(dqs, sigma_c)
        dk.addcmul_(dkg, w_c)
        return _unchunk(dq), _unchunk(dk), _unchunk(dv), d_w, d_sigma, d_decay, d_dmat


def normaliser(den: torch.Tensor, m: torch.Tensor, eps: float) -> torch.Tensor:
    """max(|den|, exp(-m)) + eps: the per-token divisor of the stabilised numerator."""
    return torch.maximum(den.abs(), torch.exp(-m)).add_(eps)


def _chunkwise_torch(q, k, v, i, f, *, chunk_size: int, eps: float) -> torch.Tensor:
    seq, d = q.shape[2], q.shape[3]
    chunk = chunk_length(seq, chunk_size)
    pad = (-seq) % chunk
    # The kernel needs S % chunk == 0. Padding at the end is exact for the kept outputs because the
    # recurrence is causal: token t never sees tokens after it.
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        i, f = (F.pad(t, (0, pad)) for t in (i, f))
    v1 = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1).transpose(-1, -2)
    out, m = chunkwise_feature_major(
        (q * d**-0.5).transpose(-1, -2), k.transpose(-1, -2), v1, i, f, chunk_size=chunk
    )
    num, den = out.split([v.shape[-1], 1], dim=2)
    h = num / normaliser(den, m.unsqueeze(2), eps)  # (B, NH, Dv, NC, L)
    return h.permute(0, 1, 3, 4, 2).flatten(2, 3)[:, :, :seq]


def _chunkwise(q, k, v, i, f, *, chunk_size: int, eps: float, kernel: KernelChoice) -> torch.Tensor:
    global _triton_fn
    if wants_triton(q, kernel):
        try:  # import and compile failures both surface here, on the first call
            _triton_fn = _triton_fn or get_mlstm_kernel(_TRITON_CHUNKWISE)
            return _triton_padded(_triton_fn, q, k, v, i, f, chunk_size=max(chunk_size, 64), eps=eps)
        except Exception as err:
            _disable_triton(err)
    return _chunkwise_torch(q, k, v, i, f, chunk_size=chunk_size, eps=eps)


def _triton_padded(fn: Callable, q, k, v, i, f, *, chunk_size: int, eps: float) -> torch.Tensor:
    seq = q.shape[2]
    chunk = chunk_length(seq, chunk_size)
    pad = (-seq) % chunk
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        i, f = (F.pad(t, (0, pad)) for t in (i, f))
    q, k, v, i, f = (t.contiguous() for t in (q, k, v, i, f))  # callers pass transposed views
    h = fn(q=q, k=k, v=v, i=i, f=f, chunk_size=chunk, eps=eps, autocast_kernel_dtype=q.dtype)
    return h[:, :, :seq] if pad else h


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
