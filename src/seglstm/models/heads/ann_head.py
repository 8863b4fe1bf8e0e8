"""ANN decode head: asymmetric non-local blocks (AFNB fusion across two levels, APNB context)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from seglstm.models.heads.base import BaseDecodeHead, ConvModule

__all__ = ["AFNB", "APNB", "ANNHead", "PPMConcat", "SelfAttentionBlock"]


class PPMConcat(nn.ModuleList):
    """Adaptive average pools whose flattened outputs are concatenated: (B, C, sum(s*s))."""

    def __init__(self, pool_scales: Sequence[int]) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(int(s)) for s in pool_scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([pool(x).flatten(2) for pool in self], dim=2)


class SelfAttentionBlock(nn.Module):
    """ANN's non-local block with pyramid-pooled keys and values (mmseg's ann ``SelfAttentionBlock``).

    Query and key projections are 1x1 ConvModules (BN + ReLU), value and output projections plain 1x1
    convolutions, the output projection starting at zero so the block starts as a no-op. Similarities
    are scaled by ``channels ** -0.5`` before the softmax over the pooled positions.

    With ``share_key_query`` the same module serves keys and queries; it is registered under both
    ``key_project`` and ``query_project`` (as mmseg does), so the state dict holds both names.
    """

    def __init__(
        self,
        key_in_channels: int,
        query_in_channels: int,
        channels: int,
        out_channels: int,
        share_key_query: bool,
        key_pool_scales: Sequence[int],
    ) -> None:
        super().__init__()
        if share_key_query and key_in_channels != query_in_channels:
            raise ValueError(
                f"shared key/query projection needs equal input widths, got {key_in_channels} and "
                f"{query_in_channels}"
            )
        self.channels = channels
        self.key_project = ConvModule(key_in_channels, channels, 1)
        self.query_project = self.key_project if share_key_query else ConvModule(query_in_channels, channels, 1)
        self.value_project = nn.Conv2d(key_in_channels, channels, 1)
        self.out_project = nn.Conv2d(channels, out_channels, 1)
        self.key_downsample = PPMConcat(key_pool_scales)
        nn.init.zeros_(self.out_project.weight)
        nn.init.zeros_(self.out_project.bias)

    def forward(self, query_feats: torch.Tensor, key_feats: torch.Tensor) -> torch.Tensor:
        b, _, h, w = query_feats.shape
        query = self.query_project(query_feats).flatten(2).transpose(1, 2)  # (B, h*w, C)
        key = self.key_downsample(self.key_project(key_feats))  # (B, C, Nk)
        value = self.key_downsample(self.value_project(key_feats)).transpose(1, 2)  # (B, Nk, C)
        sim = torch.softmax(torch.matmul(query, key) * self.channels**-0.5, dim=-1)
        context = torch.matmul(sim, value).transpose(1, 2).reshape(b, -1, h, w)
        return self.out_project(context)


class AFNB(nn.Module):
    """Asymmetric Fusion Non-local Block: queries from the high-level map, keys/values from the low-level
    one; the summed stage outputs are concatenated with the high-level map and fused by ``bottleneck``
    (1x1 ConvModule with BN and no activation)."""

    def __init__(
        self,
        low_in_channels: int,
        high_in_channels: int,
        channels: int,
        out_channels: int,
        query_scales: Sequence[int],
        key_pool_scales: Sequence[int],
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            SelfAttentionBlock(low_in_channels, high_in_channels, channels, out_channels, False, key_pool_scales)
            for _ in query_scales
        )
        self.bottleneck = ConvModule(out_channels + high_in_channels, out_channels, 1, act=False)

    def forward(self, low_feats: torch.Tensor, high_feats: torch.Tensor) -> torch.Tensor:
        context = torch.stack([stage(high_feats, low_feats) for stage in self.stages]).sum(dim=0)
        return self.bottleneck(torch.cat([context, high_feats], dim=1))


class APNB(nn.Module):
    """Asymmetric Pyramid Non-local Block: self-attention of a map on itself with a shared key/query
    projection, concatenated with the map and fused by a 1x1 ``bottleneck`` ConvModule (BN + ReLU)."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        out_channels: int,
        query_scales: Sequence[int],
        key_pool_scales: Sequence[int],
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            SelfAttentionBlock(in_channels, in_channels, channels, out_channels, True, key_pool_scales)
            for _ in query_scales
        )
        self.bottleneck = ConvModule(2 * in_channels, out_channels, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        context = torch.stack([stage(feats, feats) for stage in self.stages]).sum(dim=0)
        return self.bottleneck(torch.cat([context, feats], dim=1))


class ANNHead(BaseDecodeHead):
    """mmseg's ``ANNHead`` (Zhu et al. 2019).

    ``in_index`` selects (low, high) maps: ``fusion`` (AFNB) attends from the high map to the low one,
    then dropout, a 3x3 ``bottleneck`` to ``channels`` and ``context`` (APNB); ``cls_seg`` applies the
    dropout a second time, as mmseg does.

    Args:
        in_channels: widths of the (low, high) maps.
        project_channels: key/query/value width of the attention blocks (256 in the seed).
        query_scales: one attention stage per entry; mmseg only runs scale 1 (no query pooling).
        key_pool_scales: pyramid of adaptive pools that summarise keys and values.
        **kwargs: ``BaseDecodeHead`` options.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int = 512,
        *,
        num_classes: int,
        in_index: Sequence[int] = (2, 3),
        project_channels: int = 256,
        query_scales: Sequence[int] = (1,),
        key_pool_scales: Sequence[int] = (1, 3, 6, 8),
        **kwargs,
    ) -> None:
        super().__init__(
            in_channels, channels, num_classes=num_classes, in_index=in_index,
            input_transform="multiple_select", **kwargs,
        )
        if len(self.in_channels) != 2:  # type: ignore[arg-type]
            raise ValueError(f"ANNHead needs exactly two inputs (low, high), got in_channels={in_channels!r}")
        if any(int(s) != 1 for s in query_scales):
            # mmseg reshapes the attention output to the un-pooled query size, so only 1 ever ran.
            raise ValueError(f"ANNHead supports query_scales of 1 only (as mmseg), got {query_scales!r}")
        low, high = self.in_channels  # type: ignore[misc]
        self.project_channels = project_channels
        self.fusion = AFNB(low, high, project_channels, high, query_scales, key_pool_scales)
        self.bottleneck = ConvModule(high, channels, 3, padding=1)
        self.context = APNB(channels, project_channels, channels, query_scales, key_pool_scales)

    def forward_features(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        low, high = self._transform_inputs(inputs)
        out = self.fusion(low, high)
        if self.dropout is not None:
            out = self.dropout(out)
        return self.context(self.bottleneck(out))
