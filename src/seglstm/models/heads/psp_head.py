"""PSPNet decode head (pyramid pooling on one map), for the comparison baselines."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from seglstm.models.heads.base import PPM, BaseDecodeHead, ConvModule

__all__ = ["PSPHead"]


class PSPHead(BaseDecodeHead):
    """mmseg's ``PSPHead`` (Zhao et al. 2017): the input concatenated with its PPM branches, then a 3x3
    ``bottleneck``.

    Args:
        pool_scales: output sizes of the PPM's adaptive pools.
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
        **kwargs,
    ) -> None:
        super().__init__(in_channels, channels, num_classes=num_classes, in_index=in_index, **kwargs)
        self._require_one_map()
        self.pool_scales = tuple(pool_scales)
        self.psp_modules = PPM(pool_scales, self.in_channels, channels, self.align_corners)
        self.bottleneck = ConvModule(self.in_channels + len(pool_scales) * channels, channels, 3, padding=1)

    def forward_features(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        x: torch.Tensor = self._transform_inputs(inputs)  # type: ignore[assignment]
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))
