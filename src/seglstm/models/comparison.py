"""The CNN, Transformer and Mamba segmenters that Seg-LSTM is measured against, under one pipeline.

Each preset reproduces an mmsegmentation config on a timm (or our VMamba-like) encoder, as an
``EncoderDecoder`` with mmseg's module names, so that all models train, validate and report through the same
code as the Vision-LSTM ones:

==================  ===============================================  =========================================
preset              encoder                                          heads (as mmseg's config)
==================  ===============================================  =========================================
deeplabv3plus_rXX   timm ``resnet18/50/101``, output stride 8         DepthwiseSeparableASPPHead + aux FCNHead
pspnet_rXX          timm ``resnet18/50/101``, output stride 8         PSPHead + aux FCNHead
fcn_hr18s/18/48     timm ``hrnet_w18_small_v2`` / ``w18`` / ``w48``   FCNHead on all branches, resize_concat
vit_s_upernet       timm ``vit_small_patch16_224``, blocks 2,5,8,11   MultiLevelNeck + UPerHead + aux FCNHead
swin_t_upernet      timm ``swin_tiny_patch4_window7_224``             UPerHead + aux FCNHead
mamba_upernet       ``vmamba_t`` (seglstm.models.mamba)               UPerHead + aux FCNHead
==================  ===============================================  =========================================

Known differences from mmseg: its ResNets are ``ResNetV1c`` (deep 3-conv stem), ours timm's plain ResNets;
its Swin adds a LayerNorm to each stage output, timm's ``features_only`` Swin does not. HRNet-W18-Small is
timm's ``hrnet_w18_small_v2``, whose widths (18/36/72/144) and block counts are mmseg's ``fcn_hr18s``
(timm's ``hrnet_w18_small`` is the narrower 16/32/64/128 v1 network).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from seglstm.models import mamba  # noqa: F401  (registers the vmamba_* encoders used below)
from seglstm.models.heads import HEAD_TYPES, build_auxiliary_head, build_head, split_overrides
from seglstm.models.necks import MultiLevelNeck
from seglstm.models.registry import create_encoder, register_model
from seglstm.models.segmentor import EncoderDecoder, split_segmentor_options
from seglstm.models.timm_encoders import TimmEncoder

__all__ = ["COMPARISON_MODELS"]

def _create_comparison(
    encoder: Callable[..., nn.Module],
    encoder_cfg: Mapping[str, Any],
    head: str,
    head_cfg: Mapping[str, Any],
    *,
    num_classes: int,
    neck_cfg: Mapping[str, Any] | None = None,
    aux_cfg: Mapping[str, Any] | None = None,
    auxiliary: bool = True,
    pretrained: bool | str = False,
    **overrides: Any,
) -> EncoderDecoder:
    """Assemble one comparison segmentor from a preset's settings and the user's overrides.

    Args:
        encoder / encoder_cfg: encoder factory and the preset's arguments for it.
        head / head_cfg: a key of ``HEAD_TYPES`` and the preset's mmseg head settings.
        num_classes: classes of both heads.
        neck_cfg: ``MultiLevelNeck`` settings (``out_channels``, ``scales``), or None for no neck.
        aux_cfg: the auxiliary ``FCNHead`` settings; None means the preset has none (mmseg's fcn_hr*).
        auxiliary: set False to drop a preset's auxiliary head.
        pretrained: load timm's ImageNet weights into the encoder (downloads from the Hugging Face hub):
            ``True`` for timm's default ones, a timm pretrained name of the encoder's network
            (``"resnet50.a1_in1k"``, listed by ``seglstm weights``) or a local file.
        **overrides: ``EncoderDecoder``'s options (``aux_loss_weight``, ``class_weight``, ``ignore_index``,
            ``test_cfg`` ...) go to the segmentor, arguments of the decode head's constructor (``channels``,
            ``dropout_ratio`` ...) to the decode head, all others to the encoder (``drop_path_rate``,
            ``img_size``, ``depths`` ...).
    """
    segmentor_kw, overrides = split_segmentor_options(overrides)
    head_over, encoder_over = split_overrides(HEAD_TYPES[head], overrides)
    head_kw = {**head_cfg, **head_over}
    if "channels" in head_over:  # a width the user gives wins over mmseg's fcn_hr* rule
        head_kw.pop("channels_from_inputs", None)
    encoder_kw = {**encoder_cfg, **encoder_over}
    backbone = encoder(pretrained=pretrained, **encoder_kw)

    widths = [int(c) for c in backbone.out_channels]
    neck = None
    if neck_cfg is not None:
        neck_kw = dict(neck_cfg)
        neck = MultiLevelNeck(
            widths,
            neck_kw.pop("out_channels", widths[-1]),
            in_reductions=[int(f["reduction"]) for f in backbone.feature_info],
            **neck_kw,
        )
        widths = list(neck.out_channels)
    decode_head = build_head(head, widths, num_classes, **head_kw)

    aux_head = None
    if auxiliary and aux_cfg is not None:
        aux_head = build_auxiliary_head(widths, num_classes, **aux_cfg)
    return EncoderDecoder(backbone, decode_head, neck=neck, auxiliary_head=aux_head, **segmentor_kw)


def _timm_encoder(pretrained: bool | str = False, **kwargs: Any) -> TimmEncoder:
    return TimmEncoder(pretrained=pretrained, **kwargs)


def _aux(in_index: int, channels: int = 256) -> dict[str, Any]:
    """mmseg's auxiliary FCNHead: one 3x3 conv, no input concat, dropout 0.1 (loss weight 0.4 in the segmentor)."""
    return {
        "in_index": in_index,
        "channels": channels,
        "num_convs": 1,
        "concat_input": False,
        "dropout_ratio": 0.1,
    }


# ----------------------------------------------------------------------------------------------------------
# dilated ResNets (mmseg's *_r{18,50,101}-d8 configs)


def _resnet_d8(depth: int) -> dict[str, Any]:
    return {"model_name": f"resnet{depth}", "out_indices": (1, 2, 3, 4), "output_stride": 8}


def _create_deeplabv3plus_resnet(depth: int, **kwargs: Any) -> EncoderDecoder:
    narrow = depth == 18  # mmseg's r18 configs shrink the heads
    head = {
        "in_index": 3,
        "channels": 128 if narrow else 512,
        "dilations": (1, 12, 24, 36),
        "c1_channels": 12 if narrow else 48,
        "dropout_ratio": 0.1,
    }
    aux = _aux(2, 64 if narrow else 256)
    return _create_comparison(_timm_encoder, _resnet_d8(depth), "deeplabv3plus", head, aux_cfg=aux, **kwargs)


def _create_pspnet_resnet(depth: int, **kwargs: Any) -> EncoderDecoder:
    narrow = depth == 18
    head = {
        "in_index": 3,
        "channels": 128 if narrow else 512,
        "pool_scales": (1, 2, 3, 6),
        "dropout_ratio": 0.1,
    }
    aux = _aux(2, 64 if narrow else 256)
    return _create_comparison(_timm_encoder, _resnet_d8(depth), "psp", head, aux_cfg=aux, **kwargs)


@register_model
def deeplabv3plus_r18(**kwargs: Any) -> EncoderDecoder:
    """DeepLabV3+ on a dilated ResNet-18 (output stride 8), mmseg's deeplabv3plus_r18-d8."""
    return _create_deeplabv3plus_resnet(18, **kwargs)


@register_model
def deeplabv3plus_r50(**kwargs: Any) -> EncoderDecoder:
    """DeepLabV3+ on a dilated ResNet-50 (output stride 8), mmseg's deeplabv3plus_r50-d8."""
    return _create_deeplabv3plus_resnet(50, **kwargs)


@register_model
def deeplabv3plus_r101(**kwargs: Any) -> EncoderDecoder:
    """DeepLabV3+ on a dilated ResNet-101 (output stride 8), mmseg's deeplabv3plus_r101-d8."""
    return _create_deeplabv3plus_resnet(101, **kwargs)


@register_model
def pspnet_r18(**kwargs: Any) -> EncoderDecoder:
    """PSPNet on a dilated ResNet-18 (output stride 8), mmseg's pspnet_r18-d8."""
    return _create_pspnet_resnet(18, **kwargs)


@register_model
def pspnet_r50(**kwargs: Any) -> EncoderDecoder:
    """PSPNet on a dilated ResNet-50 (output stride 8), mmseg's pspnet_r50-d8."""
    return _create_pspnet_resnet(50, **kwargs)


@register_model
def pspnet_r101(**kwargs: Any) -> EncoderDecoder:
    """PSPNet on a dilated ResNet-101 (output stride 8), mmseg's pspnet_r101-d8."""
    return _create_pspnet_resnet(101, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# HRNet + FCN (mmseg's fcn_hr18s / fcn_hr18 / fcn_hr48: no auxiliary head)


def _create_fcn_hrnet(model_name: str, **kwargs: Any) -> EncoderDecoder:
    encoder = {"model_name": model_name, "out_indices": (1, 2, 3, 4), "feature_location": ""}
    head = {
        "in_index": (0, 1, 2, 3),
        "input_transform": "resize_concat",
        "channels_from_inputs": True,
        "kernel_size": 1,
        "num_convs": 1,
        "concat_input": False,
        "dropout_ratio": 0.0,
    }
    return _create_comparison(_timm_encoder, encoder, "fcn", head, aux_cfg=None, **kwargs)


@register_model
def fcn_hr18s(**kwargs: Any) -> EncoderDecoder:
    """FCN on HRNetV2-W18-Small (timm ``hrnet_w18_small_v2``), mmseg's fcn_hr18s."""
    return _create_fcn_hrnet("hrnet_w18_small_v2", **kwargs)


@register_model
def fcn_hr18(**kwargs: Any) -> EncoderDecoder:
    """FCN on HRNetV2-W18, mmseg's fcn_hr18."""
    return _create_fcn_hrnet("hrnet_w18", **kwargs)


@register_model
def fcn_hr48(**kwargs: Any) -> EncoderDecoder:
    """FCN on HRNetV2-W48, mmseg's fcn_hr48."""
    return _create_fcn_hrnet("hrnet_w48", **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Transformers and Mamba + UPerNet

_UPER_HEAD: dict[str, Any] = {
    "in_index": (0, 1, 2, 3),
    "channels": 512,
    "pool_scales": (1, 2, 3, 6),
    "dropout_ratio": 0.1,
}


@register_model
def vit_s_upernet(**kwargs: Any) -> EncoderDecoder:
    """UPerNet on ViT-S/16 (DeiT-S width) with the multi-level neck, mmseg's upernet_deit-s16_mln.

    Blocks 2, 5, 8, 11 (0-based, mmseg's ``out_indices``) are taken without the final norm, turned into a
    1/4 .. 1/32 pyramid by ``MultiLevelNeck`` (scales 4, 2, 1, 0.5); the auxiliary head reads the last map.
    """
    encoder = {
        "model_name": "vit_small_patch16_224",
        "mode": "intermediates",
        "out_indices": (2, 5, 8, 11),
        "img_size": 512,
        "dynamic_img_size": True,
        "drop_path_rate": 0.1,
    }
    neck = {"out_channels": 384, "scales": (4, 2, 1, 0.5)}
    return _create_comparison(
        _timm_encoder, encoder, "upernet", _UPER_HEAD, neck_cfg=neck, aux_cfg=_aux(3), **kwargs
    )


@register_model
def swin_t_upernet(**kwargs: Any) -> EncoderDecoder:
    """UPerNet on Swin-T (window 7), mmseg's upernet_swin-t; any input size (timm ``strict_img_size=False``)."""
    encoder = {
        "model_name": "swin_tiny_patch4_window7_224",
        "strict_img_size": False,
        "pad_multiple": 4,  # the patch size; windows and patch merging pad themselves
        "drop_path_rate": 0.3,
    }
    return _create_comparison(_timm_encoder, encoder, "upernet", _UPER_HEAD, aux_cfg=_aux(2), **kwargs)


def _vmamba_encoder(pretrained: bool = False, variant: str = "vmamba_t", **kwargs: Any) -> nn.Module:
    return create_encoder(variant, pretrained=pretrained, **kwargs)


@register_model
def mamba_upernet(**kwargs: Any) -> EncoderDecoder:
    """UPerNet on the VMamba-like encoder (``variant="vmamba_t"`` or ``"vmamba_s"``), as VMamba's ADE20K setup."""
    return _create_comparison(_vmamba_encoder, {}, "upernet", _UPER_HEAD, aux_cfg=_aux(2), **kwargs)


COMPARISON_MODELS: tuple[str, ...] = (
    "deeplabv3plus_r18",
    "deeplabv3plus_r50",
    "deeplabv3plus_r101",
    "pspnet_r18",
    "pspnet_r50",
    "pspnet_r101",
    "fcn_hr18s",
    "fcn_hr18",
    "fcn_hr48",
    "vit_s_upernet",
    "swin_t_upernet",
    "mamba_upernet",
)
