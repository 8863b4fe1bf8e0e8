"""File helpers every subpackage shares: atomic writes and safe checkpoint loading."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    A crash, a kill or an exception leaves either the old file or nothing under the final name, never a
    half-written one. The temporary name keeps the final suffix so that writers which infer the format from
    the extension (Pillow, rasterio, torch) behave the same.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{final.name}.", suffix=(final.suffix if suffix is None else suffix) + ".part", dir=final.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint needs arbitrary unpickling, which we refuse unless the user opts in."""


def torch_load(path: str | os.PathLike, unsafe: bool = False, map_location: Any = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``; arbitrary pickles need ``unsafe=True`` and warn."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a file")
    if unsafe:
        warnings.warn(
            f"loading {path} with full unpickling (--unsafe-load): it can run arbitrary code", stacklevel=2
        )
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError or RuntimeError depending on the payload
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it is not a plain tensor checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}). If you trust its source, pass --unsafe-load."
        ) from err
