"""Named presets for encoders and segmentors, registered in one place (timm style).

A preset is a small function that calls a private builder with fixed arguments; user overrides are passed
through as keyword arguments. Encoders and whole segmentors live in separate tables so that
``create_encoder("vil_s")`` and ``create_model("seglstm_upernet_s", num_classes=7)`` cannot be confused.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import nn

_ENCODERS: dict[str, Callable[..., nn.Module]] = {}
_MODELS: dict[str, Callable[..., nn.Module]] = {}


def _register(table: dict[str, Callable[..., nn.Module]], kind: str):
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in table:
            raise ValueError(f"{kind} preset {name!r} is registered twice")
        table[name] = fn
        return fn

    return deco


register_encoder = _register(_ENCODERS, "encoder")
register_model = _register(_MODELS, "model")


def _ensure_presets_loaded() -> None:
    # Importing the model package runs every @register_* decorator exactly once.
    import seglstm.models  # noqa: F401


def _lookup(table: dict[str, Callable[..., nn.Module]], name: str, kind: str) -> Callable[..., nn.Module]:
    _ensure_presets_loaded()
    if name not in table:
        close = difflib.get_close_matches(name, table, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(sorted(table))}")
    return table[name]


def list_encoders() -> list[str]:
    _ensure_presets_loaded()
    return sorted(_ENCODERS)


def list_models() -> list[str]:
    _ensure_presets_loaded()
    return sorted(_MODELS)


def create_encoder(name: str, **overrides: Any) -> nn.Module:
    """Build a registered encoder; its forward returns one NCHW map per stage."""
    return _lookup(_ENCODERS, name, "encoder")(**overrides)


def create_model(name: str, num_classes: int, **overrides: Any) -> nn.Module:
    """Build a registered segmentor (encoder + optional neck + decode head + auxiliary head)."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return _lookup(_MODELS, name, "model")(num_classes=num_classes, **overrides)
