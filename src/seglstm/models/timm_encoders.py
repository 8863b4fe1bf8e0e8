"""timm backbones (CNNs, ViT, Swin) behind the encoder contract the decode heads expect.

The contract is the one the Vision-LSTM encoder follows: ``forward(x)`` returns one NCHW map per stage for any
input height and width, and ``feature_info`` / ``out_channels`` describe those maps so that heads never hard-code
channel counts or strides. timm already builds the networks; this wrapper only fixes what differs between its
families: Swin's feature maps come out channels-last, ViT exposes stages through ``forward_intermediates``
rather than ``features_only``, and some backbones (patch embeddings, HRNet's branch fusion) reject sizes that
are not multiples of their stride, so the input is padded and every map cropped back to ``ceil(size / stride)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from torch import nn

from seglstm.models.pretrained import PretrainedWeightsError

FeatureMode = Literal["features_only", "intermediates"]
_NO_DECAY_KEYS = ("pos_embed", "cls_token", "dist_token", "reg_token", "relative_position_bias_table")


def _timm_pretrained(model_name: str, pretrained: bool | str | os.PathLike | None) -> tuple[str, bool, dict]:
    """(name to build, timm's pretrained flag, extra ``create_model`` arguments) for ``pretrained``."""
    if pretrained is None or isinstance(pretrained, bool):
        return model_name, bool(pretrained), {}
    spec = os.fspath(pretrained)
    if os.path.isfile(spec):
        return model_name, True, {"pretrained_cfg_overlay": {"file": spec}}
    arch = model_name.split(".")[0]
    known = timm.list_pretrained(f"{arch}.*")
    if spec == arch or spec in known:
        return spec, True, {}
    raise ValueError(
        f"pretrained={spec!r} is neither a file nor a timm pretrained name of {arch} (known: {', '.join(known)})"
    )


def create_timm_model(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with a one-line error when the pretrained weights cannot be fetched."""
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as err:
        if not pretrained:
            raise
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise PretrainedWeightsError(
            f"cannot fetch timm's pretrained weights for {name!r} from the Hugging Face hub ({first}); offline? "
            "Download them elsewhere (timm.create_model(name, pretrained=True) fills the hub cache, or fetch "
            "model.safetensors from huggingface.co/timm/<name>) and pass the local file as pretrained=PATH"
        ) from err


class TimmEncoder(nn.Module):
    """A timm model returning a list of NCHW feature maps, one per requested stage.

    Args:
        model_name: timm model name, e.g. ``"resnet50"``, ``"hrnet_w18"``, ``"vit_small_patch16_224"``.
        mode: ``"features_only"`` builds timm's feature extractor (CNNs, Swin); ``"intermediates"`` builds the
            full model, prunes the blocks, final norm and classifier it does not need and calls
            ``forward_intermediates`` (plain ViTs, whose stages are blocks at one stride).
        out_indices: stage indices (features_only) or block indices (intermediates) to return.
        pretrained: ``True`` loads timm's default pretrained weights for ``model_name``; a timm pretrained
            name of the same network (``"resnet50.tv_in1k"``) picks other ones; a local file (``.safetensors``
            or ``.pth`` with timm's key names) is loaded through timm's ``pretrained_cfg_overlay``. timm
            downloads through the Hugging Face hub and caches there.
        pad_multiple: pad the input on the bottom/right to a multiple of this before the backbone; ``None``
            uses the largest output stride, which every timm family accepts.
        **timm_kwargs: passed to ``timm.create_model`` (``output_stride``, ``img_size``, ``dynamic_img_size``,
            ``strict_img_size``, ``drop_path_rate``, ...).
    """

    def __init__(
        self,
        model_name: str,
        mode: FeatureMode = "features_only",
        out_indices: Sequence[int] = (0, 1, 2, 3),
        pretrained: bool | str | os.PathLike = False,
        pad_multiple: int | None = None,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        if mode not in ("features_only", "intermediates"):
            raise ValueError(f"mode must be 'features_only' or 'intermediates', got {mode!r}")
        if not out_indices:
            raise ValueError(f"out_indices must name at least one stage, got {out_indices!r}")
        self.model_name = model_name
        self.mode = mode
        self.out_indices = tuple(int(i) for i in out_indices)

        build_name, pretrained, extra = _timm_pretrained(model_name, pretrained)
        timm_kwargs.update(extra)
        if mode == "features_only":
            self.model = create_timm_model(
                build_name,
                pretrained=pretrained,
                features_only=True,
                out_indices=self.out_indices,
                **timm_kwargs,
            )
            info = self.model.feature_info.get_dicts()
            self._channels_last = str(getattr(self.model, "output_fmt", "NCHW")).endswith("NHWC")
        else:
            self.model = create_timm_model(build_name, pretrained=pretrained, num_classes=0, **timm_kwargs)
            if not hasattr(self.model, "forward_intermediates"):
                raise ValueError(
                    f"timm model {model_name!r} has no forward_intermediates; use mode='features_only'"
                )
            n_blocks = len(self.model.feature_info)
            bad = [i for i in self.out_indices if not -n_blocks <= i < n_blocks]
            if bad:
                raise ValueError(f"out_indices {bad} out of range for {model_name!r} with {n_blocks} blocks")
            # Drop the blocks after the last tap, the final norm and the classifier: unused parameters would
            # inflate the parameter count and break DDP without find_unused_parameters.
            self.model.prune_intermediate_layers(list(self.out_indices), prune_norm=True, prune_head=True)
            info = [self.model.feature_info[i] for i in self.out_indices]
            self._channels_last = False

        self.feature_info: list[dict[str, Any]] = [
            {"num_chs": int(d["num_chs"]), "reduction": int(d["reduction"]), "module": str(d["module"])}
            for d in info
        ]
        self.out_channels: list[int] = [d["num_chs"] for d in self.feature_info]
        self.reductions: list[int] = [d["reduction"] for d in self.feature_info]
        self.pad_multiple = max(self.reductions) if pad_multiple is None else int(pad_multiple)
        if self.pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple!r}")

    def no_weight_decay(self) -> set[str]:
        """Parameters timm's recipes train without weight decay: position tables, prefix tokens, relative
        position biases (found by name, since ``features_only`` wrappers drop timm's own method)."""
        return {n for n, _ in self.named_parameters() if any(k in n for k in _NO_DECAY_KEYS)}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return one (B, C_i, ceil(H / r_i), ceil(W / r_i)) map per output, r_i = ``reductions[i]``."""
        if x.dim() != 4:
            raise ValueError(
                f"{self.model_name}: expected a (B, C, H, W) image batch, got shape {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        m = self.pad_multiple
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        if self.mode == "features_only":
            feats = self.model(x)
        else:
            feats = self.model.forward_intermediates(
                x, indices=list(self.out_indices), output_fmt="NCHW", intermediates_only=True
            )
        if self._channels_last:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return [
            f[..., : math.ceil(h / r), : math.ceil(w / r)].contiguous()
            for f, r in zip(feats, self.reductions, strict=True)
        ]
