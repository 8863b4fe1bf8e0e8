"""What training and inference both read: config composition and the checkpoint's metadata key.

Config composition: mmseg-style ``_base_`` for our LightningCLI YAML configs.
A config may start with ``_base_: [file, ...]`` (paths relative to the config's own folder). The bases are
composed in order, then the file's own keys on top, merged as mmengine merges its configs: mappings merge
key by key at every depth, so a file that sets only ``model.model_kwargs.img_size`` keeps the rest of its
base's ``model_kwargs``; lists and scalars are replaced whole. ``_delete_: true`` inside a mapping replaces
the base's mapping instead of merging into it (mmengine's ``_delete_=True``). A mapping naming another
``class_path`` than the base's is a different object and replaces it too (its ``init_args`` would not fit).
The CLI hands the composed mapping to jsonargparse, which validates it as usual (``--print_config`` shows
it); :func:`seglstm.inference.loading.load_segmentor` reads the same composition.

Checkpoint metadata: :data:`META_KEY` is where ``seglstm fit`` checkpoints, exported programs and ONNX
models record the data facts inference needs (classes, palette, normalisation, ``test_cfg``, the model).
This module imports neither torch nor the training stack, so inference can use it without them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from seglstm.errors import SeglstmError

BASE_KEY = "_base_"
META_KEY = "seglstm_meta"
"""Checkpoint key (and exported-model metadata name) of the data facts inference needs: written by
:class:`seglstm.training.task.SegmentationTask`, read by :func:`seglstm.inference.loading.load_segmentor`,
:mod:`seglstm.inference.export` and the ONNX scene backend."""


class ConfigError(SeglstmError, ValueError):
    """A config file cannot be read or composed; the message names the file."""


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML lets the last one win
    silently, so a setting edited in one place and left in another would be ignored)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (lines {seen[key]} and {line})", key_node.start_mark
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except yaml.constructor.ConstructorError as err:
        if "duplicate key" in str(err.problem):
            raise ConfigError(f"config file {path}: {err.problem}: keep one") from err
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping at the top level, got {type(data).__name__}"
        )
    return data


DELETE_KEY = "_delete_"


def _strip_delete(value: Any) -> Any:
    """``value`` without ``_delete_`` keys at any depth (a mapping that replaced its base keeps none)."""
    if isinstance(value, dict):
        return {k: _strip_delete(v) for k, v in value.items() if k != DELETE_KEY}
    if isinstance(value, list):
        return [_strip_delete(v) for v in value]
    return value


def merge_config(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, recursively for mappings (module docstring); neither input is modified."""
    out = dict(base)
    for key, value in update.items():
        if key == DELETE_KEY:
            continue
        if isinstance(value, dict) and not isinstance(value.get(DELETE_KEY, False), bool):
            raise ConfigError(f"{key}.{DELETE_KEY} must be true or false, got {value[DELETE_KEY]!r}")
        old = out.get(key)
        if (
            isinstance(value, dict)
            and isinstance(old, dict)
            and value.get(DELETE_KEY) is not True
            and value.get("class_path", old.get("class_path")) == old.get("class_path")
        ):
            out[key] = merge_config(old, value)
        else:
            out[key] = _strip_delete(value)
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


ALLOWED_CLASS_PATHS = (
    "seglstm.",
    "lightning.pytorch.callbacks.",
    "lightning.pytorch.loggers.",
    "lightning.pytorch.strategies.",
    "lightning.pytorch.plugins.",
    "lightning.pytorch.profilers.",
    "torch.optim.",
)
"""Modules a config's ``class_path`` may name without ``--allow-class-path``: jsonargparse imports the module
a class path names, so an unchecked config could run any installed module's top-level code."""


class ClassPathError(ConfigError):
    """A config names a class outside the allowed modules."""


def check_class_paths(
    config: Any, source: str, allowed: tuple[str, ...] = (), key: str = ""
) -> None:
    """Refuse any ``class_path`` (at any depth of ``config``) outside :data:`ALLOWED_CLASS_PATHS` + ``allowed``.

    A bare class name (no dot) is accepted: jsonargparse resolves it only among the subclasses already
    imported for that argument's type.

    Args:
        config: a parsed config (mappings, lists, scalars).
        source: the file or argument the config came from, for the message.
        allowed: extra module prefixes the user named with ``--allow-class-path``.
        key: the dotted key of ``config`` inside the whole config (for the message).
    Raises:
        ClassPathError naming the key, the value and the source.
    """
    prefixes = tuple(p if p.endswith(".") else p + "." for p in (*ALLOWED_CLASS_PATHS, *allowed))
    if isinstance(config, dict):
        for name, value in config.items():
            where = f"{key}.{name}" if key else str(name)
            if name == "class_path":
                if not isinstance(value, str):
                    raise ClassPathError(f"{source}: {where} must be a string, got {value!r}")
                if "." in value and not value.startswith(prefixes):
                    raise ClassPathError(
                        f"{source}: {where}={value!r} is outside the modules a config may load "
                        f"({', '.join(p.rstrip('.') for p in prefixes)}); if you trust it, pass "
                        f"--allow-class-path {value.rsplit('.', 1)[0]}"
                    )
            else:
                check_class_paths(value, source, allowed, where)
    elif isinstance(config, list):
        for i, value in enumerate(config):
            check_class_paths(value, source, allowed, f"{key}[{i}]")
