"""mmseg-style ``_base_`` composition for our LightningCLI YAML configs.

A config may start with ``_base_: [file, ...]`` (paths relative to the config's own folder). The bases are
composed in order, then the file's own keys on top. Merging follows what jsonargparse does when several
``--config`` files are given: inside the top-level groups (``model``, ``data``, ``trainer``) each argument is
replaced as a whole, so a ``model_kwargs`` dict or a ``trainer.callbacks`` list in a later file replaces the
earlier one rather than being merged into it. The CLI hands the composed mapping to jsonargparse, which
validates it as usual; :func:`seglstm.inference.loading.load_segmentor` reads the same composition.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

BASE_KEY = "_base_"


class ConfigError(ValueError):
    """A config file cannot be read or composed; the message names the file."""


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping at the top level, got {type(data).__name__}"
        )
    return data


def merge_config(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``: top-level mappings merge key by key, everything below is replaced."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def compose_config(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read ``path`` and everything its ``_base_`` list pulls in, recursively; cycles are an error."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"config {BASE_KEY} cycle: {chain}")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: {BASE_KEY} must be a file name or a list of file names, got {bases!r}")
    composed: dict[str, Any] = {}
    for base in bases:
        composed = merge_config(composed, compose_config(path.parent / base, (*_seen, path)))
    return merge_config(composed, data)


def has_bases(path: str | os.PathLike) -> bool:
    """Whether a config file uses ``_base_`` (and so must be composed before jsonargparse sees it)."""
    return BASE_KEY in _read_yaml(Path(path))
