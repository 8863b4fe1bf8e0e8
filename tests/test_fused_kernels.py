"""The Inductor-compiled elementwise kernel of the CPU inference path (seglstm.models.vil.kernels): the
compiled layer against the eager fused path (fp32, 1e-5), bf16 activations against fp32, when the kernels
run, and the eager fallback when a compile fails."""

from __future__ import annotations

import pytest
import torch

from seglstm.models.vil import ViLLayer, kernels
from seglstm.models.vil.workspace import workspace


def _layer(seed: int) -> ViLLayer:
    layer = ViLLayer(64, reverse=True, num_heads=2, chunk_size=32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return layer.eval()


def _run(layer: ViLLayer, x: torch.Tensor, mode: str, monkeypatch, amp: torch.dtype | None = None) -> torch.Tensor:
    monkeypatch.setenv("SEGLSTM_INDUCTOR", mode)
    ctx = torch.autocast("cpu", amp) if amp else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), workspace(), ctx:
        return layer(x).clone()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_compiled_layer_matches_eager_fused_path_and_bf16_stays_close(monkeypatch):
    layer = _layer(3)
    x = torch.randn(2, 250, 64, generator=torch.Generator().manual_seed(4))  # padded to 256 tokens
    eager = _run(layer, x, "0", monkeypatch)
    compiled = _run(layer, x, "1", monkeypatch)
    assert (compiled - eager).abs().max() / eager.abs().max() < 1e-5
    with torch.no_grad():
        assert _rel(eager, layer.reference_forward(x)) < 1e-5
        # rounding only the two projections' operands to bf16 (the reference forward's policy)
        ref_err = _rel(layer.reference_forward(x, torch.bfloat16), eager)
    for mode in ("0", "1"):  # CPU inference keeps every activation outside the float32 cell in bf16
        assert _rel(_run(layer, x, mode, monkeypatch, torch.bfloat16), eager) < 1.2 * ref_err


def test_kernels_run_only_for_large_cpu_inference_inputs(monkeypatch):
    big = torch.empty(kernels.MIN_ELEMENTS)
    monkeypatch.setenv("SEGLSTM_INDUCTOR", "auto")
    monkeypatch.setattr(kernels, "_have_compiler", lambda: True)
    with torch.no_grad():
        assert kernels.enabled(big) and not kernels.enabled(big[:-1])
        assert not kernels.enabled(torch.empty(kernels.MIN_ELEMENTS, device="meta"))
    assert not kernels.enabled(big.requires_grad_())  # autograd on
    monkeypatch.setattr(kernels, "_have_compiler", lambda: False)
    with torch.no_grad():
        assert not kernels.enabled(big)
        monkeypatch.setenv("SEGLSTM_INDUCTOR", "1")
        assert kernels.enabled(big[:8])
        monkeypatch.setenv("SEGLSTM_INDUCTOR", "0")
        assert not kernels.enabled(big)
        monkeypatch.setenv("SEGLSTM_INDUCTOR", "yes")
        with pytest.raises(ValueError, match="SEGLSTM_INDUCTOR must be one of"):
            kernels.enabled(big)


def test_failed_compile_warns_naming_the_kernel_and_runs_eager(monkeypatch):
    def broken(fn):
        def call(*args):
            raise RuntimeError("no C++ compiler\nmore detail")
        return call

    monkeypatch.setattr(kernels, "_compiled", broken)
    layer = _layer(5)
    x = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(6))
    eager = _run(layer, x, "0", monkeypatch)
    with pytest.warns(RuntimeWarning, match=r"norm_skip_gate_into could not be compiled .*no C\+\+ compiler; this call"):
        got = _run(layer, x, "1", monkeypatch)
    assert (got - eager).abs().max() / eager.abs().max() < 1e-5
