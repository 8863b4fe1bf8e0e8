"""The mLSTM cell's math (docs/design.md, section 4): the stabilised parallel form, plain, the reference every
fast path is tested against; and the chunkwise form the project runs, with its backward pass. Everything
else in this package calls into it or chooses it.

Parallel form, one head, S tokens, head dim D (``parallel``; tests/references/mlstm.py spells it out once
more, token by token):

    F_t = sum_{s<=t} logsigmoid(f_s)          log D_ts = F_t - F_s + i_s  (s <= t, else -inf)
    m_t = max_s log D_ts                       C_ts = q_t . k_s / sqrt(D) * exp(log D_ts - m_t)
    n_t = max(|sum_s C_ts|, exp(-m_t))         h_t = sum_s C_ts v_s / (n_t + eps)

Chunkwise form (``chunkwise``): cut the sequence into NC chunks of L tokens. Within chunk c, with b_l the
cumulative log forget gate from the chunk start (``cum``) and g = b_L the chunk's total decay:

    intra-chunk:  P_c = (Q_c^T K_c) * Dmat_c,  Dmat_ls = exp(b_l - b_s + i_s - m_l) for s <= l
    state:        E_0 = 0,  E_{c+1} = V1_c (K_c w_c)^T + decay_c E_c,  w_s = exp(g - b_s + i_s - M_c)
    output:       out_c = V1_c P_c^T + E_c (Q_c sigma_c),  sigma_l = exp(b_l + M_{c-1} - m_l)

V1 is V with a row of ones appended, so the last row of ``out`` is the denominator sum_s C_ts. M_c (the
state stabiliser, ``m_state``) and m_l (the per-token stabiliser) are running maxima in log space that
keep every exp() <= 1; they are the same as mlstm_kernels' chunkwise kernel uses, so both agree to 1e-9 in
float64. h = num / max(|den|, exp(-m)) + eps (``normaliser``).

Layout: feature-major (head dim before the sequence): the projections write their outputs straight into
the layout the GEMMs read. The products run as a fixed number of batched GEMMs over all (batch, head,
chunk) with autograd and on CUDA; CPU inference loops over (batch, head) into the buffers of a
``CellBuffers`` (faster there, see ``_products_looped``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from seglstm.models.vil.workspace import CellBuffers


def chunk_length(seq: int, chunk_size: int) -> int:
    """Chunk length used for a sequence: ``chunk_size``, or less for short sequences (to limit padding)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    return min(chunk_size, _next_pow2(seq))


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


def parallel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """The stabilised parallel form (module docstring), as the NX-AI Vision-LSTM code writes it: O(S^2)
    time and memory per head, differentiated by autograd. ``mlstm_backend="parallel"`` runs it.

    Args:
        q, k, v: (B, NH, S, D) queries, keys, values (q . k is scaled by D**-0.5 here).
        i, f: (B, NH, S) input and forget gate pre-activations.
    Returns:
        h: (B, NH, S, D).
    """
    seq, d = q.shape[2], q.shape[3]
    log_f = F.logsigmoid(f).cumsum(-1)  # F_t
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril_()
    log_fg = torch.where(causal, log_f[..., :, None] - log_f[..., None, :], -float("inf"))  # F_t - F_s
    log_d = log_fg + i[..., None, :]  # (B, NH, S, S): log D_ts
    m = log_d.amax(-1, keepdim=True)  # row max: the stabiliser m_t
    c = (q @ k.transpose(-2, -1)) * d**-0.5 * torch.exp(log_d - m)  # C_ts
    n = torch.maximum(c.sum(-1, keepdim=True).abs(), torch.exp(-m))
    return (c / (n + eps)) @ v


def _chunks(t: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """(..., R, S) -> (..., NC, R, L): chunk views of a feature-major matrix, no copy."""
    return t.unflatten(-1, (num_chunks, -1)).transpose(-3, -2)


def _gemm_batches(bsz: int, nh: int, nc: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Selectors that turn (B, NH, NC, R, C) chunk views into the batches of one bmm call each (CPU
    inference, see ``_products_looped``).

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
    q: torch.Tensor,
    k: torch.Tensor,
    v1: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    chunk_size: int,
    buffers: CellBuffers | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise mLSTM on feature-major operands, returning the numerator, denominator and stabiliser.

    Feature-major (head dim before the sequence) lets the projections write their outputs straight into the
    layout the GEMMs read, and lets the denominator ride along as an extra row of ``v1``.

    Args:
        q, k: (B, NH, D, S); q already scaled by D**-0.5. Any strides with a unit stride on S or D.
        v1: (B, NH, Dv + 1, S), values with a last row of ones (it yields the denominator).
        i, f: (B, NH, S) gate pre-activations.
        chunk_size: chunk length L; S must be a multiple of it.
        buffers: where CPU inference writes its intermediates and ``out`` (new ones when None); only
            without autograd.
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
    if grad and buffers is not None:
        raise ValueError("chunkwise_feature_major: buffers are for inference, but autograd is recording")
    if not grad and q.is_cpu and buffers is None:
        buffers = CellBuffers.allocate(bsz, nh, q.shape[2], v1.shape[2], nc, L, q)
    elif buffers is not None:
        buffers.check(bsz, nh, q.shape[2], v1.shape[2], nc, L, q)

    st = _stabilisers(F.logsigmoid(f.reshape(bsz, nh, nc, L)), i.reshape(bsz, nh, nc, L))
    cum, m_prev = st["cum"], st["m_prev"].unsqueeze(-1)
    past = torch.ones(L, L, dtype=q.dtype, device=q.device).tril_()  # s <= l
    i = i.reshape(bsz, nh, nc, 1, L)
    if grad:
        log_d = (cum.unsqueeze(-1) - cum.unsqueeze(-2)) + (i + past.log())
    else:
        out = None if buffers is None else buffers.log_d
        log_d = torch.sub(cum.unsqueeze(-1), cum.unsqueeze(-2), out=out)
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
    elif buffers is not None:
        out = _products_looped(q, k, v1, w, sigma, decay, dmat, buffers)
    else:
        out = _products_batched(q, k, v1, w, sigma, decay, dmat)[0]
    return out.transpose(2, 3), m


def _products_looped(q, k, v1, w, sigma, decay, dmat, buffers: CellBuffers) -> torch.Tensor:
    """The GEMM part of the chunkwise form for CPU inference, given the gate weights (see
    ``_ChunkwiseProducts``); returns out (B, NH, NC, Dv1, L) in ``buffers.out``.

    Runs bmm calls (per head, or one for all, see ``_gemm_batches``) on strided chunk views of the
    feature-major inputs (torch.matmul would copy the non-mergeable (B, NH, NC) batch) into contiguous
    chunk-major buffers: with a contiguous result PyTorch hands the whole batch to one MKL batched
    GEMM, with a strided one it loops over single-matrix GEMMs, each a separate (and, under load, slow)
    thread synchronisation. Measured faster on the CPU than ``_products_batched``; on CUDA the Python loop
    over (batch, head) would be thousands of tiny kernel launches, so CUDA never takes this path.
    """
    bsz, nh = q.shape[:2]
    nc = dmat.shape[2]
    kg = torch.mul(k, w, out=buffers.kg)
    qs = torch.mul(q, sigma, out=buffers.qs)
    qc, kc, v1c, kgc, qsc = (_chunks(t, nc) for t in (q, k, v1, kg, qs))
    # States are kept as (Dv + 1, D) = V^T K: the inter-chunk product is then a plain NN GEMM.
    states, qk, out = buffers.states, buffers.qk, buffers.out
    batches = _gemm_batches(bsz, nh, nc)
    for sel in batches:
        torch.bmm(sel(v1c), sel(kgc).transpose(1, 2), out=sel(states))
        torch.bmm(sel(qc).transpose(1, 2), sel(kc), out=sel(qk))
    _accumulate_states(states, decay)
    p = qk.mul_(dmat)
    out[:, :, 0].zero_()  # no state enters the first chunk
    for sel in batches:
        if nc > 1:
            torch.bmm(sel(states)[:-1], sel(qsc)[1:], out=sel(out)[1:])
        sel(out).baddbmm_(sel(v1c), sel(p).transpose(1, 2))
    return out


def _accumulate_states(states: torch.Tensor, decay: torch.Tensor) -> None:
    """In place: states[c] (chunk c's own V1 Kg^T) becomes the state after chunk c, i.e. entering chunk
    c + 1; one elementwise call per chunk over all (batch, head). The last chunk's state feeds nothing."""
    per_chunk, carry = states.unbind(2), decay[..., None, None].unbind(2)  # views, indexed once
    for c in range(1, states.shape[2] - 1):
        per_chunk[c].addcmul_(per_chunk[c - 1], carry[c])


def _chunk_first(t: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """(B, NH, R, S) -> (NC, B, NH, R, L) contiguous: chunk-first, so that a shift by one chunk is a plain
    slice and every (NC', B, NH) batch merges into one without a copy."""
    return _chunks(t, num_chunks).permute(2, 0, 1, 3, 4).contiguous()


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(NC', B, NH, R, C) chunk-first view -> (NC' * B * NH, R, C), one GEMM batch (a view, never a copy)."""
    return t.view(-1, *t.shape[-2:])


def _products_batched(q, k, v1, w, sigma, decay, dmat) -> tuple[torch.Tensor, ...]:
    """The chunk products (see ``_ChunkwiseProducts``) as a fixed number of batched GEMMs over all
    (batch, head, chunk): the autograd and CUDA path, whose kernel launches do not grow with batch or heads.

    The operands are copied once into chunk-first contiguous (NC, B, NH, R, L) tensors: every GEMM then
    runs on one merged batch, shifted by a chunk where the states enter, without further copies.
    Returns out (B, NH, NC, Dv1, L) (a view) and what the backward pass needs, chunk-first: the states
    entering each chunk E (E_0 = 0), the raw scores Q^T K, the masked scores P, q, k, v1, kg = k w and
    qs = q sigma.
    """
    nc = dmat.shape[2]
    qc, kc, v1c = (_chunk_first(t, nc) for t in (q, k, v1))
    kgc, qsc = kc * _chunk_first(w, nc), qc * _chunk_first(sigma, nc)
    carry = decay.permute(2, 0, 1)[..., None, None]  # (NC, B, NH, 1, 1)
    entering = v1c.new_empty(nc, *v1c.shape[1:3], v1c.shape[3], qc.shape[3])  # (NC, B, NH, Dv1, D)
    entering[0].zero_()
    if nc > 1:  # E_c = V1_{c-1} Kg_{c-1}^T + decay_{c-1} E_{c-1}: one GEMM, then one update per chunk
        torch.bmm(_flat(v1c[:-1]), _flat(kgc[:-1]).transpose(1, 2), out=_flat(entering[1:]))
        for c in range(2, nc):
            entering[c].addcmul_(entering[c - 1], carry[c - 1])
    qk = torch.bmm(_flat(qc).transpose(1, 2), _flat(kc)).view(nc, *qc.shape[1:3], *dmat.shape[-2:])
    p = qk * dmat.permute(2, 0, 1, 3, 4)
    out = torch.bmm(_flat(v1c), _flat(p).transpose(1, 2))  # intra-chunk
    out.baddbmm_(_flat(entering), _flat(qsc))  # + inter-chunk
    out = out.view(nc, *v1c.shape[1:]).permute(1, 2, 0, 3, 4)
    return out, entering, qk, p, qc, kc, v1c, kgc, qsc


def _unchunk_first(t: torch.Tensor) -> torch.Tensor:
    """(NC, B, NH, R, L) -> (B, NH, R, NC * L), a copy."""
    return t.permute(1, 2, 3, 0, 4).flatten(3)


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
        out, *saved = _products_batched(q, k, v1, w, sigma, decay, dmat)
        ctx.save_for_backward(w, sigma, decay, dmat, *saved)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        w, sigma, decay, dmat, entering, qk, p, qc, kc, v1c, kgc, qsc = ctx.saved_tensors
        nc = dmat.shape[2]
        g = grad_out.permute(2, 0, 1, 3, 4).contiguous()  # chunk-first (NC, B, NH, Dv1, L)
        dp = torch.bmm(_flat(g).transpose(1, 2), _flat(v1c)).view(qk.shape)  # dP = G^T V1
        d_dmat = dp * qk
        ds = dp.mul_(dmat.permute(2, 0, 1, 3, 4))  # gradient of the raw scores Q^T K
        dq = torch.bmm(_flat(kc), _flat(ds).transpose(1, 2)).view(qc.shape)  # dQ = K dS^T
        dk = torch.bmm(_flat(qc), _flat(ds)).view(kc.shape)  # dK = Q dS
        dqs = torch.bmm(_flat(entering).transpose(1, 2), _flat(g)).view(qsc.shape)  # dQs = E^T G
        dv = torch.bmm(_flat(g), _flat(p)).view(v1c.shape)  # intra: dV1 = G P
        dkg = torch.zeros_like(kgc)  # the last chunk's keys feed no later chunk
        d_decay = torch.zeros_like(decay)
        if nc > 1:
            # r[c] = dL/dE_c in total: dE_c = G_c Qs_c^T plus decay_c r[c + 1], backwards over the chunks
            # (r[0] is never needed: E_0 = 0); chunk c's own V1_c Kg_c^T then gets r[c + 1].
            r = v1c.new_empty(entering.shape)
            r[0].zero_()
            torch.bmm(_flat(g[1:]), _flat(qsc[1:]).transpose(1, 2), out=_flat(r[1:]))
            carry = decay.permute(2, 0, 1)[..., None, None]
            for c in range(nc - 2, 0, -1):
                r[c].addcmul_(r[c + 1], carry[c])
            torch.bmm(_flat(r[1:]).transpose(1, 2), _flat(v1c[:-1]), out=_flat(dkg[:-1]))  # dKg = dU^T V1
            _flat(dv[:-1]).baddbmm_(_flat(r[1:]), _flat(kgc[:-1]))  # dV1 += dU Kg
            if nc > 2:  # <dE_{c+1}, E_c> for the decays that multiply a nonzero state, as batched dot products
                size = r[0, 0, 0].numel()
                dots = torch.bmm(r[2:].reshape(-1, 1, size), entering[1:-1].reshape(-1, size, 1))
                d_decay[:, :, 1:-1] = dots.view(nc - 2, *decay.shape[:2]).permute(1, 2, 0)
        d_sigma = _unchunk_first((dqs * qc).sum(3, keepdim=True))
        d_w = _unchunk_first((dkg * kc).sum(3, keepdim=True))
        dq = dq.addcmul_(dqs, _chunk_first(sigma, nc))
        dk = dk.addcmul_(dkg, _chunk_first(w, nc))
        d_dmat = d_dmat.permute(1, 2, 0, 3, 4)
        return _unchunk_first(dq), _unchunk_first(dk), _unchunk_first(dv), d_w, d_sigma, d_decay, d_dmat


def normaliser(den: torch.Tensor, m: torch.Tensor, eps: float) -> torch.Tensor:
    """max(|den|, exp(-m)) + eps: the per-token divisor of the stabilised numerator."""
    return torch.maximum(den.abs(), torch.exp(-m)).add_(eps)


def chunkwise(q, k, v, i, f, *, chunk_size: int, eps: float) -> torch.Tensor:
    """The chunkwise cell on (B, NH, S, D) inputs (any S: padded to a multiple of the chunk and cropped)."""
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
