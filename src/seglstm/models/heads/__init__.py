"""Decode heads with mmseg's semantics and parameter names (see ``base`` for the shared pieces)."""

from seglstm.models.heads.ann_head import AFNB, APNB, ANNHead
from seglstm.models.heads.apc_head import ACM, APCHead
from seglstm.models.heads.aspp_head import ASPPHead, DepthwiseSeparableASPPHead
from seglstm.models.heads.base import PPM, BaseDecodeHead, ConvModule, DepthwiseSeparableConvModule, resize
from seglstm.models.heads.build import HEAD_TYPES, build_auxiliary_head, build_head, split_overrides
from seglstm.models.heads.fcn_head import FCNHead
from seglstm.models.heads.psp_head import PSPHead
from seglstm.models.heads.uper_head import UPerHead

__all__ = [
    "ACM",
    "AFNB",
    "APNB",
    "HEAD_TYPES",
    "PPM",
    "ANNHead",
    "APCHead",
    "ASPPHead",
    "BaseDecodeHead",
    "ConvModule",
    "DepthwiseSeparableASPPHead",
    "DepthwiseSeparableConvModule",
    "FCNHead",
    "PSPHead",
    "UPerHead",
    "build_auxiliary_head",
    "build_head",
    "resize",
    "split_overrides",
]
