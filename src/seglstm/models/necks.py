"""Necks between the encoder and the decode head.

The seed feeds ViL's four 1/16 maps straight into heads designed for feature pyramids; ``MultiLevelNeck``
(mmseg's ViT neck) turns them into a 1/4 .. 1/32 pyramid instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from seglstm.models.heads.base import ConvModule

__all__ = ["MultiLevelNeck"]


class MultiLevelNeck(nn.Module):
    """mmseg's ``MultiLevelNeck``: per input a 1x1 lateral conv, a bilinear resize by ``scales[i]`` and a
    3x3 conv.

    As in mmseg's default (``norm_cfg=None, act_cfg=None``) the convs are plain with bias and Xavier-uniform
    weights; ``norm``/``act`` add BatchNorm/ReLU.

    Args:
        in_channels: width of each input map (one entry is broadcast to every scale).
        out_channels: width of every output map.
        scales: resize factor per output; (4, 2, 1, 0.5) turns four 1/16 maps into 1/4, 1/8, 1/16, 1/32.
        in_reductions: stride of each input relative to the image, used to fill ``feature_info``
            (16 each for ViL with patch 16).
        norm: add BatchNorm to every conv.
        act: add ReLU to every conv.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        scales: Sequence[float] = (4, 2, 1, 0.5),
        in_reductions: Sequence[int] | None = None,
        norm: bool = False,
        act: bool = False,
    ) -> None:
        super().__init__()
        in_channels = list(in_channels)
        if not in_channels or len(in_channels) not in (1, len(scales)):
            raise ValueError(
                f"in_channels must have one entry or one per scale ({len(scales)}), got {in_channels!r}"
            )
        if any(float(s) <= 0 for s in scales):
            raise ValueError(f"scales must be positive, got {scales!r}")
        if in_reductions is None:
            in_reductions = [16] * len(in_channels)
        if len(in_reductions) != len(in_channels):
            raise ValueError(f"in_reductions {list(in_reductions)} must match in_channels {in_channels}")
        self.in_channels, self.scales = in_channels, tuple(float(s) for s in scales)
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1, norm=norm, act=act) for c in in_channels)
        self.convs = nn.ModuleList(
            ConvModule(out_channels, out_channels, 3, padding=1, norm=norm, act=act) for _ in self.scales
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        reductions = [in_reductions[min(i, len(in_reductions) - 1)] / s for i, s in enumerate(self.scales)]
        self.feature_info = [
            dict(num_chs=out_channels, reduction=int(r) if float(r).is_integer() else r, module=f"convs.{i}")
            for i, r in enumerate(reductions)
        ]

    @property
    def out_channels(self) -> list[int]:
        return [f["num_chs"] for f in self.feature_info]

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"MultiLevelNeck expects {len(self.in_channels)} maps, got {len(inputs)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        if len(laterals) == 1:
            laterals = laterals * len(self.scales)
        outs = []
        for conv, x, s in zip(self.convs, laterals, self.scales):
            if s != 1:
                x = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
            outs.append(conv(x))
        return outs
