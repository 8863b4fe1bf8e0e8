"""File helpers every subpackage shares: atomic writes and safe checkpoint loading."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from seglstm.errors import SeglstmError


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# What open() would give under the process umask; mkstemp's temporary files start as 0600, which would
# leave datasets and checkpoints unreadable to the rest of a group.
FILE_MODE = _file_mode()


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
        os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_layer_path(path: str | os.PathLike) -> Iterator[Path]:
    """:func:`atomic_path` for OGR writers, which check the suffix and may write sidecars (``-journal``,
    ``-wal``): a work file named ``<tmp><suffix>``, renamed over ``path`` on success, its leftovers removed."""
    final = Path(path)
    with atomic_path(final) as tmp:
        work = tmp.parent / (tmp.name + final.suffix)
        try:
            yield work
            if work.exists():
                os.replace(work, tmp)
        finally:
            for leftover in work.parent.glob(work.name + "*"):
                leftover.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``path`` holds ``text`` (UTF-8) or keeps its old content: never a half-written file (:func:`atomic_path`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


class CheckpointLoadError(SeglstmError, RuntimeError):
    """A checkpoint file cannot be loaded safely; the message names the file."""


class UnsafeCheckpointError(CheckpointLoadError):
    """A checkpoint needs arbitrary unpickling, which we refuse unless the user opts in."""


class CorruptCheckpointError(CheckpointLoadError):
    """A checkpoint file is truncated or not a torch checkpoint at all."""


class _PlainRecord:
    """Inert stand-in for a foreign class (mmengine's ``HistoryBuffer``) found in checkpoint metadata.

    The weights-only unpickler may create it and fill its ``__dict__``; it has no methods that run on load,
    so a file naming it can do nothing but leave data behind.
    """


def _numpy_safe_globals() -> list[Any]:
    """numpy scalars, dtypes and arrays as mmseg/mmengine checkpoints store them in ``meta``.

    Each is listed under its numpy 2 name and its numpy 1 name (``numpy.core``), since the pickle names the
    function as the writing numpy called it.
    """
    import numpy as np
    from numpy._core import multiarray as ma  # numpy >= 2 (the project's floor)

    out: list[Any] = [np.ndarray, np.dtype]
    for fn in (ma.scalar, ma._reconstruct):
        out += [(fn, f"numpy._core.multiarray.{fn.__name__}"), (fn, f"numpy.core.multiarray.{fn.__name__}")]
    out += [type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                                         np.uint32, np.uint64, np.float16, np.float32, np.float64, np.str_)]
    return out


def checkpoint_safe_globals() -> list[Any]:
    """What our loader adds to torch's weights-only allow-list: plain numpy data, and mmengine's message-hub
    ``HistoryBuffer`` read into an inert record (mmengine is not installed, so it could not load anyway)."""
    return [
        *_numpy_safe_globals(),
        (_PlainRecord, "mmengine.logging.history_buffer.HistoryBuffer"),
    ]


def verify_checkpoint_crcs(path: str | os.PathLike) -> None:
    """Check the CRC-32 of every member of a zip-format torch checkpoint (what ``torch.save`` writes since
    torch 1.6, ours and most foreign files alike).

    ``torch.load`` does not check them, so bytes damaged on disk or in a copy load silently as wrong weights.
    Reading the file once more costs about what loading it does. Files in torch's legacy (non-zip) format
    carry no checksum and pass unchecked.

    Raises:
        CorruptCheckpointError naming the file and the first damaged member.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CorruptCheckpointError(
            f"checkpoint {path} is damaged: its zip structure cannot be read ({err}); copy or download it again"
        ) from err
    if bad is not None:
        raise CorruptCheckpointError(
            f"checkpoint {path} is damaged: member {bad!r} fails its CRC-32 check (the file changed after it "
            "was written); copy or download it again"
        )


def torch_load(path: str | os.PathLike, unsafe: bool = False, map_location: Any = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``; arbitrary pickles need ``unsafe=True`` and warn.

    Checkpoints from the internet are untrusted: full unpickling runs whatever code the file names. The
    allow-list is torch's plus :func:`checkpoint_safe_globals` (numpy metadata of mmseg checkpoints).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        CorruptCheckpointError: the file is truncated, damaged (:func:`verify_checkpoint_crcs`) or not a
            torch checkpoint.
        UnsafeCheckpointError: the file names a global outside the allow-list; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a file")
    verify_checkpoint_crcs(path)
    if path.stat().st_size >= 4 and not _looks_like_torch_file(path):
        raise CorruptCheckpointError(f"{path} is not a torch checkpoint (neither a zip archive nor a pickle){_hint(path)}")
    if unsafe:
        warnings.warn(
            f"loading {path} with full unpickling (--unsafe-load): it can run arbitrary code", stacklevel=2
        )
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError,
                ImportError, TypeError, IndexError) as err:  # fmt: skip
            raise CorruptCheckpointError(_corrupt_message(path, err)) from err
    try:
        with torch.serialization.safe_globals(checkpoint_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        found = re.search(r"GLOBAL (\S+)", text)
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\n\n", text, re.S)
        if found:
            what = f"it names {found.group(1)}, which is not on the allow-list"
        elif detail:
            what = " ".join(detail.group(1).split())
        else:
            what = text.strip().splitlines()[0]
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it is not a plain tensor checkpoint ({what[:300]}). Loading it fully "
            "would run code from the file; if you trust its source, pass --unsafe-load."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as err:
        raise CorruptCheckpointError(_corrupt_message(path, err)) from err


def blocking_file(path: str | os.PathLike) -> Path | None:
    """The regular file among ``path``'s parents that stops it from being created (``out/x`` where ``out``
    is a file), or None."""
    return next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)


def _looks_like_torch_file(path: Path) -> bool:
    """A zip archive (torch >= 1.6) or a pickle stream (the legacy format starts with the PROTO opcode)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head[:2] == b"PK" or head[:1] == b"\x80"


def _hint(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return ": it is an ONNX model; `seglstm predict-scene` takes it with --onnx"
    if suffix in (".yaml", ".yml", ".json"):
        return ": it is a config file; pass it with --config and the checkpoint with --ckpt"
    return ""


def _corrupt_message(path: Path, err: BaseException) -> str:
    first = (str(err).splitlines() or [""])[0][:200]
    return (
        f"cannot read checkpoint {path} ({path.stat().st_size} bytes): truncated or not a torch checkpoint "
        f"({type(err).__name__}: {first})"
    )
