"""One entry point for every checkpoint format users bring: ours, Lightning's, the seed's mmseg
Seg-LSTM checkpoints and the Vision-LSTM v1 classification checkpoints.

Each foreign format goes through a filter that renames keys and resamples the position table; then a
plain ``load_state_dict`` does the strict check, and we turn its result into an error that lists the keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from seglstm.errors import SeglstmError
from seglstm.models.pretrained import PretrainedWeightsError, resolve_pretrained
from seglstm.utils.io import CheckpointLoadError, torch_load

__all__ = ["CheckpointMismatchError", "LoadReport", "load_pretrained"]


class CheckpointMismatchError(SeglstmError, RuntimeError):
    """Keys or shapes of a checkpoint do not fit the model."""


@dataclass
class LoadReport:
    format: str
    target: str
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"loaded {self.format} checkpoint into {self.target}: {len(self.missing_keys)} missing, "
            f"{len(self.unexpected_keys)} unexpected keys"
        )


def _unwrap(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Find the tensor mapping inside the containers that mmseg, Lightning and timm use."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "module"):
            if key in obj and isinstance(obj[key], Mapping):
                return _unwrap(obj[key], source)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return dict(tensors)
        if tensors:
            bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:5]
            raise CheckpointMismatchError(f"{source}: entries {bad} are not tensors")
    raise CheckpointMismatchError(
        f"{source}: no state dict found (expected a mapping of tensors, or one under 'state_dict'/'model')"
    )


def _strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _fmt_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# The files NX-AI publishes (ml.jku.at/research/vision_lstm/download/*.th) hold the state dict of their
# training code, which nests the blocks in an ``xlstm`` block stack; their hubconf.py renames it to the
# standalone model's names ("preprocess v1") before loading. Same renaming, in the same order, here.
_VIL_TRAINING_RENAMES = ((".xlstm.", ".layer."), ("xlstm.", ""), (".xlstm_norm.", ".norm."))
_VIL_TRAINING_HEAD = {
    "post_blocks_norm.weight": "legacy_norm.weight",
    "head.0.weight": "norm.weight",
    "head.0.bias": "norm.bias",
    "head.1.weight": "head.weight",
    "head.1.bias": "head.bias",
}


def _vil_from_training_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a published Vision-LSTM v1 file (``xlstm.blocks.{i}.xlstm.*``) to the ``blocks.{i}.layer.*``
    layout; non-persistent ``causal_mask`` buffers that older training runs saved are dropped."""
    out = {}
    for key, value in sd.items():
        if "causal_mask" in key:
            continue
        for old, new in _VIL_TRAINING_RENAMES:
            key = key.replace(old, new)
        out[_VIL_TRAINING_HEAD.get(key, key)] = value
    return out


def _adapt(sd: dict[str, torch.Tensor], module: nn.Module) -> tuple[dict[str, torch.Tensor], str, nn.Module]:
    """Return (state dict, format name, the module it targets) for the checkpoint's layout."""
    from seglstm.models.vil import VisionLSTM, checkpoint_filter_fn, resample_pos_embed

    if any(k.startswith("xlstm.blocks.") for k in sd):  # a published Vision-LSTM v1 file, as downloaded
        sd = _vil_from_training_layout(sd)
    own = module.state_dict()
    # Lightning wraps the segmentor as `model.`; strip it when the module does not.
    if not any(k in own for k in sd) and all(k.startswith("model.") for k in sd):
        sd = _strip_prefix(sd, "model.")
    is_segmentor = hasattr(module, "backbone")
    encoder = module.backbone if is_segmentor else module
    if any(k.startswith("blocks.") for k in sd):  # Vision-LSTM v1 classification checkpoint
        if not isinstance(encoder, VisionLSTM):
            raise CheckpointMismatchError(
                f"a Vision-LSTM classification checkpoint needs a ViL encoder, got {type(encoder).__name__}"
            )
        return checkpoint_filter_fn(sd, encoder), "vision-lstm-v1", encoder
    fmt = "seglstm"
    if not is_segmentor and any(k.startswith("backbone.") for k in sd):  # segmentor checkpoint -> encoder
        sd, fmt = _strip_prefix(sd, "backbone."), "mmseg-backbone"
    elif is_segmentor and any(k.startswith("decode_head.") for k in sd):
        fmt = "mmseg" if any(k.startswith("backbone.blocks1.") for k in sd) else "seglstm"
    prefix = "backbone." if is_segmentor else ""
    key = prefix + "pos_embed.embed"
    if isinstance(encoder, VisionLSTM) and key in sd and key in own and sd[key].shape != own[key].shape:
        if sd[key].shape[-1] == own[key].shape[-1]:  # same width: a different grid is resampled
            sd = dict(sd)
            sd[key] = resample_pos_embed(sd[key], tuple(own[key].shape[1:3]))
    return sd, fmt, module


def _adapt_input_convs(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """RGB first-layer weights for an N-band model: timm's ``adapt_input_conv`` (the smp rule: cycle the
    RGB kernels over the N bands, rescale by 3/N), for every 4-D weight that differs only in 3 -> N
    input channels."""
    from timm.models import adapt_input_conv

    out = dict(sd)
    for key, value in sd.items():
        target = own.get(key)
        if (
            target is not None and value.ndim == 4 and target.ndim == 4 and value.shape[1] == 3
            and target.shape[1] != 3 and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]
        ):
            out[key] = adapt_input_conv(target.shape[1], value)
    return out


def load_pretrained(
    module: nn.Module,
    path_or_state_dict: str | os.PathLike | Mapping[str, Any] | bool,
    strict: bool = True,
    unsafe: bool = False,
) -> LoadReport:
    """Load any supported checkpoint into an encoder or a segmentor.

    Args:
        module: a ``VisionLSTM`` encoder or an ``EncoderDecoder`` segmentor.
        path_or_state_dict: a file (loaded with ``weights_only=True`` unless ``unsafe``), a mapping, or a
            published weights name (``vil_s_in1k``, see ``seglstm weights``), fetched into torch's hub cache;
            ``True`` takes the first published name that fits the encoder.
        strict: raise when keys are missing or unexpected (for a classification checkpoint, only the
            encoder is checked; heads stay as initialised).
    Returns:
        A ``LoadReport`` with the format detected and the missing / unexpected keys.
    Raises:
        CheckpointMismatchError naming the offending keys and shapes; PretrainedWeightsError when a
        weights name cannot be downloaded or its file fails the checks.
    """
    if isinstance(path_or_state_dict, Mapping):
        source, obj = "state dict", path_or_state_dict
    else:
        source = resolve_pretrained(path_or_state_dict, module)
        try:
            obj = torch_load(source, unsafe=unsafe)
        except CheckpointLoadError as err:
            if path_or_state_dict is not True and source == os.fspath(path_or_state_dict):
                raise  # the user's own file: torch_load's message says it all
            raise PretrainedWeightsError(f"{err}; delete this cached file to download it again") from err
    sd, fmt, target = _adapt(_unwrap(obj, source), module)

    own = target.state_dict()
    sd = _adapt_input_convs(sd, own)
    shape_errors = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and v.shape != own[k].shape
    ]
    if shape_errors:
        raise CheckpointMismatchError(
            f"{source} ({fmt}) does not fit {type(target).__name__} (wrong width or class count?): "
            + "; ".join(shape_errors[:10])
            + (f"; ... ({len(shape_errors) - 10} more)" if len(shape_errors) > 10 else "")
        )
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
        raise CheckpointMismatchError(
            f"{source} ({fmt}) does not match {type(target).__name__} (wrong depth or preset?): "
            + "; ".join(parts)
        )
    target.load_state_dict(sd, strict=False)
    return LoadReport(fmt, type(target).__name__, missing, unexpected)
