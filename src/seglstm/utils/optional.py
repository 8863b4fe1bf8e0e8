"""Optional dependencies: the package extras, imported only where a feature needs one.

``import seglstm``, training and scene inference on local GeoTIFFs need none of them. A feature that does
calls :func:`require`, which imports the package or raises :class:`MissingExtraError` whose message is the
one line to act on (``pip install 'seglstm[onnx]'``); the CLI prints it as the command's error.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from seglstm.errors import SeglstmError

__all__ = ["EXTRAS", "MissingExtraError", "available", "missing_extra_message", "require"]

# top-level import name -> the extra of pyproject.toml that installs it
EXTRAS: dict[str, str] = {
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "pystac": "stac",
    "mambapy": "mamba",
    "mamba_ssm": "mamba-cuda",
    "tensorboard": "tensorboard",
    "torchao": "bench",
}


class MissingExtraError(SeglstmError, ImportError):
    """An optional package is not installed; the message names the ``pip install`` that adds it."""

    exit_code = 2  # a usage problem, fixed by the install the message names


def _extra(module: str) -> tuple[str, str]:
    top = module.partition(".")[0]
    if top not in EXTRAS:
        raise KeyError(f"{top!r} is not an optional dependency of seglstm (known: {', '.join(EXTRAS)})")
    return top, EXTRAS[top]


def missing_extra_message(module: str, feature: str, why: str = "is not installed") -> str:
    """The one line telling a user that ``feature`` needs ``module`` and which extra installs it."""
    top, extra = _extra(module)
    return f"{feature} needs {top}, which {why}: pip install 'seglstm[{extra}]'"


def available(module: str) -> bool:
    """Whether ``module`` (an optional dependency) can be imported, without importing it."""
    top, _ = _extra(module)
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, feature: str) -> ModuleType:
    """``module`` imported, or :class:`MissingExtraError` naming the extra that ``feature`` needs.

    A package that is installed but does not import (one of its own dependencies missing) gets the same
    line with the import error added: installing the extra again is what fixes it.
    """
    _extra(module)
    try:
        return importlib.import_module(module)
    except ImportError as err:
        why = f"does not import ({err})" if available(module) else "is not installed"
        raise MissingExtraError(missing_extra_message(module, feature, why)) from err
