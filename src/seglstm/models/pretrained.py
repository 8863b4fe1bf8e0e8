"""ImageNet weights by name: ``pretrained="vil_s_in1k"`` wherever a checkpoint path is accepted.

Two kinds of names:

- the Vision-LSTM v1 ImageNet-1k classification checkpoints that NX-AI publishes (the files its
  ``torch.hub`` entry points load), for the ViL encoders of the same width and block count. They are
  downloaded once into torch's hub cache (``torch.hub.get_dir()/checkpoints``, the folder
  ``torch.hub.load_state_dict_from_url`` uses), checked (size and SHA-256 where known, then key layout and
  shapes by a strict load into the encoder built on the meta device) and only then moved into place, so
  that a truncated or foreign file never sits in the cache as if it were good.
- timm's pretrained names (``resnet50.a1_in1k``) for the comparison encoders, which timm downloads and
  caches itself through the Hugging Face hub; see ``seglstm.models.timm_encoders``.

``SEGLSTM_WEIGHTS_URL`` replaces the download base URL (a mirror, or a local server in the tests).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.error
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from seglstm.utils.io import CheckpointLoadError

__all__ = [
    "BASE_URL_ENV",
    "TIMM_ENCODERS",
    "VIL_WEIGHTS",
    "PretrainedWeights",
    "PretrainedWeightsError",
    "cached_weights",
    "fetch_weights",
    "is_weights_name",
    "resolve_pretrained",
    "timm_weight_names",
]

# Where NX-AI's README points ("directly downloaded from here") and its hubconf.py downloads from.
DEFAULT_BASE_URL = "https://ml.jku.at/research/vision_lstm/download/"
BASE_URL_ENV = "SEGLSTM_WEIGHTS_URL"

_VIL_SOURCE = "NX-AI Vision-LSTM (torch.hub nx-ai/vision-lstm '{hub}'), ImageNet-1k, 224 px"
# NX-AI states no licence for the weight files; its repository is MIT except the model code (AGPL-3.0).
_VIL_LICENCE = "not stated (repository MIT, model code AGPL-3.0)"


class PretrainedWeightsError(CheckpointLoadError):
    """Weights named by the user cannot be fetched or are not what their name promises (a checkpoint load
    error, so the commands report it in one line)."""


@dataclass(frozen=True)
class PretrainedWeights:
    """One published checkpoint: where it lives and which of our encoders it fits.

    ``size`` (bytes) and ``sha256`` are checked when known; NX-AI publishes neither for its files, so for
    those the key layout and tensor shapes are the check.
    """

    name: str
    file_name: str
    hub_name: str
    encoders: tuple[str, ...]
    embed_dim: int
    depth: int
    size: int | None = None
    sha256: str | None = None
    licence: str = _VIL_LICENCE

    @property
    def source(self) -> str:
        return _VIL_SOURCE.format(hub=self.hub_name)

    @property
    def url(self) -> str:
        base = os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
        return base.rstrip("/") + "/" + self.file_name

    @property
    def cache_path(self) -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints" / self.file_name


# The Vision-LSTM v1 files of NX-AI/vision-lstm's hubconf.py that fit our encoder: 16-pixel patches with
# stride 16 and 24 blocks, which map onto the (6,6,6,6) and (4,4,12,4) stages (every stage has an even
# block count, so each block keeps its scan direction). Not listed: vil-tinyplus (29 blocks),
# vil-smallplus (26), the *-stride8 long-sequence models (overlapping patches, stride 8) and the vil2-*
# models (another block layout).
VIL_WEIGHTS: dict[str, PretrainedWeights] = {
    w.name: w
    for w in (
        PretrainedWeights("vil_t_in1k", "vil_tiny16_e800_in1k.th", "vil-tiny", ("vil_t", "vil_t_44124"), 192, 24),
        PretrainedWeights(
            "vil_t_e400_in1k", "vil_tiny16_e400_in1k.th", "vil-tiny-e400", ("vil_t", "vil_t_44124"), 192, 24
        ),
        PretrainedWeights("vil_s_in1k", "vil_small16_e400_in1k.th", "vil-small", ("vil_s", "vil_s_44124"), 384, 24),
        PretrainedWeights("vil_b_in1k", "vil_base16_e400_in1k.th", "vil-base", ("vil_b", "vil_b_44124"), 768, 24),
    )
}

# The timm networks the comparison presets build (seglstm.models.comparison), and those presets.
TIMM_ENCODERS: dict[str, tuple[str, ...]] = {
    "resnet18": ("deeplabv3plus_r18", "pspnet_r18"),
    "resnet50": ("deeplabv3plus_r50", "pspnet_r50"),
    "resnet101": ("deeplabv3plus_r101", "pspnet_r101"),
    "hrnet_w18_small_v2": ("fcn_hr18s",),
    "hrnet_w18": ("fcn_hr18",),
    "hrnet_w48": ("fcn_hr48",),
    "vit_small_patch16_224": ("vit_s_upernet",),
    "swin_tiny_patch4_window7_224": ("swin_t_upernet",),
}


def timm_weight_names() -> list[str]:
    """timm's default pretrained name (``arch.tag``) of every comparison encoder, as timm resolves
    ``pretrained=True``."""
    from timm.models import get_pretrained_cfg

    names = []
    for arch in TIMM_ENCODERS:
        cfg = get_pretrained_cfg(arch)
        if cfg is not None and cfg.hf_hub_id:
            names.append(cfg.hf_hub_id.split("/", 1)[-1])
    return names


def is_weights_name(spec: object) -> bool:
    """True for a registered Vision-LSTM weights name (not for paths)."""
    return isinstance(spec, str) and spec in VIL_WEIGHTS


def _lookup(name: str) -> PretrainedWeights:
    if name not in VIL_WEIGHTS:
        raise PretrainedWeightsError(
            f"unknown weights name {name!r}; known: {', '.join(VIL_WEIGHTS)} (or pass a checkpoint path)"
        )
    return VIL_WEIGHTS[name]


def _check_fits(weights: PretrainedWeights, module: nn.Module) -> None:
    """Refuse before downloading when the model cannot take the checkpoint."""
    from seglstm.models.vil import VisionLSTM

    encoder = getattr(module, "backbone", module)
    if not isinstance(encoder, VisionLSTM):
        raise PretrainedWeightsError(
            f"{weights.name} is a Vision-LSTM checkpoint (for {', '.join(weights.encoders)}); this model's "
            f"encoder is a {type(encoder).__name__}"
        )
    depth = sum(encoder.depths)
    if (encoder.embed_dim, depth, encoder.patch_size) != (weights.embed_dim, weights.depth, 16):
        raise PretrainedWeightsError(
            f"{weights.name} fits {', '.join(weights.encoders)} (width {weights.embed_dim}, {weights.depth} "
            f"blocks, 16-pixel patches); this encoder has width {encoder.embed_dim}, {depth} blocks and "
            f"{encoder.patch_size}-pixel patches"
        )


def _download(url: str, dst: Path, progress: bool, cache_path: Path) -> None:
    try:
        torch.hub.download_url_to_file(url, os.fspath(dst), progress=progress)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = err if isinstance(err, urllib.error.HTTPError) else getattr(err, "reason", None) or err
        raise PretrainedWeightsError(
            f"cannot download {url} ({reason}); offline? Download it elsewhere and pass the local file "
            f"(pretrained=/path/to/file), or copy it to {cache_path}"
        ) from err


def _verify(weights: PretrainedWeights, path: Path) -> None:
    """Size, SHA-256 (when published), then key layout and shapes: a strict load into the encoder built on
    the meta device (no memory, no initialisation)."""
    from seglstm.models.checkpoint import CheckpointMismatchError, load_pretrained
    from seglstm.models.registry import create_encoder

    where = f"{weights.url} (for {weights.name})"
    size = path.stat().st_size
    if weights.size is not None and size != weights.size:
        raise PretrainedWeightsError(f"{where}: got {size} bytes, expected {weights.size} (truncated download?)")
    if weights.sha256 is not None:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != weights.sha256:
            raise PretrainedWeightsError(
                f"{where}: SHA-256 {digest.hexdigest()} differs from the published {weights.sha256}"
            )
    with torch.device("meta"):
        encoder = create_encoder(weights.encoders[0], img_size=224)
    try:
        with warnings.catch_warnings():  # the final copy into meta tensors is the intended no-op
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter", category=UserWarning)
            load_pretrained(encoder, path, strict=True)
    except (CheckpointLoadError, CheckpointMismatchError, ValueError) as err:
        raise PretrainedWeightsError(f"{where}: not a usable {weights.name} checkpoint: {err}") from err


def fetch_weights(name: str, progress: bool = True, force: bool = False) -> Path:
    """The cached file of ``name``, downloaded and verified first if it is not in the cache yet."""
    from seglstm.utils.io import atomic_path

    weights = _lookup(name)
    path = weights.cache_path
    if path.is_file() and not force:
        return path
    url = weights.url
    print(f"downloading {url} to {path}", file=sys.stderr)
    # The file appears under its final name only after every check passed.
    with atomic_path(path) as tmp:
        _download(url, tmp, progress, path)
        try:
            _verify(weights, tmp)
        except PretrainedWeightsError as err:
            raise PretrainedWeightsError(
                f"{err}; nothing was cached: try again, or download the file by hand and pass its local path"
            ) from err
    return path


def _default_for(module: nn.Module | None) -> str:
    """The first listed name that fits ``module`` (for ``pretrained=True``)."""
    for name, weights in VIL_WEIGHTS.items() if module is not None else ():
        try:
            _check_fits(weights, module)
        except PretrainedWeightsError:
            continue
        return name
    raise PretrainedWeightsError(
        "pretrained=True: no published weights fit this model; name a checkpoint file instead "
        f"(the names, {', '.join(VIL_WEIGHTS)}, fit {', '.join(e for w in VIL_WEIGHTS.values() for e in w.encoders)})"
    )


def resolve_pretrained(spec: str | os.PathLike | bool, module: nn.Module | None = None) -> str:
    """A checkpoint path for ``spec``: an existing file as given, a weights name as its cached file.

    Args:
        spec: a local checkpoint or a name of ``VIL_WEIGHTS``; a file wins over a name. ``True`` takes the
            first name that fits ``module`` (``vil_s_in1k`` for ``vil_s``), as ``pretrained=True`` takes
            timm's default weights for the comparison models.
        module: the model the weights are for; checked to fit before anything is downloaded.
    """
    if spec is True:
        spec = _default_for(module)
    path = os.fspath(spec)
    if os.path.exists(path) or not is_weights_name(path):
        return path
    weights = _lookup(path)
    if module is not None:
        _check_fits(weights, module)
    return os.fspath(fetch_weights(path))


def cached_weights(name: str) -> Path | None:
    """The cached file of a Vision-LSTM name or of a timm pretrained name, or None when not cached."""
    if name in VIL_WEIGHTS:
        path = VIL_WEIGHTS[name].cache_path
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    for file_name in ("model.safetensors", "pytorch_model.bin"):  # the files timm asks the hub for
        found = try_to_load_from_cache(f"timm/{name}", file_name)
        if isinstance(found, str):
            return Path(found)
    return None
