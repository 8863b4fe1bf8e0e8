"""FCN decode head: the seed's auxiliary head, and a plain decoder on its own."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from seglstm.models.heads.base import BaseDecodeHead, ConvModule

__all__ = ["FCNHead"]


class FCNHead(BaseDecodeHead):
    """mmseg's ``FCNHead`` (Long et al. 2015): ``num_convs`` ConvModules, optionally ``conv_cat`` over
    [input, convs output].

    Defaults are the seed's auxiliary head (in_index 2, 256 channels, one 3x3 conv, no concat).

    Args:
        num_convs: number of ConvModules in ``convs`` (0 needs ``in_channels == channels``).
        kernel_size: kernel of every conv.
        concat_input: concatenate the input with the conv output and fuse it with ``conv_cat``.
        dilation: dilation of the ``convs`` (padding keeps the size).
        **kwargs: ``BaseDecodeHead`` options.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int = 256,
        *,
        num_classes: int,
        in_index: int = 2,
        num_convs: int = 1,
        kernel_size: int = 3,
        concat_input: bool = False,
        dilation: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(in_channels, channels, num_classes=num_classes, in_index=in_index, **kwargs)
        self._require_one_map()
        if not isinstance(num_convs, int) or num_convs < 0:
            raise ValueError(f"num_convs must be a non-negative int, got {num_convs!r}")
        if not isinstance(dilation, int) or dilation < 1:
            raise ValueError(f"dilation must be a positive int, got {dilation!r}")
        if num_convs == 0 and self.in_channels != channels:
            raise ValueError(
                f"num_convs=0 passes the input through, so in_channels ({self.in_channels}) must equal "
                f"channels ({channels})"
            )
        self.num_convs, self.kernel_size = num_convs, kernel_size
        self.concat_input, self.dilation = concat_input, dilation
        pad = (kernel_size // 2) * dilation
        convs = [
            ConvModule(self.in_channels if i == 0 else channels, channels, kernel_size, padding=pad, dilation=dilation)
            for i in range(num_convs)
        ]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        if concat_input:
            self.conv_cat = ConvModule(self.in_channels + channels, channels, kernel_size, padding=kernel_size // 2)

    def forward_features(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        x: torch.Tensor = self._transform_inputs(inputs)  # type: ignore[assignment]
        feats = self.convs(x)
        if self.concat_input:
            feats = self.conv_cat(torch.cat([x, feats], dim=1))
        return feats
