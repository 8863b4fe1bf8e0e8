"""DeepLabV3 (ASPP) and DeepLabV3+ (depthwise-separable ASPP + low-level branch) decode heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from seglstm.models.heads.base import BaseDecodeHead, ConvModule, DepthwiseSeparableConvModule, resize

__all__ = ["ASPPHead", "DepthwiseSeparableASPPHead"]


def _aspp_branch(in_channels: int, channels: int, dilation: int, separable: bool) -> nn.Module:
    if dilation == 1:
        return ConvModule(in_channels, channels, 1)
    if separable:
        return DepthwiseSeparableConvModule(in_channels, channels, 3, padding=dilation, dilation=dilation)
    return ConvModule(in_channels, channels, 3, padding=dilation, dilation=dilation)


class ASPPHead(BaseDecodeHead):
    """mmseg's ``ASPPHead`` (DeepLabV3, Chen et al. 2017).

    Branches, concatenated in this order: ``image_pool`` (global average pool -> 1x1 ConvModule ->
    bilinear resize back), then one ``aspp_modules`` entry per dilation (1x1 conv for dilation 1, dilated
    3x3 otherwise); a 3x3 ``bottleneck`` fuses them.

    Args:
        dilations: dilation of each ASPP branch; the seed uses (1, 12, 24, 36).
        **kwargs: ``BaseDecodeHead`` options.
    """

    _separable = False

    def __init__(
        self,
        in_channels: int,
        channels: int = 512,
        *,
        num_classes: int,
        in_index: int = 3,
        dilations: Sequence[int] = (1, 12, 24, 36),
        **kwargs,
    ) -> None:
        super().__init__(in_channels, channels, num_classes=num_classes, in_index=in_index, **kwargs)
        self._require_one_map()
        if not dilations or any(int(d) < 1 for d in dilations):
            raise ValueError(f"dilations must be positive ints, got {dilations!r}")
        self.dilations = tuple(int(d) for d in dilations)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(self.in_channels, channels, 1))
        self.aspp_modules = nn.ModuleList(
            _aspp_branch(self.in_channels, channels, d, self._separable) for d in self.dilations
        )
        self.bottleneck = ConvModule((len(self.dilations) + 1) * channels, channels, 3, padding=1)

    def aspp_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The fused ASPP features of one map (image pool first, then the dilated branches)."""
        outs = [resize(self.image_pool(x), x.shape[2:], self.align_corners)]
        outs.extend(branch(x) for branch in self.aspp_modules)
        return self.bottleneck(torch.cat(outs, dim=1))

    def forward_features(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        x: torch.Tensor = self._transform_inputs(inputs)  # type: ignore[assignment]
        return self.aspp_forward(x)


class DepthwiseSeparableASPPHead(ASPPHead):
    """mmseg's ``DepthwiseSeparableASPPHead`` (DeepLabV3+, Chen et al. 2018).

    The dilated ASPP branches are depthwise-separable. The fused ASPP output is resized to the low-level
    map ``inputs[0]`` (the encoder's first output, whatever ``in_index`` is), concatenated with its
    ``c1_bottleneck`` projection (``c1_channels``) and refined by two separable 3x3 ``sep_bottleneck``
    modules.

    Args:
        c1_in_channels: channels of ``inputs[0]``; 0 drops the low-level branch.
        c1_channels: width of the low-level projection (48 in the seed).
        **kwargs: ``ASPPHead`` options.
    """

    _separable = True

    def __init__(
        self,
        in_channels: int,
        channels: int = 512,
        *,
        num_classes: int,
        c1_in_channels: int,
        c1_channels: int = 48,
        **kwargs,
    ) -> None:
        super().__init__(in_channels, channels, num_classes=num_classes, **kwargs)
        if c1_in_channels < 0 or c1_channels < 0 or (c1_in_channels > 0 and c1_channels == 0):
            raise ValueError(
                f"c1_in_channels ({c1_in_channels}) and c1_channels ({c1_channels}) must be >= 0, and "
                "c1_channels > 0 when the low-level branch is on"
            )
        self.c1_in_channels = c1_in_channels
        self.c1_bottleneck = ConvModule(c1_in_channels, c1_channels, 1) if c1_in_channels > 0 else None
        sep_in = channels + (c1_channels if c1_in_channels > 0 else 0)
        self.sep_bottleneck = nn.Sequential(
            DepthwiseSeparableConvModule(sep_in, channels, 3, padding=1),
            DepthwiseSeparableConvModule(channels, channels, 3, padding=1),
        )

    def input_indices(self) -> list[int]:
        """The ASPP input plus ``inputs[0]`` for the low-level branch."""
        return super().input_indices() + ([0] if self.c1_bottleneck is not None else [])

    def forward_features(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        out = super().forward_features(inputs)
        if self.c1_bottleneck is not None:
            c1 = self.c1_bottleneck(self._select(inputs, 0))
            out = torch.cat([resize(out, c1.shape[2:], self.align_corners), c1], dim=1)
        return self.sep_bottleneck(out)
