"""Vision-LSTM (ViL) encoder as Seg-LSTM uses it (docs/design.md, section 2): patch embedding, a learned 2-D
position table and stages of ViL blocks that alternate their scan direction, returning one 1/16 map per
stage; presets and the Vision-LSTM v1 checkpoint filter.

Parameter names follow the seed's mmseg checkpoints (``patch_embed.proj``, ``pos_embed.embed``,
``blocks1`` .. ``blocksN``, ``layer.mlstm_cell.igate`` ...), so those load without renaming; the
Vision-LSTM v1 classification checkpoints (``blocks.{i}``) go through ``checkpoint_filter_fn``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import PatchEmbed, resample_abs_pos_embed_nhwc, to_2tuple, trunc_normal_
from torch import nn

from seglstm.models.registry import register_encoder
from seglstm.models.vil.dispatch import BACKENDS, Backend, KernelChoice
from seglstm.models.vil.layer import ViLBlock, ViLLayer
from seglstm.models.vil.workspace import workspace


class PosEmbed2d(nn.Module):
    """Learned (1, Hp, Wp, C) table, resampled bicubically to whatever token grid arrives."""

    def __init__(self, grid: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.embed = nn.Parameter(torch.zeros(1, *grid, dim))
        trunc_normal_(self.embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + resample_pos_embed(self.embed, tuple(x.shape[1:3]))


def resample_pos_embed(embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resampling (align_corners False, no antialiasing) of a (1, H, W, C) position table to
    ``grid``; a no-op at the stored size."""
    return resample_abs_pos_embed_nhwc(embed, list(grid), interpolation="bicubic", antialias=False)


class VisionLSTM(nn.Module):
    """ViL encoder returning the token map after every stage, each (B, C, ceil(H/p), ceil(W/p)).

    Args:
        img_size: size the position table is stored for (the seed's 512 -> a 32x32 table); any input size
            runs, the table is resampled.
        depths: blocks per stage; block direction alternates inside each stage, restarting at 0.
        drop_path_rate: maximum stochastic-depth rate; ``drop_path_decay="linear"`` ramps it over blocks,
            ``"constant"`` uses it everywhere.
        mlstm_backend: ``chunkwise`` (linear time, default), ``parallel`` (the seed's quadratic form) or
            ``recurrent`` (reference).
        chunk_size: chunk length of the chunkwise kernel.
        mlstm_kernel: kernel choice of the chunkwise cell, see ``seglstm.models.vil.dispatch``.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 512,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depths: Sequence[int] = (6, 6, 6, 6),
        drop_path_rate: float = 0.0,
        drop_path_decay: str = "linear",
        expansion: int = 2,
        qkv_block_size: int = 4,
        conv_kernel_size: int = 4,
        num_heads: int = 4,
        mlstm_backend: Backend = "chunkwise",
        chunk_size: int = 64,
        mlstm_kernel: KernelChoice = "auto",
    ) -> None:
        super().__init__()
        img_size = to_2tuple(img_size)
        for name, value in (("patch_size", patch_size), ("embed_dim", embed_dim), ("in_chans", in_chans),
                            ("num_heads", num_heads)):  # fmt: skip
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ViL encoder: {name} must be a positive integer, got {value!r}")
        if any(s % patch_size for s in img_size):
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        if not depths or any(int(d) < 1 for d in depths):
            raise ValueError(f"depths must be a non-empty sequence of positive ints, got {depths!r}")
        if drop_path_decay not in ("linear", "constant"):
            raise ValueError(f"drop_path_decay must be 'linear' or 'constant', got {drop_path_decay!r}")
        self.patch_size, self.embed_dim, self.depths = patch_size, embed_dim, tuple(int(d) for d in depths)
        # Any input size: partial patches at the bottom/right see zeros (the grid is ceil(H/p) x ceil(W/p)).
        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim, flatten=False, output_fmt="NHWC", strict_img_size=False,
            dynamic_img_pad=True,
        )
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(embed_dim, -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        self.pos_embed = PosEmbed2d((img_size[0] // patch_size, img_size[1] // patch_size), embed_dim)

        total = sum(self.depths)
        if drop_path_decay == "linear":
            rates = [drop_path_rate * n / max(total - 1, 1) for n in range(total)]
        else:
            rates = [drop_path_rate] * total
        layer_kwargs = dict(
            expansion=expansion,
            qkv_block_size=qkv_block_size,
            conv_kernel_size=conv_kernel_size,
            num_heads=num_heads,
            mlstm_backend=mlstm_backend,
            chunk_size=chunk_size,
            mlstm_kernel=mlstm_kernel,
        )
        start = 0
        for s, depth in enumerate(self.depths):
            blocks = nn.ModuleList(
                ViLBlock(embed_dim, reverse=j % 2 == 1, drop_path=rates[start + j], **layer_kwargs)
                for j in range(depth)
            )
            self.add_module(f"blocks{s + 1}", blocks)
            start += depth
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks{s + 1}")
            for s in range(len(self.depths))
        ]

    @property
    def out_channels(self) -> list[int]:
        return [f["num_chs"] for f in self.feature_info]

    @property
    def stages(self) -> list[nn.ModuleList]:
        return [getattr(self, f"blocks{s + 1}") for s in range(len(self.depths))]

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed.embed"}

    def set_mlstm_backend(self, backend: Backend, chunk_size: int | None = None) -> None:
        """Switch every block's cell backend in place (weights unchanged)."""
        if backend not in BACKENDS:
            raise ValueError(f"mlstm_backend must be one of {BACKENDS}, got {backend!r}")
        for m in self.modules():
            if isinstance(m, ViLLayer):
                m.mlstm_backend = backend
                m.chunk_size = chunk_size or m.chunk_size

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Token maps after each stage as (B, Hp, Wp, C), channels last."""
        if x.ndim != 4:
            raise ValueError(f"expected a (B, C, H, W) image batch, got shape {tuple(x.shape)}")
        x = self.pos_embed(self.patch_embed(x))  # (B, Hp, Wp, C)
        b, hp, wp, c = x.shape
        # The patch conv leaves the tokens channel-major: every LayerNorm would copy them and every residual
        # add would run strided. One copy here makes the whole trunk token-major.
        x = x.reshape(b, hp * wp, c).contiguous()
        outs = []
        # Inference: the layers share one set of buffers (seglstm.models.vil.workspace), and residual sums
        # after a stage's first block go in place (the first one must not overwrite the previous stage's
        # output, which the caller gets).
        inference = not torch.is_grad_enabled()
        with workspace() if inference else contextlib.nullcontext():
            for stage in self.stages:
                for j, block in enumerate(stage):
                    x = block(x, inplace=inference and j > 0)
                outs.append(x.view(b, hp, wp, c))
        return outs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [t.permute(0, 3, 1, 2).contiguous() for t in self.forward_features(x)]


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: VisionLSTM) -> dict[str, torch.Tensor]:
    """Map a Vision-LSTM v1 classification checkpoint onto our stages, drop the classifier parts and
    resample the position table to the model's grid."""
    out: dict[str, torch.Tensor] = {}
    # flat block index -> (stage, index in stage)
    where = [(s, j) for s, d in enumerate(model.depths) for j in range(d)]
    dropped = ("legacy_norm.", "norm.", "head.", "cls_token")
    n_blocks = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")), default=-1)
    if n_blocks and n_blocks != len(where):
        raise ValueError(
            f"checkpoint has {n_blocks} blocks but the model has {len(where)} (depths {model.depths})"
        )
    for key, value in state_dict.items():
        if key.startswith(dropped):
            continue
        if key.startswith("blocks."):
            _, idx, rest = key.split(".", 2)
            s, j = where[int(idx)]
            key = f"blocks{s + 1}.{j}.{rest}"
        out[key] = value
    if "pos_embed.embed" in out:
        out["pos_embed.embed"] = resample_pos_embed(
            out["pos_embed.embed"], tuple(model.pos_embed.embed.shape[1:3])
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# presets


def _create_vil(default_dim: int, default_depths: tuple[int, ...], **overrides: Any) -> VisionLSTM:
    # Preset values are defaults: a user's embed_dim / depths override them instead of colliding.
    pretrained = overrides.pop("pretrained", None)
    kwargs: dict[str, Any] = dict(embed_dim=default_dim, depths=default_depths)
    kwargs.update(overrides)
    model = VisionLSTM(**kwargs)
    if pretrained:
        from seglstm.models.checkpoint import load_pretrained

        load_pretrained(model, pretrained, strict=True)
    return model


@register_encoder
def vil_t(**kwargs: Any) -> VisionLSTM:
    """ViL-T width (192), Seg-LSTM's (6,6,6,6) layout."""
    return _create_vil(192, (6, 6, 6, 6), **kwargs)


@register_encoder
def vil_s(**kwargs: Any) -> VisionLSTM:
    """ViL-S width (384), the seed encoder: 22.72 M parameters at a 512 input table."""
    return _create_vil(384, (6, 6, 6, 6), **kwargs)


@register_encoder
def vil_b(**kwargs: Any) -> VisionLSTM:
    """ViL-B width (768), (6,6,6,6) layout."""
    return _create_vil(768, (6, 6, 6, 6), **kwargs)


@register_encoder
def vil_t_44124(**kwargs: Any) -> VisionLSTM:
    """ViL-T width, (4,4,12,4) layout."""
    return _create_vil(192, (4, 4, 12, 4), **kwargs)


@register_encoder
def vil_s_44124(**kwargs: Any) -> VisionLSTM:
    """ViL-S width, (4,4,12,4) layout (the seed's second configuration)."""
    return _create_vil(384, (4, 4, 12, 4), **kwargs)


@register_encoder
def vil_b_44124(**kwargs: Any) -> VisionLSTM:
    """ViL-B width, (4,4,12,4) layout."""
    return _create_vil(768, (4, 4, 12, 4), **kwargs)
