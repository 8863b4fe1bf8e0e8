"""Decode heads and the neck against hand-written float64 references of mmseg's forward math."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seglstm.models.heads import (
    ANNHead,
    APCHead,
    ASPPHead,
    ConvModule,
    DepthwiseSeparableASPPHead,
    FCNHead,
    PSPHead,
    UPerHead,
)
from seglstm.models.necks import MultiLevelNeck

K = 5  # classes


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Float64, eval mode, random BN statistics/affines and random (non-zero) plain convs, so that every
    term of the reference matters."""
    g = torch.Generator().manual_seed(seed)
    module.double().eval()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g, dtype=torch.float64))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g, dtype=torch.float64))
                m.weight.copy_(0.5 + torch.rand(n, generator=g, dtype=torch.float64))
                m.bias.copy_(0.2 * torch.randn(n, generator=g, dtype=torch.float64))
            elif isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g, dtype=torch.float64))
    return module


def feats(shapes: list[tuple[int, int, int]], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, h, w, generator=g, dtype=torch.float64) for c, h, w in shapes]


def cbr(x: torch.Tensor, m: ConvModule, padding: int = 0, dilation: int = 1, groups: int = 1, act: bool = True):
    """conv -> BN (inference form, written out) -> ReLU."""
    y = F.conv2d(x, m.conv.weight, None, 1, padding, dilation, groups)
    bn = m.bn
    shape = (1, -1, 1, 1)
    y = (y - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
    y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.clamp_min(0) if act else y


def up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=False)


def classify(head, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, head.conv_seg.weight, head.conv_seg.bias)


def ref_ppm(x: torch.Tensor, ppm, scales) -> list[torch.Tensor]:
    outs = []
    for s, stage in zip(scales, ppm):
        pooled = x.mean(dim=(2, 3), keepdim=True) if s == 1 else F.adaptive_avg_pool2d(x, s)
        outs.append(up(cbr(pooled, stage[1]), x))
    return outs


# ----------------------------------------------------------------------------------------------------------


def test_conv_module_layout():
    with_bn, plain = ConvModule(4, 6, 3, padding=1), ConvModule(4, 6, 1, norm=False, act=False)
    assert with_bn.conv.bias is None and isinstance(with_bn.bn, nn.BatchNorm2d)
    assert set(plain.state_dict()) == {"conv.weight", "conv.bias"}
    assert set(with_bn.state_dict()) == {
        "conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"
    }


def test_uper_head_matches_reference_on_a_real_pyramid():
    chans = [6, 8, 10, 12]
    head = randomize(UPerHead(chans, 16, num_classes=K))
    xs = feats([(6, 16, 20), (8, 8, 10), (10, 4, 5), (12, 2, 3)])
    x3 = xs[3]
    top = cbr(torch.cat([x3, *ref_ppm(x3, head.psp_modules, (1, 2, 3, 6))], 1), head.bottleneck, padding=1)
    lat = [cbr(xs[i], head.lateral_convs[i]) for i in range(3)] + [top]
    for i in (3, 2, 1):
        lat[i - 1] = lat[i - 1] + up(lat[i], lat[i - 1])
    outs = [cbr(lat[i], head.fpn_convs[i], padding=1) for i in range(3)] + [lat[3]]
    fused = cbr(torch.cat([outs[0]] + [up(o, outs[0]) for o in outs[1:]], 1), head.fpn_bottleneck, padding=1)
    got = head(xs)
    assert got.shape == (2, K, 16, 20)
    torch.testing.assert_close(got, classify(head, fused), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dilations", [(1, 12, 24, 36), (1, 2, 3)])
def test_aspp_head_matches_direct_formula(dilations):
    head = randomize(ASPPHead(6, 8, num_classes=K, in_index=1, dilations=dilations))
    xs = feats([(3, 5, 5), (6, 7, 9)])
    x = xs[1]
    # image pool as a direct formula: global mean -> 1x1 conv as a matrix product -> BN -> ReLU, broadcast
    pool = head.image_pool[1]
    mean = x.mean(dim=(2, 3))
    z = mean @ pool.conv.weight[:, :, 0, 0].T
    z = (z - pool.bn.running_mean) / torch.sqrt(pool.bn.running_var + pool.bn.eps) * pool.bn.weight + pool.bn.bias
    branches = [z.clamp_min(0)[:, :, None, None].expand(-1, -1, 7, 9)]
    for d, m in zip(dilations, head.aspp_modules):
        branches.append(cbr(x, m) if d == 1 else cbr(x, m, padding=d, dilation=d))
    fused = cbr(torch.cat(branches, 1), head.bottleneck, padding=1)
    torch.testing.assert_close(head(xs), classify(head, fused), rtol=1e-10, atol=1e-10)


def test_depthwise_separable_aspp_head_matches_reference():
    head = randomize(DepthwiseSeparableASPPHead(6, 8, num_classes=K, in_index=1, c1_in_channels=4, c1_channels=3,
                                                dilations=(1, 2)))
    assert set(dict(head.aspp_modules[1].named_children())) == {"depthwise_conv", "pointwise_conv"}
    xs = feats([(4, 12, 14), (6, 6, 7)])
    x = xs[1]
    branches = [up(cbr(F.adaptive_avg_pool2d(x, 1), head.image_pool[1]), x), cbr(x, head.aspp_modules[0])]
    sep = head.aspp_modules[1]
    branches.append(cbr(cbr(x, sep.depthwise_conv, padding=2, dilation=2, groups=6), sep.pointwise_conv))
    aspp = cbr(torch.cat(branches, 1), head.bottleneck, padding=1)
    c1 = cbr(xs[0], head.c1_bottleneck)
    y = torch.cat([up(aspp, c1), c1], 1)
    for m in head.sep_bottleneck:
        y = cbr(cbr(y, m.depthwise_conv, padding=1, groups=y.shape[1]), m.pointwise_conv)
    got = head(xs)
    assert got.shape == (2, K, 12, 14)  # the low-level map's resolution
    torch.testing.assert_close(got, classify(head, y), rtol=1e-10, atol=1e-10)


def ref_attention(query_in, key_in, block, pool_scales, channels):
    q = cbr(query_in, block.query_project)
    k = cbr(key_in, block.key_project)
    v = F.conv2d(key_in, block.value_project.weight, block.value_project.bias)

    def pyramid(t):
        return torch.cat([F.adaptive_avg_pool2d(t, s).flatten(2) for s in pool_scales], dim=2)

    att = torch.einsum("bchw,bcn->bhwn", q, pyramid(k)) / math.sqrt(channels)
    ctx = torch.einsum("bhwn,bcn->bchw", att.softmax(dim=-1), pyramid(v))
    return F.conv2d(ctx, block.out_project.weight, block.out_project.bias)


def test_ann_head_matches_reference_with_query_from_the_high_level_map():
    head = randomize(ANNHead([6, 10], 12, num_classes=K, in_index=(0, 2), project_channels=4,
                             key_pool_scales=(1, 2, 3)))
    xs = feats([(6, 9, 11), (3, 2, 2), (10, 5, 6)])
    low, high = xs[0], xs[2]
    ctx = ref_attention(high, low, head.fusion.stages[0], (1, 2, 3), 4)
    fused = cbr(torch.cat([ctx, high], 1), head.fusion.bottleneck, act=False)
    y = cbr(fused, head.bottleneck, padding=1)
    ctx2 = ref_attention(y, y, head.context.stages[0], (1, 2, 3), 4)
    y = cbr(torch.cat([ctx2, y], 1), head.context.bottleneck)
    got = head(xs)
    assert got.shape == (2, K, 5, 6)  # queries (and the output) live on the high-level map
    torch.testing.assert_close(got, classify(head, y), rtol=1e-10, atol=1e-10)


def test_ann_context_block_shares_one_projection_under_two_names():
    head = ANNHead([6, 10], 12, num_classes=K, project_channels=4)
    stage = head.context.stages[0]
    assert stage.query_project is stage.key_project
    assert head.fusion.stages[0].query_project is not head.fusion.stages[0].key_project
    keys = head.state_dict()
    assert "context.stages.0.key_project.conv.weight" in keys
    assert "context.stages.0.query_project.conv.weight" in keys
    # mmseg zero-initialises the plain output projection: a fresh attention stage adds nothing
    x = torch.randn(2, 6, 5, 5)
    assert torch.count_nonzero(head.fusion.stages[0](torch.randn(2, 10, 5, 5), x)) == 0


def test_ann_rejects_pooled_queries():
    with pytest.raises(ValueError, match="query_scales"):
        ANNHead([6, 10], 12, num_classes=K, query_scales=(2,))


def test_apc_head_matches_reference():
    scales = (1, 2, 3)
    head = randomize(APCHead(6, 8, num_classes=K, in_index=0, pool_scales=scales))
    xs = feats([(6, 7, 9)])
    x = xs[0]
    outs = [x]
    for s, m in zip(scales, head.acm_modules):
        pooled = cbr(F.adaptive_avg_pool2d(x, s), m.pooled_redu_conv).flatten(2)  # (B, C, s*s), row-major
        xr = cbr(x, m.input_redu_conv)
        glob = cbr(xr.mean(dim=(2, 3), keepdim=True), m.global_info)
        aff = torch.sigmoid(F.conv2d(xr + glob, m.gla.weight, m.gla.bias))  # channel j = region j
        z = torch.einsum("bjhw,bcj->bchw", aff, pooled)
        outs.append(cbr((cbr(z, m.residual_conv) + xr).clamp_min(0), m.fusion_conv))
    y = cbr(torch.cat(outs, 1), head.bottleneck, padding=1)
    torch.testing.assert_close(head(xs), classify(head, y), rtol=1e-10, atol=1e-10)


def test_fcn_head_matches_reference_with_dilation_and_concat():
    head = randomize(FCNHead(6, 8, num_classes=K, in_index=-1, num_convs=2, concat_input=True, dilation=2))
    xs = feats([(3, 4, 4), (6, 7, 9)])
    x = xs[1]
    y = cbr(cbr(x, head.convs[0], padding=2, dilation=2), head.convs[1], padding=2, dilation=2)
    y = cbr(torch.cat([x, y], 1), head.conv_cat, padding=1)
    torch.testing.assert_close(head(xs), classify(head, y), rtol=1e-10, atol=1e-10)


def test_fcn_resize_concat_input_transform():
    head = randomize(FCNHead([3, 6], 9, num_classes=K, in_index=[0, 1], input_transform="resize_concat",
                             num_convs=0, concat_input=False))
    assert head.in_channels == 9
    xs = feats([(3, 8, 10), (6, 4, 5)])
    x = torch.cat([xs[0], up(xs[1], xs[0])], 1)
    torch.testing.assert_close(head(xs), classify(head, x), rtol=1e-10, atol=1e-10)


def test_psp_head_matches_reference():
    head = randomize(PSPHead(6, 8, num_classes=K, in_index=0))
    xs = feats([(6, 7, 9)])
    x = xs[0]
    y = cbr(torch.cat([x, *ref_ppm(x, head.psp_modules, (1, 2, 3, 6))], 1), head.bottleneck, padding=1)
    torch.testing.assert_close(head(xs), classify(head, y), rtol=1e-10, atol=1e-10)


def test_dropout_and_classifier_follow_mmseg():
    head = FCNHead(6, 512, num_classes=64)
    assert isinstance(head.dropout, nn.Dropout2d) and head.dropout.p == 0.1
    assert head.conv_seg.kernel_size == (1, 1)
    assert abs(head.conv_seg.weight.std().item() - 0.01) < 0.001  # mmseg's Normal(std=0.01) init
    assert FCNHead(6, 8, num_classes=K, dropout_ratio=0.0).dropout is None


def test_head_input_errors_name_the_problem():
    head = FCNHead(6, 8, num_classes=K, in_index=3)
    with pytest.raises(IndexError, match=r"feature map 3 .* returned 2 maps"):
        head([torch.randn(1, 6, 4, 4)] * 2)
    with pytest.raises(TypeError, match="list of feature maps"):
        head(torch.randn(1, 6, 4, 4))
    with pytest.raises(ValueError, match="input_transform"):
        FCNHead(6, 8, num_classes=K, input_transform="concat")
    with pytest.raises(ValueError, match="same length"):
        UPerHead([6, 6], 8, num_classes=K, in_index=(0, 1, 2))
    with pytest.raises(ValueError, match="in_channels"):
        FCNHead(6, 8, num_classes=K, num_convs=0)


# ----------------------------------------------------------------------------------------------------------
# neck


def test_multilevel_neck_shapes_feature_info_and_math():
    neck = randomize(MultiLevelNeck([4, 5, 6, 7], 8, scales=(4, 2, 1, 0.5), in_reductions=[16] * 4))
    xs = feats([(4, 6, 10), (5, 6, 10), (6, 6, 10), (7, 6, 10)])
    outs = neck(xs)
    assert [tuple(o.shape) for o in outs] == [(2, 8, 24, 40), (2, 8, 12, 20), (2, 8, 6, 10), (2, 8, 3, 5)]
    assert [f["reduction"] for f in neck.feature_info] == [4, 8, 16, 32]
    assert neck.out_channels == [8, 8, 8, 8]
    for i, s in enumerate((4, 2, 1, 0.5)):
        lat = F.conv2d(xs[i], neck.lateral_convs[str(i)].conv.weight, neck.lateral_convs[str(i)].conv.bias)
        if s != 1:
            lat = F.interpolate(lat, scale_factor=s, mode="bilinear", align_corners=False)
        ref = F.conv2d(lat, neck.convs[str(i)].conv.weight, neck.convs[str(i)].conv.bias, padding=1)
        torch.testing.assert_close(outs[i], ref, rtol=1e-10, atol=1e-10)
    assert set(neck.state_dict()) == {f"{n}.{i}.conv.{p}" for n in ("lateral_convs", "convs") for i in range(4)
                                      for p in ("weight", "bias")}


def test_multilevel_neck_builds_only_the_levels_heads_read():
    neck = MultiLevelNeck([4, 4, 4, 4], 8, out_indices=(-1, 0))
    assert neck.out_indices == [0, 3]
    assert {k.split(".")[1] for k in neck.state_dict()} == {"0", "3"}
    outs = neck([torch.randn(1, 4, 6, 10) for _ in range(4)])
    assert outs[1] is None and outs[2] is None
    assert tuple(outs[0].shape) == (1, 8, 24, 40) and tuple(outs[3].shape) == (1, 8, 3, 5)
    assert [f["reduction"] for f in neck.feature_info] == [4, 8, 16, 32]  # indices keep their meaning
    with pytest.raises(ValueError, match="feature map 2 but it was not computed"):
        FCNHead(8, 8, num_classes=K, in_index=2)(outs)


def test_multilevel_neck_broadcasts_one_input_and_checks_lengths():
    neck = MultiLevelNeck([4], 8, scales=(2, 1))
    outs = neck([torch.randn(1, 4, 5, 6)])
    assert [tuple(o.shape[2:]) for o in outs] == [(10, 12), (5, 6)]
    with pytest.raises(ValueError, match="one per scale"):
        MultiLevelNeck([4, 4, 4], 8, scales=(2, 1))
    with pytest.raises(ValueError, match="expects 1 maps"):
        neck([torch.randn(1, 4, 5, 6)] * 2)


def test_build_head_reads_widths_by_in_index_and_names_bad_input():
    from seglstm.models.heads import build_auxiliary_head, build_head, split_overrides

    widths = [24, 48, 96, 192]
    uper = build_head("upernet", widths, K, in_index=(1, 2, 3), channels=32, pool_scales=(1, 2))
    assert isinstance(uper, UPerHead) and uper.in_channels == [48, 96, 192]
    dlv3p = build_head("deeplabv3plus", widths, K, in_index=3, channels=16, dilations=(1, 2), c1_channels=8)
    assert dlv3p.in_channels == 192 and dlv3p.c1_bottleneck.conv.in_channels == 24  # low level from map 0
    fcn = build_head("fcn", widths, K, in_index=(0, 1), input_transform="resize_concat", channels_from_inputs=True,
                     kernel_size=1, num_convs=1, concat_input=False)  # fmt: skip
    assert fcn.channels == 24 + 48
    aux = build_auxiliary_head(widths, K, in_index=-2, channels=8, num_convs=1, concat_input=False)
    assert isinstance(aux, FCNHead) and aux.in_channels == 96
    with pytest.raises(ValueError, match="unknown decode head 'segformer'"):
        build_head("segformer", widths, K, in_index=0)
    with pytest.raises(ValueError, match=r"apcnet head in_index 4 is out of range for 4 feature maps"):
        build_head("apcnet", widths, K, in_index=4)
    with pytest.raises(ValueError, match=r"auxiliary in_index \[1, 7\] is out of range"):
        build_auxiliary_head(widths, K, in_index=[1, 7])
    head_kw, encoder_kw = split_overrides(ASPPHead, {"dilations": (1, 6), "dropout_ratio": 0.0, "depths": [1, 1]})
    assert head_kw == {"dilations": (1, 6), "dropout_ratio": 0.0} and encoder_kw == {"depths": [1, 1]}


@pytest.mark.parametrize("head_cls", [PSPHead, FCNHead, APCHead, ASPPHead, DepthwiseSeparableASPPHead])
def test_single_map_heads_reject_a_list_of_maps_by_name(head_cls):
    extra = {"c1_in_channels": 4, "c1_channels": 4} if head_cls is DepthwiseSeparableASPPHead else {}
    with pytest.raises(ValueError, match=rf"^{head_cls.__name__} reads one map: use input_transform None"):
        head_cls([8, 16], 8, num_classes=K, in_index=(2, 3), input_transform="multiple_select", **extra)
    head = head_cls([8, 16], 8, num_classes=K, in_index=(2, 3), input_transform="resize_concat", **extra)
    assert head.in_channels == 24  # concatenated first: one map
