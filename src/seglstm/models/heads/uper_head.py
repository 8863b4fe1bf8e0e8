"""UPerNet decode head: a pyramid pooling module on the last map and an FPN over the others."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from seglstm.models.heads.base import PPM, BaseDecodeHead, ConvModule, resize

__all__ = ["UPerHead"]


class UPerHead(BaseDecodeHead):
    """mmseg's ``UPerHead`` (Xiao et al. 2018), the seed's main decoder.

    The last selected map goes through PPM + ``bottleneck``; every other map gets a 1x1 lateral conv,
    top-down addition and a 3x3 ``fpn_convs`` entry; all levels are resized to the first one and fused
    by ``fpn_bottleneck``. With Seg-LSTM's four 1/16 maps every resize is a no-op.

    Args:
        in_channels: channels of the maps picked by ``in_index`` (read them from the encoder's
            ``out_channels``).
        pool_scales: output sizes of the PPM's adaptive pools.
        **kwargs: ``BaseDecodeHead`` options (``num_classes``, ``dropout_ratio``, ``align_corners``).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int = 512,
        *,
        num_classes: int,
        in_index: Sequence[int] = (0, 1, 2, 3),
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        **kwargs,
    ) -> None:
        super().__init__(
            in_channels, channels, num_classes=num_classes, in_index=in_index,
            input_transform="multiple_select", **kwargs,
        )
        ins: list[int] = self.in_channels  # type: ignore[assignment]
        self.pool_scales = tuple(pool_scales)
        self.psp_modules = PPM(pool_scales, ins[-1], channels, self.align_corners)
        self.bottleneck = ConvModule(ins[-1] + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in ins[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in ins[:-1])
        self.fpn_bottleneck = ConvModule(len(ins) * channels, channels, 3, padding=1)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))

    def forward_features(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        feats: list[torch.Tensor] = self._transform_inputs(inputs)  # type: ignore[assignment]
        laterals = [conv(feats[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(feats[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: add each coarser level to the finer one
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:], self.align_corners)
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)]
        outs.append(laterals[-1])
        size = outs[0].shape[2:]
        outs = [outs[0]] + [resize(o, size, self.align_corners) for o in outs[1:]]
        return self.fpn_bottleneck(torch.cat(outs, dim=1))
