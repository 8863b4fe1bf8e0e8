"""The ViL layer's inference buffers (seglstm.models.vil.workspace): allocated once per geometry and shared by
the layers of a pass, and every misuse (another geometry, a claim inside a claim, buffers under autograd, an
in-place residual under autograd) fails with a clear error."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from seglstm.models.vil import ViLBlock, ViLLayer, VisionLSTM
from seglstm.models.vil.mlstm import chunkwise_feature_major
from seglstm.models.vil.workspace import CellBuffers, Geometry, LayerBuffers, workspace


def _geometry(**changes) -> Geometry:
    g = Geometry(
        batch=2, tokens=30, seq=32, dim=16, inner=32, heads=4, chunk=16, dtype=torch.float32, act=torch.float32,
        device=torch.device("cpu"),
    )  # fmt: skip
    return dataclasses.replace(g, **changes)


def test_fields_have_the_geometry_shapes():
    buf = LayerBuffers.allocate(_geometry(act=torch.bfloat16))
    assert buf.up.shape == (2, 64, 32) and buf.up.dtype == torch.bfloat16
    assert buf.flip_in.shape == (2, 30, 16) and buf.x_act.dtype == torch.bfloat16 and buf.x_m.dtype == torch.float32
    assert buf.v1.shape == (2, 4, 9, 32) and buf.cell.states.shape == (2, 4, 2, 9, 8)
    plain = LayerBuffers.allocate(_geometry(chunk=0))
    assert plain.cell is None and plain.x_act is None and plain.x_m is None


@pytest.mark.parametrize(
    "change", [{"batch": 3}, {"seq": 48}, {"dtype": torch.float64}, {"act": torch.bfloat16}, {"device": torch.device("meta")}]
)
def test_claim_for_another_geometry_raises(change):
    buf = LayerBuffers.allocate(_geometry())
    with pytest.raises(ValueError, match=r"layer buffers allocated for Geometry.* cannot serve a call with"):
        with buf.claim(_geometry(**change)):
            pass


def test_claim_inside_a_claim_raises_and_the_buffers_free_afterwards():
    g = _geometry()
    buf = LayerBuffers.allocate(g)
    with buf.claim(g):
        with pytest.raises(RuntimeError, match="already in use"):
            with buf.claim(g):
                pass
    with pytest.raises(KeyError):  # an error inside a claim releases it too
        with buf.claim(g):
            raise KeyError("x")
    with buf.claim(g) as again:
        assert again is buf


def test_layer_call_on_claimed_buffers_raises():
    """A layer called while another call holds the workspace's buffers (e.g. from a hook) must not
    overwrite them."""
    layer = ViLLayer(16, reverse=False, chunk_size=16).eval()
    x = torch.randn(2, 30, 16)
    with torch.no_grad(), workspace() as ws:
        layer(x)
        (g,) = ws._buffers  # the geometry the call used
        with ws.buffers(g).claim(g), pytest.raises(RuntimeError, match="already in use"):
            layer(x)


def test_encoder_pass_allocates_one_set_of_buffers_and_results_survive_the_next_pass(monkeypatch):
    enc = VisionLSTM(img_size=64, embed_dim=32, depths=(2, 3), chunk_size=16).eval()
    allocations = []
    original = LayerBuffers.allocate.__func__

    def counted(cls, g):
        allocations.append(g)
        return original(cls, g)

    monkeypatch.setattr(LayerBuffers, "allocate", classmethod(counted))
    x1, x2 = torch.randn(2, 1, 3, 64, 96)
    with torch.no_grad():
        first = enc(x1)
        kept = [t.clone() for t in first]
        enc(x2)
    assert len(allocations) == 2  # one per pass, shared by all five layers
    for t, k in zip(first, kept):
        torch.testing.assert_close(t, k, rtol=0, atol=0)


@pytest.mark.parametrize("wrong", [{"length": 4, "chunks": 4}, {"d": 8}, {"like": torch.empty(0, dtype=torch.float64)}])
def test_cell_buffers_of_another_shape_or_dtype_raise(wrong):
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 1, 2, 4, 16, generator=gen)
    v1 = torch.randn(1, 2, 5, 16, generator=gen)
    i, f = torch.randn(2, 1, 2, 16, generator=gen)
    args = {"batch": 1, "heads": 2, "d": 4, "dv1": 5, "chunks": 2, "length": 8, "like": q}
    with torch.no_grad():
        right = chunkwise_feature_major(q, k, v1, i, f, chunk_size=8, buffers=CellBuffers.allocate(**args))
        fresh = chunkwise_feature_major(q, k, v1, i, f, chunk_size=8)
        torch.testing.assert_close(right[0], fresh[0])
        with pytest.raises(ValueError, match=r"cell buffer \w+ is .* the call needs"):
            chunkwise_feature_major(q, k, v1, i, f, chunk_size=8, buffers=CellBuffers.allocate(**{**args, **wrong}))


def test_buffers_and_in_place_residuals_refuse_autograd():
    q = torch.randn(1, 2, 4, 16, requires_grad=True)
    v1 = torch.randn(1, 2, 5, 16)
    i, f = torch.randn(2, 1, 2, 16)
    buffers = CellBuffers.allocate(1, 2, 4, 5, 2, 8, q)
    with pytest.raises(ValueError, match="buffers are for inference"):
        chunkwise_feature_major(q, q, v1, i, f, chunk_size=8, buffers=buffers)
    block = ViLBlock(16, reverse=False)
    with pytest.raises(ValueError, match="only without autograd"):
        block(torch.randn(1, 8, 16), inplace=True)
