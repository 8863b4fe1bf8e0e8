"""mlstm_kernels' Triton chunkwise kernel, the GPU inference path, run on CPU tensors through Triton's
interpreter: padded head dims and sequences against the PyTorch kernel, Triton in every layer, refused
under autograd, and a failing call that never turns Triton off for later ones.

Triton decides interpreter or compiler when a kernel module is imported, so the interpreter tests run in
a child pytest process started with ``TRITON_INTERPRET=1`` (``test_interpreted_triton_suite``, about
35 s on a 2-core CPU).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import seglstm.models.vil.backends as backends
import seglstm.models.vil.dispatch as dispatch
from seglstm.models.vil import VisionLSTM, mlstm
from seglstm.models.vil.backends import TritonTrainingError, triton_head_dim
from seglstm.models.vil.mlstm import chunkwise
from tests.references.autocast import CudaAutocastPolicy

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child process")
ROOT = Path(__file__).resolve().parents[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _inputs(seq: int, d: int, seed: int, b: int = 1, nh: int = 2):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, nh, seq, d, generator=gen) for _ in range(3))
    i = torch.randn(b, nh, seq, generator=gen)
    f = 3.0 + 2.0 * torch.randn(b, nh, seq, generator=gen)
    return q, k, v, i, f


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts the calls that reach mlstm_kernels' Triton kernel."""
    calls = []
    original = backends._kernel

    def spy(name):
        fn = original(name)
        if name != backends._TRITON_CHUNKWISE:
            return fn

        def counted(**kwargs):
            calls.append(tuple(kwargs["q"].shape))
            return fn(**kwargs)

        return counted

    monkeypatch.setattr(backends, "_kernel", spy)
    return calls


def test_interpreted_triton_suite():
    """The tests marked ``interpreted`` below, in a child process under Triton's interpreter."""
    if INTERPRETED:
        pytest.skip("already the child process")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider", "-m", "slow or not slow",
         "-k", "not test_interpreted_triton_suite"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-3000:]


@interpreted
@pytest.mark.parametrize("seq", [4, 256])
@pytest.mark.parametrize("d", [48, 96, 192])
def test_triton_matches_native_kernel(d, seq, triton_calls):
    inputs = _inputs(seq, d, seed=d + seq)
    with torch.no_grad():
        got = mlstm(*inputs, kernel="triton")
        ref = mlstm(*inputs, kernel="native")
    assert len(triton_calls) == 1
    assert triton_calls[0][2] % 16 == 0 and triton_calls[0][3] == triton_head_dim(d)
    assert got.shape == ref.shape
    assert _rel(got, ref) < 1e-3


@interpreted
def test_triton_in_every_layer_of_the_encoder_and_under_autocast(triton_calls):
    torch.manual_seed(0)
    # embed 48 -> inner 96 -> head dim 24 (padded to 32); 5 x 6 = 30 tokens (padded to 32)
    enc = VisionLSTM(img_size=64, embed_dim=48, depths=(2, 1), mlstm_kernel="triton").eval()
    x = torch.randn(1, 3, 80, 96)
    with torch.no_grad():
        got = enc(x)
        assert len(triton_calls) == 3  # one per mLSTM layer
        with torch.autocast("cpu", dtype=torch.bfloat16), CudaAutocastPolicy():
            amp = enc(x)
        assert len(triton_calls) == 6
        for m in enc.modules():
            if hasattr(m, "mlstm_kernel"):
                m.mlstm_kernel = "native"
        ref = enc(x)
    for g, a, r in zip(got, amp, ref):
        assert _rel(g, r) < 1e-3
        assert ((a - r).norm() / r.norm()).item() < 0.01


@interpreted
def test_triton_refuses_to_train():
    q, k, v, i, f = (t.requires_grad_() for t in _inputs(32, 64, seed=1))
    with pytest.raises(TritonTrainingError, match="cannot train"):
        mlstm(q, k, v, i, f, kernel="triton")
    enc = VisionLSTM(img_size=32, embed_dim=32, depths=(1,), mlstm_kernel="triton")
    with pytest.raises(TritonTrainingError, match="mlstm_kernel='auto'"):
        enc(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("d,padded", [(16, 16), (24, 32), (48, 64), (64, 64), (96, 128), (192, 192), (200, 256)])
def test_triton_head_dims(d, padded):
    assert triton_head_dim(d) == padded


def test_a_failing_triton_call_never_disables_triton(monkeypatch):
    """Per call: a failure under ``auto`` warns naming the shape and that call runs the PyTorch kernel; the
    next call tries Triton again. Under ``triton`` the failure is raised, naming the shape."""
    calls = []

    def fake_triton(q, k, v, i, f, *, chunk_size, eps):
        calls.append(q.shape[2])
        if q.shape[2] == 8:
            raise AssertionError("Sequence length must be divisible by 16.")
        return chunkwise(q, k, v, i, f, chunk_size=chunk_size, eps=eps)

    monkeypatch.setattr(backends, "triton_chunkwise", fake_triton)
    monkeypatch.setattr(dispatch, "wants_triton", lambda x, kernel: True)
    short, long = _inputs(8, 16, seed=2), _inputs(40, 16, seed=3)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match=r"shape \(1, 2, 8, 16\)"):
            got = mlstm(*short, kernel="auto")
        torch.testing.assert_close(got, chunkwise(*short, chunk_size=64, eps=1e-6))
        mlstm(*long, kernel="auto")
        assert calls == [8, 40]  # the second call went to Triton again
        with pytest.raises(RuntimeError, match=r"Triton kernel failed for q of shape \(1, 2, 8, 16\)"):
            mlstm(*short, kernel="triton")
        mlstm(*long, kernel="triton")
    assert calls == [8, 40, 8, 40]
