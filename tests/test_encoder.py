"""The Vision-LSTM encoder: layer math (the layer's own reference forward and its fused path against the
independent float64 reference in tests/references/vil.py), directions, causality, shapes, presets and
checkpoint loading."""

import math

import pytest
import torch
import torch.nn.functional as F

import seglstm
from seglstm.models.checkpoint import CheckpointMismatchError
from seglstm.models.vil import ViLBlock, ViLLayer, VisionLSTM
from tests.references.vil import reference_vil_layer


def _randomize(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Give every parameter non-trivial values (zero-initialised offsets would hide mistakes)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("backend", ["chunkwise", "parallel", "recurrent"])
def test_layer_matches_reference(reverse, backend):
    gen = torch.Generator().manual_seed(7)
    layer = ViLLayer(16, reverse=reverse, mlstm_backend=backend, chunk_size=8).double()
    _randomize(layer, gen)
    x = torch.randn(2, 21, 16, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        got, own, ref = layer(x), layer.reference_forward(x), reference_vil_layer(layer, x)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-6
    assert ((own - ref).abs().max() / ref.abs().max()).item() < 1e-6


def test_reverse_block_is_flipped_forward_block():
    gen = torch.Generator().manual_seed(11)
    fwd = ViLBlock(16, reverse=False, chunk_size=8).double()
    _randomize(fwd, gen)
    rev = ViLBlock(16, reverse=True, chunk_size=8).double()
    rev.load_state_dict(fwd.state_dict())
    x = torch.randn(2, 30, 16, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(rev(x), fwd(x.flip(1)).flip(1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reverse", [False, True])
def test_block_is_causal_in_its_direction(reverse):
    gen = torch.Generator().manual_seed(5)
    block = ViLBlock(16, reverse=reverse, chunk_size=8).double()
    _randomize(block, gen)
    x = torch.randn(1, 24, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    t = 9
    (grad,) = torch.autograd.grad(block(x)[0, t].sum(), x)
    influence = grad[0].abs().sum(-1)
    later = influence[t + 1 :] if not reverse else influence[:t]
    earlier = influence[: t + 1] if not reverse else influence[t:]
    assert later.max().item() == 0.0
    assert (earlier > 0).all()


def test_block_directions_alternate_and_restart_per_stage():
    enc = VisionLSTM(img_size=64, embed_dim=32, depths=(3, 2))
    dirs = [[blk.layer.reverse for blk in stage] for stage in enc.stages]
    assert dirs == [[False, True, False], [False, True]]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("hw", [(64, 64), (96, 160), (100, 130)])
def test_stage_maps_for_any_size(batch, hw):
    enc = VisionLSTM(img_size=64, embed_dim=32, depths=(1, 2, 1, 1))
    out = enc(torch.randn(batch, 3, *hw))
    grid = (math.ceil(hw[0] / 16), math.ceil(hw[1] / 16))
    assert len(out) == 4
    for o in out:
        assert o.shape == (batch, 32, *grid)
        assert torch.isfinite(o).all()
    assert enc.out_channels == [32] * 4
    assert [f["reduction"] for f in enc.feature_info] == [16] * 4


def test_chunkwise_and_parallel_encoders_agree_float32():
    torch.manual_seed(0)
    enc = VisionLSTM(img_size=64, embed_dim=32, depths=(2, 2), chunk_size=16)
    x = torch.randn(2, 3, 80, 112)
    out_c = enc(x)
    enc.set_mlstm_backend("parallel")
    out_p = enc(x)
    for a, b in zip(out_c, out_p):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5


def test_drop_path_schedule():
    enc = VisionLSTM(img_size=32, embed_dim=16, depths=(2, 3), drop_path_rate=0.4)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in enc.stages for b in s]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    enc = VisionLSTM(img_size=32, embed_dim=16, depths=(2, 3), drop_path_rate=0.2, drop_path_decay="constant")
    assert all(b.drop_path.drop_prob == 0.2 for s in enc.stages for b in s)


def test_presets_and_seed_parameter_count():
    assert {"vil_t", "vil_s", "vil_b", "vil_t_44124", "vil_s_44124", "vil_b_44124"} <= set(seglstm.list_encoders())
    enc = seglstm.create_encoder("vil_s")
    assert sum(p.numel() for p in enc.parameters()) == 22_724_160  # the seed's 22.72 M
    assert enc.depths == (6, 6, 6, 6) and enc.embed_dim == 384
    assert seglstm.create_encoder("vil_s_44124", img_size=256).depths == (4, 4, 12, 4)
    with pytest.raises(ValueError, match="vil_s"):
        seglstm.create_encoder("vil_small")


def _public_state_dict(depth: int, dim: int, grid: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A Vision-LSTM v1 classification checkpoint spelled with the public key names (docs/design.md,
    section 5)."""
    e = 2 * dim
    sd = {
        "patch_embed.proj.weight": (dim, 3, 16, 16),
        "patch_embed.proj.bias": (dim,),
        "pos_embed.embed": (1, grid, grid, dim),
        "legacy_norm.weight": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
        "head.weight": (1000, dim),
        "head.bias": (1000,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({
            p + "norm.weight": (dim,),
            p + "layer.proj_up.weight": (2 * e, dim),
            p + "layer.proj_down.weight": (dim, e),
            p + "layer.q_proj.weight": (e // 4, 4, 4),
            p + "layer.k_proj.weight": (e // 4, 4, 4),
            p + "layer.v_proj.weight": (e // 4, 4, 4),
            p + "layer.conv1d.conv.weight": (e, 1, 4),
            p + "layer.conv1d.conv.bias": (e,),
            p + "layer.mlstm_cell.igate.weight": (4, 3 * e),
            p + "layer.mlstm_cell.igate.bias": (4,),
            p + "layer.mlstm_cell.fgate.weight": (4, 3 * e),
            p + "layer.mlstm_cell.fgate.bias": (4,),
            p + "layer.mlstm_cell.outnorm.weight": (e,),
            p + "layer.learnable_skip": (e,),
        })
    return {k: torch.randn(s, generator=gen) for k, s in sd.items()}


def test_vil_v1_checkpoint_loads_and_resamples_position_table():
    gen = torch.Generator().manual_seed(3)
    sd = _public_state_dict(depth=6, dim=32, grid=14, gen=gen)  # a 224-pixel classification model
    enc = VisionLSTM(img_size=128, embed_dim=32, depths=(2, 4))
    report = seglstm.load_pretrained(enc, sd)
    assert report.format == "vision-lstm-v1" and not report.missing_keys
    # block 3 (flat) is stage 2, block 1
    torch.testing.assert_close(enc.blocks2[1].layer.proj_up.weight, sd["blocks.3.layer.proj_up.weight"])
    table = enc.pos_embed.embed
    assert table.shape == (1, 8, 8, 32)
    expected = F.interpolate(sd["pos_embed.embed"].permute(0, 3, 1, 2), size=(8, 8), mode="bicubic",
                             align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(table.detach(), expected)


def test_checkpoint_with_missing_block_names_the_key():
    gen = torch.Generator().manual_seed(4)
    sd = _public_state_dict(depth=4, dim=32, grid=4, gen=gen)
    del sd["blocks.2.layer.q_proj.weight"]
    enc = VisionLSTM(img_size=64, embed_dim=32, depths=(2, 2))
    with pytest.raises(CheckpointMismatchError, match=r"blocks2\.0\.layer\.q_proj\.weight"):
        seglstm.load_pretrained(enc, sd)


def test_checkpoint_with_wrong_depth_or_width_is_explained():
    gen = torch.Generator().manual_seed(5)
    enc = VisionLSTM(img_size=64, embed_dim=32, depths=(2, 2))
    with pytest.raises(ValueError, match="6 blocks but the model has 4"):
        seglstm.load_pretrained(enc, _public_state_dict(depth=6, dim=32, grid=4, gen=gen))
    with pytest.raises(CheckpointMismatchError, match=r"patch_embed\.proj\.weight: checkpoint"):
        seglstm.load_pretrained(enc, _public_state_dict(depth=4, dim=48, grid=4, gen=gen))


def test_own_and_mmseg_backbone_state_dicts_round_trip(tmp_path):
    torch.manual_seed(0)
    src = VisionLSTM(img_size=64, embed_dim=32, depths=(2, 2))
    dst = VisionLSTM(img_size=64, embed_dim=32, depths=(2, 2))
    dst.load_state_dict(src.state_dict(), strict=True)
    mmseg = {"meta": {"mmseg_version": "1.2.1"},
             "state_dict": {f"backbone.{k}": v for k, v in src.state_dict().items()}
             | {"decode_head.conv_seg.weight": torch.randn(7, 8, 1, 1)}}
    path = tmp_path / "iter_15000.pth"
    torch.save(mmseg, path)
    dst = VisionLSTM(img_size=128, embed_dim=32, depths=(2, 2))  # different table size: resampled
    report = seglstm.load_pretrained(dst, path)
    assert report.format == "mmseg-backbone"
    torch.testing.assert_close(dst.blocks2[1].layer.v_proj.weight, src.blocks2[1].layer.v_proj.weight)
    assert dst.pos_embed.embed.shape == (1, 8, 8, 32)
