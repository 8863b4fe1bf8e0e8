"""APCNet decode head: adaptive context modules at several pooling scales."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from seglstm.models.heads.base import BaseDecodeHead, ConvModule, resize

__all__ = ["ACM", "APCHead"]


class ACM(nn.Module):
    """Adaptive Context Module of APCNet (He et al. 2019), as mmseg computes it.

    Every pixel gets ``pool_scale**2`` sigmoid affinities (``gla`` on the reduced input plus a global
    context vector) to the ``pool_scale x pool_scale`` pooled regions; the affinity-weighted region
    features go through ``residual_conv``, are added to the reduced input, ReLU'd and fused.
    """

    def __init__(self, pool_scale: int, fusion: bool, in_channels: int, channels: int) -> None:
        super().__init__()
        self.pool_scale, self.fusion, self.channels = int(pool_scale), fusion, channels
        self.pooled_redu_conv = ConvModule(in_channels, channels, 1)
        self.input_redu_conv = ConvModule(in_channels, channels, 1)
        self.global_info = ConvModule(channels, channels, 1)
        self.gla = nn.Conv2d(channels, self.pool_scale**2, 1)
        self.residual_conv = ConvModule(channels, channels, 1)
        if fusion:
            self.fusion_conv = ConvModule(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        pooled = self.pooled_redu_conv(F.adaptive_avg_pool2d(x, self.pool_scale))
        x = self.input_redu_conv(x)
        h, w = x.shape[2:]
        regions = pooled.flatten(2).transpose(1, 2)  # (B, s*s, C)
        glob = resize(self.global_info(F.adaptive_avg_pool2d(x, 1)), (h, w))
        affinity = self.gla(x + glob).permute(0, 2, 3, 1).reshape(b, h * w, self.pool_scale**2)
        z = torch.matmul(torch.sigmoid(affinity), regions)  # (B, h*w, C)
        z = z.transpose(1, 2).reshape(b, self.channels, h, w)
        z = F.relu(self.residual_conv(z) + x)
        return self.fusion_conv(z) if self.fusion else z


class APCHead(BaseDecodeHead):
    """mmseg's ``APCHead``: the input concatenated with one ACM output per pool scale, then a 3x3
    ``bottleneck``.

    Args:
        pool_scales: region grid of each ACM (the seed: 1, 2, 3, 6).
        fusion: add each ACM's ``fusion_conv``.
        **kwargs: ``BaseDecodeHead`` options.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int = 512,
        *,
        num_classes: int,
        in_index: int = 3,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        fusion: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(in_channels, channels, num_classes=num_classes, in_index=in_index, **kwargs)
        self._require_one_map()
        self.pool_scales, self.fusion = tuple(pool_scales), fusion
        self.acm_modules = nn.ModuleList(ACM(s, fusion, self.in_channels, channels) for s in self.pool_scales)
        self.bottleneck = ConvModule(self.in_channels + len(self.pool_scales) * channels, channels, 3, padding=1)

    def forward_features(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        x: torch.Tensor = self._transform_inputs(inputs)  # type: ignore[assignment]
        return self.bottleneck(torch.cat([x, *(acm(x) for acm in self.acm_modules)], dim=1))
