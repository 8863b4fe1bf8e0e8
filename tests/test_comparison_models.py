"""Comparison segmenters (CNN, Transformer, Mamba): the timm encoder wrapper, every preset's build, forward,
backward and training signal, parameter counts against timm plus mmseg-configured heads, and the FLOP counter."""

import math

import pytest
import timm
import torch
from torch import nn

from seglstm.models.comparison import COMPARISON_MODELS
from seglstm.models.flops import count_flops, count_params
from seglstm.models.heads import DepthwiseSeparableASPPHead, FCNHead, PSPHead, UPerHead
from seglstm.models.necks import MultiLevelNeck
from seglstm.models.registry import create_model, list_models
from seglstm.models.timm_encoders import TimmEncoder

K = 5  # classes in the training tests


# ----------------------------------------------------------------------------------------------------------
# TimmEncoder

# Swin and ViT at reduced width/depth: the size handling under test does not depend on either.
_SWIN_SMALL = {"embed_dim": 16, "depths": (1, 1, 2, 1), "num_heads": (1, 1, 2, 2)}
_VIT_SMALL = {"embed_dim": 32, "depth": 6, "num_heads": 2}
ENCODERS = {
    "resnet18_d8": ("resnet18", {"out_indices": (1, 2, 3, 4), "output_stride": 8}),
    "hrnet_w18_small_v2": ("hrnet_w18_small_v2", {"out_indices": (1, 2, 3, 4), "feature_location": ""}),
    "swin_t": ("swin_tiny_patch4_window7_224", {"strict_img_size": False, "pad_multiple": 4, **_SWIN_SMALL}),
    "vit_s": (
        "vit_small_patch16_224",
        {"mode": "intermediates", "out_indices": (1, 3, 4, 5), "dynamic_img_size": True, **_VIT_SMALL},
    ),
}


@pytest.mark.parametrize("key", list(ENCODERS))
def test_timm_encoder_any_size(key):
    name, kw = ENCODERS[key]
    torch.manual_seed(0)
    enc = TimmEncoder(name, **kw).eval()
    assert enc.out_channels == [f["num_chs"] for f in enc.feature_info]
    h, w = 67, 93
    with torch.no_grad():
        outs = enc(torch.randn(1, 3, h, w))
    assert [tuple(o.shape) for o in outs] == [
        (1, f["num_chs"], math.ceil(h / f["reduction"]), math.ceil(w / f["reduction"]))
        for f in enc.feature_info
    ]


def test_swin_and_vit_outputs_are_timms_own():
    """The wrapper must only reorder axes / select blocks: compare with timm's models holding the same weights."""
    torch.manual_seed(1)
    x = torch.randn(1, 3, 64, 96)  # a multiple of every stride: no padding involved

    swin = TimmEncoder("swin_tiny_patch4_window7_224", strict_img_size=False, **_SWIN_SMALL).eval()
    ref = timm.create_model(
        "swin_tiny_patch4_window7_224", features_only=True, strict_img_size=False, **_SWIN_SMALL
    ).eval()
    ref.load_state_dict(swin.model.state_dict())
    with torch.no_grad():
        for got, want in zip(swin(x), ref(x), strict=True):  # timm's Swin features are NHWC
            torch.testing.assert_close(got, want.permute(0, 3, 1, 2))

    vit = TimmEncoder(
        "vit_small_patch16_224", mode="intermediates", out_indices=(2, 4), dynamic_img_size=True, **_VIT_SMALL
    )
    full = timm.create_model("vit_small_patch16_224", dynamic_img_size=True, **_VIT_SMALL).eval()
    full.load_state_dict(vit.model.state_dict(), strict=False)  # the wrapper pruned block 5, norm, head
    assert len(vit.model.blocks) == 5
    with torch.no_grad():
        tokens = full.patch_embed(x)
        tokens = full._pos_embed(tokens)
        taps = []
        for i, blk in enumerate(full.blocks):
            tokens = blk(tokens)
            if i in (2, 4):
                taps.append(tokens[:, 1:].reshape(1, 4, 6, -1).permute(0, 3, 1, 2))
        for got, want in zip(vit.eval()(x), taps, strict=True):
            torch.testing.assert_close(got, want)


def test_no_weight_decay_names_exist():
    vit = TimmEncoder("vit_small_patch16_224", mode="intermediates", out_indices=(1,), **_VIT_SMALL)
    assert vit.no_weight_decay() == {"model.pos_embed", "model.cls_token"}
    swin = TimmEncoder("swin_tiny_patch4_window7_224", **_SWIN_SMALL)
    names = dict(swin.named_parameters())
    skipped = swin.no_weight_decay()
    assert len(skipped) == sum(_SWIN_SMALL["depths"]) and all(n in names for n in skipped)


def test_timm_encoder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        TimmEncoder("resnet18", mode="hooks")
    with pytest.raises(ValueError, match="out of range"):
        TimmEncoder("vit_small_patch16_224", mode="intermediates", out_indices=(2, 12))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        TimmEncoder("resnet18", out_indices=(1,))(torch.randn(3, 32, 32))


# ----------------------------------------------------------------------------------------------------------
# parameter counts: timm's encoder + the heads of mmseg's configs, built here independently


def _timm_count(name, **kw):
    prune = kw.pop("prune", None)
    model = timm.create_model(name, **kw)
    if prune is not None:
        model.prune_intermediate_layers(list(prune), prune_norm=True, prune_head=True)
    return count_params(model)


def _aux(cin, ch=256, idx=2):
    return FCNHead(cin, ch, num_classes=K, in_index=idx, num_convs=1, concat_input=False)


def _dlv3p(cin, c1, ch, c1_ch):
    return DepthwiseSeparableASPPHead(
        cin, ch, num_classes=K, in_index=3, dilations=(1, 12, 24, 36), c1_in_channels=c1, c1_channels=c1_ch
    )


def _fcn_hr(widths):
    return FCNHead(
        list(widths),
        sum(widths),
        num_classes=K,
        in_index=(0, 1, 2, 3),
        input_transform="resize_concat",
        kernel_size=1,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.0,
    )


def _uper(widths):
    return UPerHead(list(widths), 512, num_classes=K, in_index=(0, 1, 2, 3), pool_scales=(1, 2, 3, 6))


_D8 = {"features_only": True, "out_indices": (1, 2, 3, 4), "output_stride": 8}
_HR = {"features_only": True, "out_indices": (1, 2, 3, 4), "feature_location": ""}
TIMM_PRESETS = {
    "deeplabv3plus_r18": ("resnet18", _D8, lambda: [_dlv3p(512, 64, 128, 12), _aux(256, 64)]),
    "deeplabv3plus_r50": ("resnet50", _D8, lambda: [_dlv3p(2048, 256, 512, 48), _aux(1024)]),
    "deeplabv3plus_r101": ("resnet101", _D8, lambda: [_dlv3p(2048, 256, 512, 48), _aux(1024)]),
    "pspnet_r18": ("resnet18", _D8, lambda: [PSPHead(512, 128, num_classes=K, in_index=3), _aux(256, 64)]),
    "pspnet_r50": ("resnet50", _D8, lambda: [PSPHead(2048, 512, num_classes=K, in_index=3), _aux(1024)]),
    "pspnet_r101": ("resnet101", _D8, lambda: [PSPHead(2048, 512, num_classes=K, in_index=3), _aux(1024)]),
    "fcn_hr18s": ("hrnet_w18_small_v2", _HR, lambda: [_fcn_hr((18, 36, 72, 144))]),
    "fcn_hr18": ("hrnet_w18", _HR, lambda: [_fcn_hr((18, 36, 72, 144))]),
    "fcn_hr48": ("hrnet_w48", _HR, lambda: [_fcn_hr((48, 96, 192, 384))]),
    "vit_s_upernet": (
        "vit_small_patch16_224",
        {"num_classes": 0, "img_size": 512, "dynamic_img_size": True, "prune": (2, 5, 8, 11)},
        lambda: [MultiLevelNeck([384] * 4, 384, scales=(4, 2, 1, 0.5)), _uper([384] * 4), _aux(384, idx=3)],
    ),
    "swin_t_upernet": (
        "swin_tiny_patch4_window7_224",
        {"features_only": True, "strict_img_size": False},
        lambda: [_uper((96, 192, 384, 768)), _aux(384)],
    ),
}


@pytest.mark.parametrize("preset", list(TIMM_PRESETS))
def test_param_count_is_timm_encoder_plus_heads(preset):
    timm_name, timm_kw, heads = TIMM_PRESETS[preset]
    with torch.device("meta"):  # counting needs shapes only
        model = create_model(preset, num_classes=K)
        encoder_params = _timm_count(timm_name, **timm_kw)
        expected_heads = heads()
    parts = [m for m in (model.neck, model.decode_head, model.auxiliary_head) if m is not None]
    assert [type(p) for p in parts] == [type(h) for h in expected_heads]
    for part, want in zip(parts, expected_heads, strict=True):
        assert count_params(part) == count_params(want), type(part).__name__
    assert count_params(model.backbone) == encoder_params
    assert count_params(model) == encoder_params + sum(count_params(h) for h in expected_heads)


def test_mamba_upernet_structure():
    with torch.device("meta"):
        model = create_model("mamba_upernet", num_classes=K)
        expected = [_uper((96, 192, 384, 768)), _aux(384)]
    assert model.backbone.out_channels == [96, 192, 384, 768]
    assert [len(s.blocks) for s in model.backbone.stages] == [2, 2, 9, 2]
    heads = [model.decode_head, model.auxiliary_head]
    assert [count_params(h) for h in heads] == [count_params(h) for h in expected]


def test_presets_registered_and_overrides_routed():
    assert set(COMPARISON_MODELS) <= set(list_models())
    with torch.device("meta"):
        model = create_model("pspnet_r18", num_classes=3, channels=32, auxiliary=False, drop_path_rate=0.05)
        hr = create_model("fcn_hr18s", num_classes=3, channels=40)
    assert model.decode_head.channels == 32 and model.auxiliary_head is None
    assert hr.decode_head.channels == 40
    with pytest.raises(ValueError, match="pretrained"):
        create_model("mamba_upernet", num_classes=3, pretrained=True)
    with pytest.raises(TypeError):
        create_model("pspnet_r18", num_classes=3, no_such_option=1)


# ----------------------------------------------------------------------------------------------------------
# training signal: build, forward, backward, loss decreasing on a fixed batch

# Ten seconds to minutes each on a busy 2-core CPU (Mamba most: its PyTorch scan is memory-bound). The fast
# suite keeps one preset per builder family: deeplabv3plus_r18 (ResNet-d8), fcn_hr18s (HRNet) and the small
# variants below.
_SLOW = {
    "pspnet_r18",
    "fcn_hr18",
    "deeplabv3plus_r50",
    "deeplabv3plus_r101",
    "pspnet_r50",
    "pspnet_r101",
    "fcn_hr48",
    "vit_s_upernet",
    "swin_t_upernet",
    "mamba_upernet",
}
# Scaled-down versions of the heavy Transformer / Mamba presets keep their builders in the fast suite.
_SMALL = {
    "mamba_upernet[small]": (
        "mamba_upernet",
        {"dims": 16, "depths": (1, 1, 1, 1), "d_state": 4, "channels": 32},
    ),
    "swin_t_upernet[small]": (
        "swin_t_upernet",
        {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "channels": 32},
    ),
    "vit_s_upernet[small]": (
        "vit_s_upernet",
        {"embed_dim": 32, "depth": 4, "num_heads": 2, "out_indices": (0, 1, 2, 3), "channels": 32},
    ),
}
CASES = [
    pytest.param(name, name, {}, id=name, marks=[pytest.mark.slow] if name in _SLOW else [])
    for name in COMPARISON_MODELS
] + [pytest.param(preset, key, kw, id=key) for key, (preset, kw) in _SMALL.items()]


def _toy_batch(gen):
    """Labels in blocks, pixels coloured by their label plus noise: learnable, but not at initialisation."""
    mask = torch.randint(0, K, (2, 8, 10), generator=gen).repeat_interleave(16, 1).repeat_interleave(16, 2)
    colours = torch.randn(K, 3, generator=gen)
    img = colours[mask].permute(0, 3, 1, 2) + 0.5 * torch.randn(2, 3, 128, 160, generator=gen)
    return img, mask


@pytest.mark.parametrize(("preset", "label", "overrides"), CASES)
def test_preset_trains(preset, label, overrides):
    torch.manual_seed(0)
    model = create_model(preset, num_classes=K, **overrides)
    img, mask = _toy_batch(torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        logits = model(img)
    assert logits.shape == (2, K, 128, 160) and torch.isfinite(logits).all()

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        loss = model.loss(img, mask)["loss"]
        opt.zero_grad()
        loss.backward()
        if not losses:  # every parameter takes part in the loss
            unused = [n for n, p in model.named_parameters() if p.grad is None]
            assert not unused, unused[:5]
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(model.loss(img, mask)["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.95 * losses[0], f"{label}: losses {losses}"


# ----------------------------------------------------------------------------------------------------------
# FLOP counter


def test_flop_counter_on_known_modules():
    # Conv2d(3 -> 8, 3x3) on 16x20: one multiply-add per (output element, input channel, tap); bias not counted.
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_flops(conv, (1, 3, 16, 20)) == 2 * (8 * 16 * 20) * (3 * 3 * 3)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 5, 7))
    assert count_flops(lin, (2, 3, 4, 5)) == 2 * 2 * 60 * 7
    # Elementwise work is not counted; the module's train/eval mode is restored; meta models need no data.
    net = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    net.train()
    assert count_flops(net, (1, 3, 8, 8)) == 2 * 4 * 3 * 64
    assert net.training
    with torch.device("meta"):
        big = nn.Conv2d(64, 64, 3, padding=1)
    assert count_flops(big, (4, 64, 256, 256)) == 2 * 4 * 64 * 256 * 256 * 64 * 9
    with pytest.raises(ValueError, match="input_size"):
        count_flops(conv, (1, 3, 0, 4))


def test_count_params():
    lin = nn.Linear(10, 4)
    assert count_params(lin) == 44
    lin.bias.requires_grad_(False)
    assert count_params(lin, trainable_only=True) == 40
