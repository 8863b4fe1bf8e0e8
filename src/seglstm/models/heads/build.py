"""One builder for every decode and auxiliary head, so the Seg-LSTM presets and the comparison presets read
input widths, pick feature maps and route user overrides the same way (docs/design.md, section 5)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from seglstm.models.heads.ann_head import ANNHead
from seglstm.models.heads.apc_head import APCHead
from seglstm.models.heads.aspp_head import ASPPHead, DepthwiseSeparableASPPHead
from seglstm.models.heads.base import BaseDecodeHead
from seglstm.models.heads.fcn_head import FCNHead
from seglstm.models.heads.psp_head import PSPHead
from seglstm.models.heads.uper_head import UPerHead

__all__ = ["HEAD_TYPES", "build_auxiliary_head", "build_head", "head_arg_names", "split_overrides"]

# Head kinds by the name the presets use (mmseg's config names for the methods).
HEAD_TYPES: dict[str, type[BaseDecodeHead]] = {
    "upernet": UPerHead,
    "ann": ANNHead,
    "apcnet": APCHead,
    "deeplabv3": ASPPHead,
    "deeplabv3plus": DepthwiseSeparableASPPHead,
    "fcn": FCNHead,
    "psp": PSPHead,
}


def head_arg_names(head_cls: type[BaseDecodeHead]) -> set[str]:
    """Constructor arguments of a head and its head base classes that a user may override."""
    names: set[str] = set()
    for cls in head_cls.__mro__:
        if issubclass(cls, BaseDecodeHead):
            names |= set(inspect.signature(cls.__init__).parameters)
    return names - {"self", "kwargs", "in_channels", "num_classes"}


def split_overrides(head_cls: type[BaseDecodeHead], overrides: Mapping[str, Any]) -> tuple[dict, dict]:
    """Split user overrides into (head arguments, encoder arguments) by the head's constructor names."""
    names = head_arg_names(head_cls)
    head = {k: v for k, v in overrides.items() if k in names}
    encoder = {k: v for k, v in overrides.items() if k not in names}
    return head, encoder


def _check_index(what: str, index: int | Sequence[int], count: int) -> list[int]:
    picks = list(index) if isinstance(index, (list, tuple)) else [index]
    if not all(-count <= i < count for i in picks):
        raise ValueError(f"{what} in_index {index} is out of range for {count} feature maps")
    return picks


def build_head(kind: str, in_channels: Sequence[int], num_classes: int, **cfg: Any) -> BaseDecodeHead:
    """Build a ``HEAD_TYPES[kind]`` head whose input widths come from ``in_channels`` (one per encoder or
    neck output), picked by ``cfg["in_index"]``.

    DeepLabV3+ reads its low-level branch from map 0 unless ``c1_in_channels`` is given;
    ``channels_from_inputs=True`` makes the head as wide as its concatenated inputs (mmseg's ``fcn_hr*``).
    """
    if kind not in HEAD_TYPES:
        raise ValueError(f"unknown decode head {kind!r}; known: {', '.join(HEAD_TYPES)}")
    index = cfg["in_index"]
    widths = [int(in_channels[i]) for i in _check_index(f"{kind} head", index, len(in_channels))]
    if kind == "deeplabv3plus":
        cfg.setdefault("c1_in_channels", int(in_channels[0]))
    if cfg.pop("channels_from_inputs", False):
        cfg["channels"] = sum(widths)
    width = widths if isinstance(index, (list, tuple)) else widths[0]
    return HEAD_TYPES[kind](width, num_classes=num_classes, **cfg)


def build_auxiliary_head(in_channels: Sequence[int], num_classes: int, **cfg: Any) -> FCNHead:
    """The auxiliary FCN head on map ``cfg["in_index"]`` (its loss weight lives in the segmentor)."""
    index = cfg["in_index"]
    _check_index("auxiliary", index, len(in_channels))
    return FCNHead(int(in_channels[index]), num_classes=num_classes, **cfg)
