"""Building blocks shared by the decode heads, named as mmcv/mmseg name them.

Module and parameter names (``conv``, ``bn``, ``conv_seg``, ``psp_modules.{i}.1``) are part of the
checkpoint format: a Seg-LSTM checkpoint trained with mmseg 1.2.1 loads into these modules with
``strict=True`` only if every attribute keeps its mmseg name.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PPM", "BaseDecodeHead", "ConvModule", "DepthwiseSeparableConvModule", "resize"]

INPUT_TRANSFORMS = (None, "resize_concat", "multiple_select")


def resize(x: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize of an NCHW map; returns ``x`` itself when it already has ``size``."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


class ConvModule(nn.Module):
    """Conv2d -> BatchNorm2d -> ReLU, mmcv's ``ConvModule`` with ``norm_cfg=BN``.

    The convolution has no bias when a norm follows (mmcv's ``bias='auto'``). Weights start as mmcv
    starts them: Kaiming-normal (fan_out, ReLU gain) for the conv, ones/zeros for the norm.

    Args:
        norm: add the ``bn`` BatchNorm2d (the trainer turns it into SyncBatchNorm under DDP).
        act: add the ReLU (mmseg's ``act_cfg=None`` is ``act=False``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        norm: bool = True,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
            groups=groups, bias=not norm,
        )
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.activate = nn.ReLU(inplace=True) if act else None
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.activate is not None:
            x = self.activate(x)
        return x


class DepthwiseSeparableConvModule(nn.Module):
    """Depthwise ``ConvModule`` (groups = in_channels) then a pointwise 1x1 ``ConvModule``, both BN+ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.depthwise_conv = ConvModule(
            in_channels, in_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
            groups=in_channels,
        )
        self.pointwise_conv = ConvModule(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class PPM(nn.ModuleList):
    """Pyramid pooling: for each scale, adaptive average pool -> 1x1 ConvModule -> resize back.

    Each entry is ``Sequential(AdaptiveAvgPool2d, ConvModule)`` so its parameters sit under ``{i}.1.``
    as in mmseg checkpoints.
    """

    def __init__(
        self, pool_scales: Sequence[int], in_channels: int, channels: int, align_corners: bool = False
    ) -> None:
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(int(s)), ConvModule(in_channels, channels, 1)) for s in pool_scales
        )
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [resize(stage(x), x.shape[2:], self.align_corners) for stage in self]


def _check_channels(value: object, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class BaseDecodeHead(nn.Module, metaclass=ABCMeta):
    """What every mmseg decode head shares: input selection, dropout and the 1x1 classifier ``conv_seg``.

    Subclasses implement ``forward_features(inputs) -> (B, channels, h, w)``; ``forward`` adds dropout and
    ``conv_seg`` and returns logits at the resolution of the selected feature map (the segmentor
    upsamples them to the image).

    Args:
        in_channels: channels of the selected input(s); a list for ``resize_concat`` / ``multiple_select``.
        channels: width of the head before ``conv_seg``.
        num_classes: output channels of ``conv_seg``.
        in_index: which encoder output(s) the head reads.
        input_transform: ``None`` (one map), ``"multiple_select"`` (a list of maps) or ``"resize_concat"``
            (maps resized to the first one and concatenated), as in mmseg.
        dropout_ratio: ``nn.Dropout2d`` rate before ``conv_seg`` (0 disables it).
        align_corners: ``align_corners`` of every bilinear resize inside the head.
    """

    def __init__(
        self,
        in_channels: int | Sequence[int],
        channels: int,
        *,
        num_classes: int,
        in_index: int | Sequence[int] = -1,
        input_transform: str | None = None,
        dropout_ratio: float = 0.1,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        if input_transform not in INPUT_TRANSFORMS:
            raise ValueError(f"input_transform must be one of {INPUT_TRANSFORMS}, got {input_transform!r}")
        _check_channels(channels, "channels")
        _check_channels(num_classes, "num_classes")
        if not 0.0 <= float(dropout_ratio) < 1.0:
            raise ValueError(f"dropout_ratio must be in [0, 1), got {dropout_ratio!r}")
        if input_transform is None:
            if not isinstance(in_index, int):
                raise ValueError(f"in_index must be an int when input_transform is None, got {in_index!r}")
            _check_channels(in_channels, "in_channels")
            self.in_channels: int | list[int] = int(in_channels)  # type: ignore[arg-type]
            self.in_index: int | list[int] = in_index
        else:
            if isinstance(in_index, int) or isinstance(in_channels, int):
                raise ValueError(
                    f"input_transform={input_transform!r} needs lists for in_channels and in_index, "
                    f"got in_channels={in_channels!r}, in_index={in_index!r}"
                )
            if len(in_channels) != len(in_index):
                raise ValueError(
                    f"in_channels {list(in_channels)} and in_index {list(in_index)} must have the same length"
                )
            for c in in_channels:
                _check_channels(c, "in_channels entry")
            self.in_index = [int(i) for i in in_index]
            self.in_channels = sum(in_channels) if input_transform == "resize_concat" else list(in_channels)
        self.input_transform = input_transform
        self.channels = channels
        self.num_classes = num_classes
        self.dropout_ratio = float(dropout_ratio)
        self.align_corners = align_corners
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def extra_repr(self) -> str:
        return (
            f"in_index={self.in_index}, input_transform={self.input_transform}, "
            f"align_corners={self.align_corners}"
        )

    def _select(self, inputs: Sequence[torch.Tensor], index: int) -> torch.Tensor:
        if not -len(inputs) <= index < len(inputs):
            raise IndexError(
                f"{type(self).__name__} reads feature map {index} (in_index={self.in_index}) but the "
                f"encoder/neck returned {len(inputs)} maps"
            )
        if inputs[index] is None:
            raise ValueError(
                f"{type(self).__name__} reads feature map {index} but it was not computed (a neck built "
                "without that output index)"
            )
        return inputs[index]

    def _transform_inputs(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        if not isinstance(inputs, (list, tuple)):
            raise TypeError(
                f"{type(self).__name__} expects a list of feature maps, got {type(inputs).__name__}"
            )
        if self.input_transform is None:
            return self._select(inputs, self.in_index)  # type: ignore[arg-type]
        selected = [self._select(inputs, i) for i in self.in_index]  # type: ignore[union-attr]
        if self.input_transform == "multiple_select":
            return selected
        size = selected[0].shape[2:]
        return torch.cat([resize(x, size, self.align_corners) for x in selected], dim=1)

    def _require_one_map(self) -> None:
        """For heads built on one map: a list of inputs must be concatenated first (``resize_concat``)."""
        if not isinstance(self.in_channels, int):
            raise ValueError(f"{type(self).__name__} reads one map: use input_transform None or 'resize_concat'")

    def input_indices(self) -> list[int]:
        """Indices of the encoder/neck outputs this head reads (as given, possibly negative)."""
        return [self.in_index] if isinstance(self.in_index, int) else list(self.in_index)

    @abstractmethod
    def forward_features(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Head features before dropout and ``conv_seg``, (B, channels, h, w)."""

    def cls_seg(self, feat: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            feat = self.dropout(feat)
        return self.conv_seg(feat)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits (B, num_classes, h, w) at the resolution of the head's (first) selected feature map."""
        return self.cls_seg(self.forward_features(inputs))
