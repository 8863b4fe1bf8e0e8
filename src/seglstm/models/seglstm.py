"""Seg-LSTM model presets: a ViL encoder + one of the seed's five decode heads + the FCN auxiliary head.

``seglstm_{upernet|ann|apcnet|deeplabv3|deeplabv3plus}_{t|s|b}`` use the (6,6,6,6) layout, the ``_44124``
variants (4,4,12,4); ``seglstm_upernet_s`` is the seed's main model. ``seglstm_fcn_{t|s|b}`` is a plain FCN
decoder on the same encoder. Every preset calls ``_create_seglstm``; head and auxiliary widths are the
seed's (512 / 256) and input widths are read from the encoder (or neck) ``out_channels``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from seglstm.models.heads import HEAD_TYPES, BaseDecodeHead, build_auxiliary_head, build_head, split_overrides
from seglstm.models.necks import MultiLevelNeck
from seglstm.models.registry import create_encoder, register_model
from seglstm.models.segmentor import EncoderDecoder, split_segmentor_options

__all__ = ["HEADS", "NECKS"]

NECKS = ("none", "multilevel")
_NECK_SCALES = (4, 2, 1, 0.5)  # four 1/16 maps -> 1/4, 1/8, 1/16, 1/32

# The seed's decode-head settings (docs/design.md, section 5) beyond channels/dropout/align_corners.
_HEAD_DEFAULTS: dict[str, dict[str, Any]] = {
    "upernet": dict(in_index=(0, 1, 2, 3), pool_scales=(1, 2, 3, 6)),
    "ann": dict(in_index=(2, 3), project_channels=256, query_scales=(1,), key_pool_scales=(1, 3, 6, 8)),
    "apcnet": dict(in_index=3, pool_scales=(1, 2, 3, 6)),
    "deeplabv3": dict(in_index=3, dilations=(1, 12, 24, 36)),
    "deeplabv3plus": dict(in_index=3, dilations=(1, 12, 24, 36), c1_channels=48),
    "fcn": dict(in_index=3, num_convs=2, concat_input=True),
}
_AUX_DEFAULTS: dict[str, Any] = dict(in_index=2, channels=256, num_convs=1, concat_input=False, dropout_ratio=0.1)
# The heads a Seg-LSTM preset may use: the seed's five and a plain FCN.
HEADS: dict[str, type[BaseDecodeHead]] = {kind: HEAD_TYPES[kind] for kind in _HEAD_DEFAULTS}


def _create_seglstm(
    head: str,
    encoder: str,
    *,
    num_classes: int,
    neck: str = "none",
    neck_channels: int | None = None,
    auxiliary: bool = True,
    aux_cfg: Mapping[str, Any] | None = None,
    pretrained: str | os.PathLike | bool | None = None,
    **overrides: Any,
) -> EncoderDecoder:
    """Assemble encoder, optional neck, decode head and auxiliary FCN head.

    Args:
        head / encoder: a key of ``HEADS`` and a registered encoder name.
        num_classes: classes of both heads.
        neck: ``"none"`` (the seed: the four 1/16 maps go straight to the head) or ``"multilevel"``
            (``MultiLevelNeck`` to 1/4 .. 1/32, ``neck_channels`` wide, the encoder width by default).
        auxiliary: add the seed's auxiliary FCNHead (in_index 2, 256 channels); ``aux_cfg`` overrides it.
        pretrained: checkpoint loaded with ``seglstm.models.checkpoint.load_pretrained`` (a Seg-LSTM/mmseg
            segmentor checkpoint, or a Vision-LSTM classification checkpoint for the encoder only), a
            published weights name (``vil_s_in1k``, ``seglstm weights``) or ``True`` for the first that fits.
        **overrides: ``EncoderDecoder``'s options (``aux_loss_weight``, ``class_weight``, ``dice_weight``,
            ``lovasz_weight``, ``avg_non_ignore``, ``ignore_index``, ``test_cfg`` ...) go to the segmentor,
            keyword arguments of the decode head's constructor (``channels``, ``dropout_ratio``,
            ``pool_scales`` ...) to the head, all others to the encoder (``img_size``, ``depths``,
            ``mlstm_backend``, ``drop_path_rate`` ...).
    """
    if neck not in NECKS:
        raise ValueError(f"neck must be one of {NECKS}, got {neck!r}")
    if head not in HEADS:
        raise ValueError(f"unknown decode head {head!r}; known: {', '.join(HEADS)}")
    segmentor_kw, overrides = split_segmentor_options(overrides)
    head_kw, encoder_kw = split_overrides(HEADS[head], overrides)
    backbone = create_encoder(encoder, **encoder_kw)
    widths = list(backbone.out_channels)
    if neck == "multilevel":
        widths = [neck_channels or widths[-1]] * len(_NECK_SCALES)
    elif neck_channels is not None:
        raise ValueError("neck_channels only applies to neck='multilevel'")
    decode_head = build_head(head, widths, num_classes, **{**_HEAD_DEFAULTS[head], "channels": 512, **head_kw})
    aux_head = None
    if auxiliary:
        aux_head = build_auxiliary_head(widths, num_classes, **{**_AUX_DEFAULTS, **(aux_cfg or {})})
    elif aux_cfg:
        raise ValueError("aux_cfg given with auxiliary=False")
    neck_module = None
    if neck == "multilevel":
        # build only the pyramid levels some head reads (see MultiLevelNeck's out_indices)
        used = decode_head.input_indices() + (aux_head.input_indices() if aux_head is not None else [])
        neck_module = MultiLevelNeck(
            list(backbone.out_channels), widths[0], scales=_NECK_SCALES,
            in_reductions=[int(f["reduction"]) for f in backbone.feature_info], out_indices=used,
        )
    segmentor_kw.setdefault("size_divisor", max(int(f["reduction"]) for f in backbone.feature_info))
    model = EncoderDecoder(backbone, decode_head, neck=neck_module, auxiliary_head=aux_head, **segmentor_kw)
    if pretrained:
        from seglstm.models.checkpoint import load_pretrained

        load_pretrained(model, pretrained, strict=True)
    return model


# ----------------------------------------------------------------------------------------------------------
# presets: (6,6,6,6) layout


@register_model
def seglstm_upernet_t(**kwargs: Any) -> EncoderDecoder:
    """UPerNet on ViL-T width, (6,6,6,6)."""
    return _create_seglstm("upernet", "vil_t", **kwargs)


@register_model
def seglstm_upernet_s(**kwargs: Any) -> EncoderDecoder:
    """UPerNet on ViL-S, (6,6,6,6): the seed's main Seg-LSTM model."""
    return _create_seglstm("upernet", "vil_s", **kwargs)


@register_model
def seglstm_upernet_b(**kwargs: Any) -> EncoderDecoder:
    """UPerNet on ViL-B width, (6,6,6,6)."""
    return _create_seglstm("upernet", "vil_b", **kwargs)


@register_model
def seglstm_ann_t(**kwargs: Any) -> EncoderDecoder:
    """ANN on ViL-T width, (6,6,6,6)."""
    return _create_seglstm("ann", "vil_t", **kwargs)


@register_model
def seglstm_ann_s(**kwargs: Any) -> EncoderDecoder:
    """ANN on ViL-S, (6,6,6,6)."""
    return _create_seglstm("ann", "vil_s", **kwargs)


@register_model
def seglstm_ann_b(**kwargs: Any) -> EncoderDecoder:
    """ANN on ViL-B width, (6,6,6,6)."""
    return _create_seglstm("ann", "vil_b", **kwargs)


@register_model
def seglstm_apcnet_t(**kwargs: Any) -> EncoderDecoder:
    """APCNet on ViL-T width, (6,6,6,6)."""
    return _create_seglstm("apcnet", "vil_t", **kwargs)


@register_model
def seglstm_apcnet_s(**kwargs: Any) -> EncoderDecoder:
    """APCNet on ViL-S, (6,6,6,6)."""
    return _create_seglstm("apcnet", "vil_s", **kwargs)


@register_model
def seglstm_apcnet_b(**kwargs: Any) -> EncoderDecoder:
    """APCNet on ViL-B width, (6,6,6,6)."""
    return _create_seglstm("apcnet", "vil_b", **kwargs)


@register_model
def seglstm_deeplabv3_t(**kwargs: Any) -> EncoderDecoder:
    """DeepLabV3 (ASPP) on ViL-T width, (6,6,6,6)."""
    return _create_seglstm("deeplabv3", "vil_t", **kwargs)


@register_model
def seglstm_deeplabv3_s(**kwargs: Any) -> EncoderDecoder:
    """DeepLabV3 (ASPP) on ViL-S, (6,6,6,6)."""
    return _create_seglstm("deeplabv3", "vil_s", **kwargs)


@register_model
def seglstm_deeplabv3_b(**kwargs: Any) -> EncoderDecoder:
    """DeepLabV3 (ASPP) on ViL-B width, (6,6,6,6)."""
    return _create_seglstm("deeplabv3", "vil_b", **kwargs)


@register_model
def seglstm_deeplabv3plus_t(**kwargs: Any) -> EncoderDecoder:
    """DeepLabV3+ on ViL-T width, (6,6,6,6)."""
    return _create_seglstm("deeplabv3plus", "vil_t", **kwargs)


@register_model
def seglstm_deeplabv3plus_s(**kwargs: Any) -> EncoderDecoder:
    """DeepLabV3+ on ViL-S, (6,6,6,6)."""
    return _create_seglstm("deeplabv3plus", "vil_s", **kwargs)


@register_model
def seglstm_deeplabv3plus_b(**kwargs: Any) -> EncoderDecoder:
    """DeepLabV3+ on ViL-B width, (6,6,6,6)."""
    return _create_seglstm("deeplabv3plus", "vil_b", **kwargs)


# ----------------------------------------------------------------------------------------------------------
# presets: (4,4,12,4) layout


@register_model
def seglstm_upernet_t_44124(**kwargs: Any) -> EncoderDecoder:
    """UPerNet on ViL-T width, (4,4,12,4)."""
    return _create_seglstm("upernet", "vil_t_44124", **kwargs)


@register_model
def seglstm_upernet_s_44124(**kwargs: Any) -> EncoderDecoder:
    """UPerNet on ViL-S, (4,4,12,4): the seed's second layout."""
    return _create_seglstm("upernet", "vil_s_44124", **kwargs)


@register_model
def seglstm_upernet_b_44124(**kwargs: Any) -> EncoderDecoder:
    """UPerNet on ViL-B width, (4,4,12,4)."""
    return _create_seglstm("upernet", "vil_b_44124", **kwargs)


@register_model
def seglstm_ann_t_44124(**kwargs: Any) -> EncoderDecoder:
    """ANN on ViL-T width, (4,4,12,4)."""
    return _create_seglstm("ann", "vil_t_44124", **kwargs)


@register_model
def seglstm_ann_s_44124(**kwargs: Any) -> EncoderDecoder:
    """ANN on ViL-S, (4,4,12,4)."""
    return _create_seglstm("ann", "vil_s_44124", **kwargs)


@register_model
def seglstm_ann_b_44124(**kwargs: Any) -> EncoderDecoder:
    """ANN on ViL-B width, (4,4,12,4)."""
    return _create_seglstm("ann", "vil_b_44124", **kwargs)


@register_model
def seglstm_apcnet_t_44124(**kwargs: Any) -> EncoderDecoder:
    """APCNet on ViL-T width, (4,4,12,4)."""
    return _create_seglstm("apcnet", "vil_t_44124", **kwargs)


@register_model
def seglstm_apcnet_s_44124(**kwargs: Any) -> EncoderDecoder:
    """APCNet on ViL-S, (4,4,12,4)."""
    return _create_seglstm("apcnet", "vil_s_44124", **kwargs)


@register_model
def seglstm_apcnet_b_44124(**kwargs: Any) -> EncoderDecoder:
    """APCNet on ViL-B width, (4,4,12,4)."""
    return _create_seglstm("apcnet", "vil_b_44124", **kwargs)


@register_model
def seglstm_deeplabv3_t_44124(**kwargs: Any) -> EncoderDecoder:
    """DeepLabV3 (ASPP) on ViL-T width, (4,4,12,4)."""
    return _create_seglstm("deeplabv3", "vil_t_44124", **kwargs)


@register_model
def seglstm_deeplabv3_s_44124(**kwargs: Any) -> EncoderDecoder:
    """DeepLabV3 (ASPP) on ViL-S, (4,4,12,4)."""
    return _create_seglstm("deeplabv3", "vil_s_44124", **kwargs)


@register_model
def seglstm_deeplabv3_b_44124(**kwargs: Any) -> EncoderDecoder:
    """DeepLabV3 (ASPP) on ViL-B width, (4,4,12,4)."""
    return _create_seglstm("deeplabv3", "vil_b_44124", **kwargs)


@register_model
def seglstm_deeplabv3plus_t_44124(**kwargs: Any) -> EncoderDecoder:
    """DeepLabV3+ on ViL-T width, (4,4,12,4)."""
    return _create_seglstm("deeplabv3plus", "vil_t_44124", **kwargs)


@register_model
def seglstm_deeplabv3plus_s_44124(**kwargs: Any) -> EncoderDecoder:
    """DeepLabV3+ on ViL-S, (4,4,12,4)."""
    return _create_seglstm("deeplabv3plus", "vil_s_44124", **kwargs)


@register_model
def seglstm_deeplabv3plus_b_44124(**kwargs: Any) -> EncoderDecoder:
    """DeepLabV3+ on ViL-B width, (4,4,12,4)."""
    return _create_seglstm("deeplabv3plus", "vil_b_44124", **kwargs)


# ----------------------------------------------------------------------------------------------------------
# plain FCN decoder (not in the seed)


@register_model
def seglstm_fcn_t(**kwargs: Any) -> EncoderDecoder:
    """FCN decoder (2 convs + input concat, on the last stage) on ViL-T width, (6,6,6,6)."""
    return _create_seglstm("fcn", "vil_t", **kwargs)


@register_model
def seglstm_fcn_s(**kwargs: Any) -> EncoderDecoder:
    """FCN decoder on ViL-S, (6,6,6,6)."""
    return _create_seglstm("fcn", "vil_s", **kwargs)


@register_model
def seglstm_fcn_b(**kwargs: Any) -> EncoderDecoder:
    """FCN decoder on ViL-B width, (6,6,6,6)."""
    return _create_seglstm("fcn", "vil_b", **kwargs)
