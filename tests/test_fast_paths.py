"""The fast chunkwise paths against their references.

- our chunkwise kernel vs the stabilised parallel form (``seglstm.models.vil.mlstm.parallel``, itself tested
  against the token-by-token formula in tests/test_mlstm.py) and vs mlstm_kernels'
  ``chunkwise--native_autograd`` (outputs and gradients of q, k, v, i, f) in float64 and float32;
- the hand-written backward of the chunk products vs autograd through a direct loop over chunks;
- the fused ViL layer (feature-major, folded gate weights, q folded into k, norm absorbing the divisor)
  vs the layer's own reference forward (``ViLLayer.reference_forward``), outputs and all gradients;
- the inference path (layer buffers, in-place ops) vs the autograd path.
"""

import collections
import zlib

import pytest
import torch
import torch.nn.functional as F
from mlstm_kernels.torch import get_mlstm_kernel

from seglstm.models.vil import ViLBlock, ViLLayer, VisionLSTM, mlstm, wants_triton
from seglstm.models.vil.mlstm import _ChunkwiseProducts, parallel
from seglstm.models.vil.workspace import workspace

CHUNKWISE = get_mlstm_kernel("chunkwise--native_autograd")

GATES = {  # (mean, std) of the input and forget gate pre-activations
    "neutral": ((0.0, 1.0), (3.0, 2.0)),
    "negative_igate": ((-12.0, 4.0), (3.0, 2.0)),
    "forget_near_0": ((0.0, 2.0), (-8.0, 1.0)),
    "forget_near_1": ((1.0, 2.0), (12.0, 1.0)),
    "wide": ((-3.0, 6.0), (0.0, 6.0)),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _cell_inputs(seq, gates, seed, dtype=torch.float64, b=2, nh=3, d=8):
    gen = torch.Generator().manual_seed(seed)
    (im, isd), (fm, fsd) = GATES[gates]
    q, k, v = (torch.randn(b, nh, seq, d, generator=gen, dtype=torch.float64) for _ in range(3))
    i = im + isd * torch.randn(b, nh, seq, generator=gen, dtype=torch.float64)
    f = fm + fsd * torch.randn(b, nh, seq, generator=gen, dtype=torch.float64)
    weight = torch.randn(b, nh, seq, d, generator=gen, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (q, k, v, i, f)], weight.to(dtype)


def _native_chunkwise(q, k, v, i, f, chunk, eps):
    """mlstm_kernels' chunkwise kernel on the sequence padded to a multiple of the chunk, cropped."""
    seq = q.shape[2]
    pad = (-seq) % chunk
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    i, f = (F.pad(t, (0, pad)) for t in (i, f))
    h = CHUNKWISE(q=q, k=k, v=v, i=i, f=f, chunk_size=chunk, eps=eps, autocast_kernel_dtype=q.dtype)
    return h[:, :, :seq]


def _value_and_grads(fn, inputs, weight):
    h = fn(*inputs)
    return h, torch.autograd.grad((h * weight).sum(), inputs, materialize_grads=True)


@pytest.mark.parametrize("gates", sorted(GATES))
@pytest.mark.parametrize("seq,chunk", [(64, 16), (100, 16), (37, 64), (5, 4), (48, 48)])
def test_chunkwise_matches_mlstm_kernels_float64(gates, seq, chunk):
    inputs, weight = _cell_inputs(seq, gates, zlib.crc32(f"{gates}{seq}{chunk}".encode()))
    ours_h, ours_g = _value_and_grads(lambda *t: mlstm(*t, chunk_size=chunk, eps=0.0), inputs, weight)
    par_h, par_g = _value_and_grads(
        lambda *t: parallel(*t, eps=0.0), inputs, weight
    )
    assert _rel(ours_h, par_h) < 1e-6
    for name, g, ref in zip("qkvif", ours_g, par_g):
        assert _rel(g, ref) < 1e-6, ("parallel", name)
    # Same stabilisers as mlstm_kernels' chunkwise kernel, so even the eps term agrees.
    eff = min(chunk, 1 << max(seq - 1, 1).bit_length())
    ours_h, ours_g = _value_and_grads(lambda *t: mlstm(*t, chunk_size=chunk), inputs, weight)
    nat_h, nat_g = _value_and_grads(lambda *t: _native_chunkwise(*t, eff, 1e-6), inputs, weight)
    assert _rel(ours_h, nat_h) < 1e-9
    for name, g, ref in zip("qkvif", ours_g, nat_g):
        assert _rel(g, ref) < 1e-9, ("chunkwise", name)


def test_chunkwise_float32_neutral_gates_within_1e5_of_float64():
    inputs, weight = _cell_inputs(192, "neutral", 11)
    ref_h, ref_g = _value_and_grads(parallel, inputs, weight)
    inputs32 = [t.detach().float().requires_grad_() for t in inputs]
    h, grads = _value_and_grads(lambda *t: mlstm(*t, chunk_size=32), inputs32, weight.float())
    assert h.dtype == torch.float32
    assert _rel(h, ref_h) < 1e-5
    for name, g, ref in zip("qkvif", grads, ref_g):
        assert _rel(g, ref) < 1e-5, name


@pytest.mark.parametrize("gates", sorted(GATES))
def test_chunkwise_float32_error_is_that_of_the_reference_kernels(gates):
    """Ill-conditioned gates cost every float32 kernel accuracy; ours must not lose more than they do."""
    inputs, weight = _cell_inputs(128, gates, zlib.crc32(gates.encode()))
    ref_h, ref_g = _value_and_grads(parallel, inputs, weight)
    inputs32 = [t.detach().float().requires_grad_() for t in inputs]
    errors = {}
    for name, fn in {
        "ours": lambda *t: mlstm(*t, chunk_size=32),
        "native_chunkwise": lambda *t: _native_chunkwise(*t, 32, 1e-6),
        "parallel": parallel,
    }.items():
        h, grads = _value_and_grads(fn, inputs32, weight.float())
        errors[name] = max([_rel(h, ref_h)] + [_rel(g, r) for g, r in zip(grads, ref_g)])
    assert errors["ours"] < 3 * max(errors["native_chunkwise"], errors["parallel"], 1e-6), errors


def _products_reference(q, k, v1, w, sigma, decay, dmat):
    """The chunk products as a plain loop over chunks, differentiated by autograd."""
    nc = dmat.shape[2]
    length = q.shape[-1] // nc
    state = torch.zeros(*v1.shape[:3], q.shape[2], dtype=q.dtype)
    outs = []
    for c in range(nc):
        cols = slice(c * length, (c + 1) * length)
        qc, kc, vc = q[..., cols], k[..., cols], v1[..., cols]
        p = (qc.transpose(-1, -2) @ kc) * dmat[:, :, c]
        outs.append(vc @ p.transpose(-1, -2) + state @ (qc * sigma[..., cols]))
        state = vc @ (kc * w[..., cols]).transpose(-1, -2) + decay[:, :, c, None, None] * state
    return torch.cat(outs, -1)


@pytest.mark.parametrize("num_chunks", [1, 2, 5])
def test_products_backward_matches_autograd(num_chunks):
    gen = torch.Generator().manual_seed(num_chunks)
    b, nh, d, dv1, length = 2, 3, 6, 5, 4
    seq = num_chunks * length

    def rand(*shape, positive=False):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return t.abs() + 0.1 if positive else t

    causal = torch.ones(length, length, dtype=torch.float64).tril()
    inputs = [
        rand(b, nh, d, seq),
        rand(b, nh, d, seq),
        rand(b, nh, dv1, seq),
        rand(b, nh, 1, seq, positive=True),
        rand(b, nh, 1, seq, positive=True),
        rand(b, nh, num_chunks, positive=True),
        rand(b, nh, num_chunks, length, length, positive=True) * causal,
    ]
    inputs = [t.requires_grad_() for t in inputs]
    weight = rand(b, nh, dv1, seq)
    got, got_g = _value_and_grads(
        lambda *t: _ChunkwiseProducts.apply(*t).transpose(2, 3).flatten(3), inputs, weight
    )
    ref, ref_g = _value_and_grads(_products_reference, inputs, weight)
    assert _rel(got, ref) < 1e-12
    for name, g, r in zip(["q", "k", "v1", "w", "sigma", "decay", "dmat"], got_g, ref_g):
        if name == "decay":  # decay_0 multiplies the zero initial state: no gradient on either side
            assert g[:, :, 0].abs().max() == 0 and r[:, :, 0].abs().max() == 0
        assert (g - r).abs().max() <= 1e-12 * r.abs().max().clamp_min(1.0), name


def _randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("seq", [24, 21])
def test_fused_layer_outputs_and_gradients_match_reference(reverse, seq):
    """Fused path vs the layer's reference forward: with the same chunkwise cell (the same stabilisers: the
    fusion alone must not change a bit more than rounding), and with the parallel cell (an
    independent cell, outputs and every gradient), which runs in the fused layout too."""
    layer = ViLLayer(16, reverse=reverse, chunk_size=8).double()
    _randomize(layer, seq + reverse)
    par_layer = ViLLayer(16, reverse=reverse, chunk_size=8, mlstm_backend="parallel").double()
    par_layer.load_state_dict(layer.state_dict())
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(2, seq, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, seq, 16, generator=gen, dtype=torch.float64)
    out = layer(x)
    assert _rel(out, layer.reference_forward(x)) < 1e-9
    ref = par_layer.reference_forward(x)
    par = par_layer(x)
    assert _rel(out, ref) < 1e-7 and _rel(par, ref) < 1e-9
    ref_grads = torch.autograd.grad((ref * weight).sum(), [x, *par_layer.parameters()])
    for fused, got in ((layer, out), (par_layer, par)):
        names = ["x", *dict(fused.named_parameters())]
        grads = torch.autograd.grad((got * weight).sum(), [x, *fused.parameters()])
        for name, g, r in zip(names, grads, ref_grads, strict=True):
            assert _rel(g, r) < 1e-6, (fused.mlstm_backend, name)
    with torch.no_grad():  # the inference path: scratch buffers and in-place steps
        assert _rel(layer(x), out) < 1e-12
        with workspace():
            assert _rel(layer(x), out) < 1e-12


def test_encoder_inference_path_equals_autograd_path():
    torch.manual_seed(0)
    enc = VisionLSTM(img_size=64, embed_dim=32, depths=(2, 3), chunk_size=16).double().eval()
    _randomize(enc, 5)
    x1, x2 = torch.randn(2, 1, 3, 80, 112, dtype=torch.float64)
    with_grad = [enc(x1), enc(x2)]
    with torch.no_grad():  # two calls: buffers reused across calls must not leak between them
        no_grad = [enc(x1), enc(x2)]
    for outs, refs in zip(no_grad, with_grad):
        for o, r in zip(outs, refs):
            assert _rel(o, r) < 1e-10
    assert _rel(no_grad[0][0], no_grad[1][0]) > 1e-3  # different inputs, different maps


def test_triton_on_cpu_only_under_its_interpreter_and_kernel_names_are_checked(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not wants_triton(x, "triton") and not wants_triton(x, "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert wants_triton(x, "triton") and not wants_triton(x, "auto") and not wants_triton(x, "native")
    with pytest.raises(ValueError, match="mlstm_kernel"):
        wants_triton(x, "cuda")


def _op_counts(batch: int, heads: int) -> collections.Counter:
    torch.manual_seed(0)
    block = ViLBlock(32, reverse=True, num_heads=heads, chunk_size=8)
    x = torch.randn(batch, 40, 32, requires_grad=True)  # 5 chunks
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        block(x).square().sum().backward()
    return collections.Counter(e.name for e in prof.events())


def test_training_path_operator_count_does_not_grow_with_batch_or_heads():
    """The autograd path (the one CUDA trains with) issues the same operators, as many times, for batch 2
    and 5 and for 4 and 8 heads: no Python loop over (batch, head), one launch per op on a GPU."""
    base = _op_counts(2, 4)
    assert base["aten::bmm"] > 0
    assert _op_counts(5, 4) == base
    assert _op_counts(2, 8) == base


@pytest.mark.slow
def test_vil_s_fast_inference_agrees_with_parallel_backend():
    torch.manual_seed(0)
    enc = VisionLSTM(img_size=256, embed_dim=384, depths=(6, 6, 6, 6)).eval()
    x = torch.randn(1, 3, 256, 320)
    with torch.no_grad():
        fast = enc(x)
        enc.set_mlstm_backend("parallel")
        slow = enc(x)
    for a, b in zip(fast, slow):
        assert _rel(a, b) < 1e-4
