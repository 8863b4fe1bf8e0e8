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
        out_indices: outputs to build, when the heads read only some of them; the others are neither
            built nor computed and come out as ``None``. Building unread levels would leave parameters
            without gradients (which DDP rejects) and spend the most compute at the finest scale.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        scales: Sequence[float] = (4, 2, 1, 0.5),
        in_reductions: Sequence[int] | None = None,
        norm: bool = False,
        act: bool = False,
        out_indices: Sequence[int] | None = None,
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
        n = len(scales)
        if out_indices is None:
            out_indices = range(n)
        if any(not -n <= i < n for i in out_indices):
            raise ValueError(f"out_indices {list(out_indices)} out of range for {n} scales")
        self.out_indices = sorted({i % n for i in out_indices})
        self.in_channels, self.scales = in_channels, tuple(float(s) for s in scales)
        # ModuleDicts keyed "0".."3" give the same state-dict keys as mmseg's ModuleLists when all are built.
        lateral_ids = [0] if len(in_channels) == 1 else self.out_indices
        self.lateral_convs = nn.ModuleDict(
            {str(i): ConvModule(in_channels[i], out_channels, 1, norm=norm, act=act) for i in lateral_ids}
        )
        self.convs = nn.ModuleDict(
            {str(i): ConvModule(out_channels, out_channels, 3, padding=1, norm=norm, act=act)
             for i in self.out_indices}
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

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"MultiLevelNeck expects {len(self.in_channels)} maps, got {len(inputs)}")
        outs: list[torch.Tensor | None] = [None] * len(self.scales)
        for i in self.out_indices:
            j = 0 if len(self.in_channels) == 1 else i
            x = self.lateral_convs[str(j)](inputs[j])
            if self.scales[i] != 1:
                x = F.interpolate(x, scale_factor=self.scales[i], mode="bilinear", align_corners=False)
            outs[i] = self.convs[str(i)](x)
        return outs
