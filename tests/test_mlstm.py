"""The mLSTM cell backends against each other, and the in-package parallel form (their reference) against
the formula of docs/design.md, section 4, written out token by token (tests/references/mlstm.py)."""

import zlib

import pytest
import torch

from seglstm.models.vil import mlstm
from seglstm.models.vil.mlstm import parallel
from tests.references.mlstm import reference_mlstm


def _inputs(seq, gen, igate=(0.0, 1.0), fgate=(3.0, 2.0), b=2, nh=2, d=8):
    q, k, v = (torch.randn(b, nh, seq, d, generator=gen, dtype=torch.float64) for _ in range(3))
    i = igate[0] + igate[1] * torch.randn(b, nh, seq, generator=gen, dtype=torch.float64)
    f = fgate[0] + fgate[1] * torch.randn(b, nh, seq, generator=gen, dtype=torch.float64)
    return [t.requires_grad_() for t in (q, k, v, i, f)]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


GATES = {
    "neutral": ((0.0, 1.0), (3.0, 2.0)),
    "negative_igate": ((-12.0, 4.0), (3.0, 2.0)),
    "forget_near_0": ((0.0, 2.0), (-8.0, 1.0)),
    "forget_near_1": ((1.0, 2.0), (12.0, 1.0)),
    "wide": ((-3.0, 6.0), (0.0, 6.0)),
}


@pytest.mark.parametrize("gates", sorted(GATES))
def test_parallel_equals_reference_formula_outputs_and_gradients(gates):
    """The in-package parallel form (the reference of every fast path) against the token-by-token loop of
    tests/references/mlstm.py, both differentiated by autograd."""
    gen = torch.Generator().manual_seed(zlib.crc32(gates.encode()))
    inputs = _inputs(23, gen, *GATES[gates])
    weight = torch.randn(2, 2, 23, 8, generator=gen, dtype=torch.float64)
    got = parallel(*inputs)
    ref = reference_mlstm(*inputs)
    assert _rel(got, ref) < 1e-10
    assert _rel(mlstm(*inputs, backend="parallel"), ref) < 1e-10  # the backend runs it
    got_g = torch.autograd.grad((got * weight).sum(), inputs)
    ref_g = torch.autograd.grad((ref * weight).sum(), inputs)
    for name, g, r in zip("qkvif", got_g, ref_g):
        assert _rel(g, r) < 1e-9, name


@pytest.mark.parametrize("gates", sorted(GATES))
@pytest.mark.parametrize("seq,chunk", [(64, 16), (100, 16), (37, 64), (5, 4)])
def test_backends_agree_forward_and_gradients(gates, seq, chunk):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{gates}{seq}".encode()))
    ig, fg = GATES[gates]
    inputs = _inputs(seq, gen, ig, fg)
    weight = torch.randn(2, 2, seq, 8, generator=gen, dtype=torch.float64)
    results = {}
    for backend in ("parallel", "chunkwise", "recurrent"):
        # eps=0: the kernels stabilise with different max states, so eps enters at slightly different
        # scales (~1e-8 relative); without it they compute the same real number.
        h = mlstm(*inputs, backend=backend, chunk_size=chunk, eps=0.0)
        grads = torch.autograd.grad((h * weight).sum(), inputs)
        results[backend] = (h, grads)
    ref_h, ref_g = results["parallel"]
    for backend in ("chunkwise", "recurrent"):
        h, grads = results[backend]
        assert _rel(h, ref_h) < 1e-6, backend
        for name, g, rg in zip("qkvif", grads, ref_g):
            assert _rel(g, rg) < 1e-6, (backend, name)


def test_default_eps_keeps_backends_within_tolerance():
    gen = torch.Generator().manual_seed(3)
    inputs = _inputs(100, gen)
    with torch.no_grad():
        ref = mlstm(*inputs, backend="parallel")
        got = mlstm(*inputs, backend="chunkwise", chunk_size=32)
    assert _rel(got, ref) < 1e-6


def test_unknown_backend_is_rejected():
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="mlstm_backend"):
        mlstm(*_inputs(8, gen), backend="quadratic")
