"""Reading and writing image / mask files with checks that name the file and the problem.

Every reader checks the pixel count from the file header before decoding (a decompression-bomb guard with
a per-call cap instead of Pillow's process-wide one), turns decoder failures into :class:`DataError`, and
returns numpy arrays in the file's own dtype: images as ``H x W x C``, masks as ``H x W``.
"""

from __future__ import annotations

import glob
import os
import shutil
import stat
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from seglstm.utils.io import atomic_path, atomic_write_text
from seglstm.errors import SeglstmError

DEFAULT_MAX_PIXELS = 2**28
"""Largest ``height * width`` a reader decodes unless told otherwise (about 16k x 16k)."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
TIFF_SUFFIXES = (".tif", ".tiff")

# Pillow's bomb check reads a module-level limit; we lift it only while opening (header only) and apply
# our own cap instead, so the caller decides the limit and Pillow's global state is restored at once.
_PIL_OPEN_LOCK = threading.Lock()




class DataError(SeglstmError, ValueError):
    """A data file is missing, unreadable or inconsistent; the message starts with the file's path."""


def item_error(err: Exception, path: str | Path, index: int) -> Exception:
    """The exception to raise when loading item ``index`` (file ``path``) failed with ``err``.

    DataLoader workers re-raise only a message, so it must say which file and which index failed: a
    ``DataError`` keeps its type and gains the index; anything else becomes a ``DataError`` naming both.
    """
    if isinstance(err, DataError):
        err.args = (f"{err.args[0] if err.args else path} (item {index})", *err.args[1:])
        return err
    return DataError(f"{path}: item {index} failed to load: {type(err).__name__}: {err}")


class DatasetNotFoundError(SeglstmError, FileNotFoundError):
    """A dataset root or one of its required folders does not exist."""


def _check_pixels(path: Path, height: int, width: int, max_pixels: int | None) -> None:
    if max_pixels is not None and height * width > max_pixels:
        raise DataError(
            f"{path}: {width}x{height} = {height * width} pixels exceeds max_pixels={max_pixels} "
            "(decompression-bomb guard); raise max_pixels if you trust this file"
        )


def _open_pil(path: Path) -> Image.Image:
    with _PIL_OPEN_LOCK:
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return Image.open(path)
        except FileNotFoundError as err:
            raise DataError(f"{path}: file does not exist") from err
        except Exception as err:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
            raise DataError(f"{path}: not a readable image ({type(err).__name__}: {err})") from err
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _tiff_layout(path: Path) -> tuple[tuple[int, ...], str]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise DataError(f"{path}: TIFF holds no image")
            series = tif.series[0]
            return tuple(series.shape), series.axes
    except DataError:
        raise
    except FileNotFoundError as err:
        raise DataError(f"{path}: file does not exist") from err
    except Exception as err:
        raise DataError(f"{path}: not a readable TIFF ({type(err).__name__}: {err})") from err


def _yx_and_channel_axes(path: Path, shape: tuple[int, ...], axes: str) -> tuple[int, int, int | None]:
    """Positions of the Y, X and (at most one non-trivial) channel axes of a TIFF series."""
    if "Y" not in axes or "X" not in axes:
        raise DataError(f"{path}: TIFF axes {axes!r} have no Y/X plane")
    y, x = axes.index("Y"), axes.index("X")
    others = [i for i in range(len(axes)) if i not in (y, x) and shape[i] > 1]
    if len(others) > 1:
        raise DataError(
            f"{path}: TIFF with axes {axes!r} and shape {shape} is not a single (multi-band) image"
        )
    return y, x, (others[0] if others else None)


def image_size(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(height, width)`` from the file header, without decoding the pixels."""
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        shape, axes = _tiff_layout(path)
        y, x, _ = _yx_and_channel_axes(path, shape, axes)
        height, width = shape[y], shape[x]
    else:
        with _open_pil(path) as img:
            width, height = img.size
    _check_pixels(path, height, width, max_pixels)
    return height, width


def _read_tiff(path: Path, max_pixels: int | None) -> np.ndarray:
    import tifffile

    shape, axes = _tiff_layout(path)
    y, x, c = _yx_and_channel_axes(path, shape, axes)
    _check_pixels(path, shape[y], shape[x], max_pixels)
    try:
        with tifffile.TiffFile(path) as tif:
            data = tif.series[0].asarray()
    except Exception as err:  # truncated strips raise ValueError, bad compression streams zlib.error, ...
        raise DataError(f"{path}: corrupt or truncated TIFF ({type(err).__name__}: {err})") from err
    order = [y, x] + ([c] if c is not None else [])
    rest = [i for i in range(data.ndim) if i not in order]
    data = np.transpose(data, order + rest).reshape(shape[y], shape[x], -1)
    return np.ascontiguousarray(data)


_PIL_MODE_WORDS = {
    "1": "1-bit",
    "L": "grey",
    "LA": "grey+alpha",
    "P": "palette",
    "PA": "palette+alpha",
    "RGBA": "RGBA",
    "CMYK": "CMYK",
    "I": "32-bit integer grey",
    "I;16": "16-bit grey",
    "F": "float grey",
}


def _read_pil(path: Path, max_pixels: int | None) -> tuple[np.ndarray, str]:
    with _open_pil(path) as img:
        width, height = img.size
        _check_pixels(path, height, width, max_pixels)
        try:
            img.load()
        except Exception as err:  # truncated data raises OSError("image file is truncated ...")
            raise DataError(f"{path}: corrupt or truncated image ({type(err).__name__}: {err})") from err
        mode = img.mode
        data = np.asarray(img)
    if data.ndim == 2:
        data = data[:, :, None]
    return data, mode


def read_image(
    path: str | Path,
    channels: int | None = 3,
    bands: Sequence[int] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode an image to ``H x W x C`` in its own dtype.

    Args:
        path: PNG/JPEG/BMP/WebP (Pillow) or TIFF (tifffile, any number of bands).
        channels: required number of channels after band selection; ``None`` accepts any.
        bands: 0-based band indices to keep, in that order.
        max_pixels: largest ``height * width`` to decode; ``None`` disables the guard.
    """
    path = Path(path)
    mode = None
    if path.suffix.lower() in TIFF_SUFFIXES:
        data = _read_tiff(path, max_pixels)
    else:
        data, mode = _read_pil(path, max_pixels)
        if mode == "P":
            raise DataError(f"{path}: palette image where an RGB image is expected; save it as RGB")
    if bands is not None:
        bad = [b for b in bands if not 0 <= b < data.shape[2]]
        if bad:
            raise DataError(f"{path}: bands {bad} out of range for an image with {data.shape[2]} band(s)")
        data = data[:, :, list(bands)]
    if channels is not None and data.shape[2] != channels:
        what = f"{_PIL_MODE_WORDS.get(mode, mode)} image" if mode and bands is None else "image"
        raise DataError(
            f"{path}: expected {channels} channel(s), got a {data.shape[2]}-channel {what}"
            + (
                " (grey or RGBA where RGB is expected)"
                if channels == 3 and data.shape[2] in (1, 2, 4)
                else ""
            )
        )
    return data


def read_mask(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a single-channel label map (grey or palette PNG, or a 1-band TIFF) to ``H x W`` integers."""
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        data = _read_tiff(path, max_pixels)
        mode = None
    else:
        data, mode = _read_pil(path, max_pixels)
    if data.shape[2] != 1:
        kind = _PIL_MODE_WORDS.get(mode, mode) if mode else f"{data.shape[2]}-band"
        raise DataError(
            f"{path}: a label map must have one channel of class indices, got a {kind} image with "
            f"{data.shape[2]} channels (colour-coded labels need converting first, e.g. `seglstm convert`)"
        )
    data = data[:, :, 0]
    if not np.issubdtype(data.dtype, np.integer):
        raise DataError(f"{path}: label map has non-integer dtype {data.dtype}")
    return data


def write_png(path: str | Path, array: np.ndarray, compress_level: int = 6) -> None:
    """Write a ``H x W`` (grey) or ``H x W x 3`` (RGB) uint8 array as PNG, atomically."""
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(f"write_png({path}): need uint8 HxW or HxWx3, got {array.dtype} {array.shape}")
    img = Image.fromarray(array)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", compress_level=compress_level)


def list_files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    """Files directly in ``folder`` whose suffix (case-insensitive) is one of ``suffixes``, sorted by name.

    Raises:
        DataError: an entry with one of those suffixes cannot be read as a file (a dangling symlink, a
            symlink loop, a folder, no permission): reported rather than silently left out of the split.
    """
    wanted = {s.lower() for s in suffixes}
    files, bad = [], []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in wanted:
            continue
        problem = unreadable_entry(path)
        if problem:
            bad.append(problem)
        else:
            files.append(path)
    raise_unreadable(folder, bad)
    return files


def unreadable_entry(path: Path) -> str | None:
    """Why ``path`` cannot be read as a data file (a dangling symlink, a symlink loop, a folder, no read
    permission), or None when it can."""
    try:
        mode = path.stat().st_mode  # follows symlinks: a loop or a dangling link fails here
    except OSError as err:
        return f"{path}: {err.strerror or err}"
    if not stat.S_ISREG(mode):
        return f"{path}: not a regular file"
    if not os.access(path, os.R_OK):
        return f"{path}: no read permission"
    return None


def raise_unreadable(folder: Path, bad: list[str]) -> None:
    """One :class:`DataError` for the unreadable entries of ``folder`` (reported, never left out silently)."""
    if bad:
        raise DataError(
            f"{len(bad)} unreadable entr{'y' if len(bad) == 1 else 'ies'} in {folder}: {'; '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''}: fix or remove {'it' if len(bad) == 1 else 'them'}"
        )


INCOMPLETE_MARKER = ".seglstm-incomplete"


def mark_incomplete(folder: str | Path, command: str) -> Path:
    """Write the marker that says ``folder`` is a dataset still being written, and by which command (the
    writer removes it last, so a killed writer leaves it behind for :func:`check_complete` to report)."""
    marker = Path(folder) / INCOMPLETE_MARKER
    atomic_write_text(marker, command + "\n")
    return marker


def check_complete(root: str | Path) -> None:
    """Refuse a dataset whose writer (``synth``, ``convert``) stopped before the end, naming the command
    that completes it: its marker in ``root``, or only a staging folder beside a missing ``root``.

    Raises:
        DataError: naming the folder and the command.
    """
    root = Path(root)
    markers = [root / INCOMPLETE_MARKER]
    if not root.exists() and root.parent.is_dir():
        markers += sorted(root.parent.glob(f".{glob.escape(root.name)}.*/{INCOMPLETE_MARKER}"))
    for marker in markers:
        if marker.is_file():
            command = marker.read_text(encoding="utf-8", errors="replace").strip() or "the command that wrote it"
            where = root if marker.parent == root else f"{root} (only its staging folder {marker.parent} exists)"
            raise DataError(
                f"{where} is an incomplete dataset: its writer stopped before the end; complete it with `{command}`"
            )


def write_dataset(out: str | Path, build: Callable[[Path], Any], command: str, replace: bool = False) -> Path:
    """``build(out)`` in place when ``out`` already holds a dataset and ``replace`` is off (the writer keeps an
    up-to-date one and refuses a different one), else :func:`build_staged`; returns ``out``."""
    out = Path(out)
    if not replace and out.is_dir() and any(out.iterdir()):
        build(out)
        return out
    return build_staged(out, build, command)


def build_staged(out: str | Path, build: Callable[[Path], Any], command: str) -> Path:
    """Run ``build(folder)`` in a staging folder beside ``out`` and move the result into place only when it
    returns, so a kill leaves no half-written dataset at ``out`` (only the staging folder, whose marker
    :func:`check_complete` reports with ``command``, and which the next run replaces).

    ``out`` may be missing or empty; an existing dataset at ``out`` has its entries replaced one by one under
    the incomplete marker.
    """
    out = Path(out)
    staging = out.parent / f".{out.name}.staging"
    if staging.exists():
        shutil.rmtree(staging)  # a killed writer's
    staging.mkdir(parents=True)
    mark_incomplete(staging, command)
    built = staging / out.name
    build(built)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(built, out)
    else:
        marker = mark_incomplete(out, command)
        for entry in sorted(built.iterdir()):
            target = out / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
        marker.unlink()
    shutil.rmtree(staging)
    return out
