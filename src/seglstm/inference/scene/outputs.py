"""The partial run beside the output: chunk files, the progress sidecar and everything ``--resume`` decides.

A run flushes finished block rows of a strip into compressed chunk files and then records how far it got.
The final products are assembled from the chunks in one deterministic pass, so a resumed run gives the
same bytes as an uninterrupted one. All resume decisions (whether the saved state fits the arguments,
which batch to restart from, which windows are already accounted for, where a strip's buffer starts)
live here, in :class:`Progress` and :meth:`PartialRun.start`.
"""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from seglstm.inference.scene.errors import SceneError
from seglstm.inference.scene.plan import Strip, TileGrid
from seglstm.utils.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

FORMAT_VERSION = 2


@dataclass(frozen=True)
class Progress:
    """How far the chunks reach: the first window whose contribution is not flushed, its strip, and how
    many rows of that strip are in chunks."""

    next_tile: int = 0
    strip: int = 0
    rows_done: int = 0

    def first_batch(self, batch_size: int) -> int:
        """Batches are fixed groups of the global tile order, so a resumed run feeds the model exactly the
        batches an uninterrupted run does (results cannot depend on batch composition)."""
        return self.next_tile // batch_size * batch_size

    def accounted(self, tile_index: int) -> bool:
        """Whether the window's contribution is already in chunks (it is recomputed only for its batch)."""
        return tile_index < self.next_tile

    def buffer_start(self, strip: int) -> int:
        """First row a strip's blending buffer holds: what the chunks do not have yet."""
        return self.rows_done if strip == self.strip else 0

    @staticmethod
    def after_flush(grid: TileGrid, strips: list[Strip], strip: Strip, flushed_to: int) -> Progress:
        """The state once ``strip`` has rows ``[0, flushed_to)`` in chunks."""
        per_row = [len(s.cols) * len(grid.ys) for s in strips]
        first = sum(per_row[: strip.index])
        if flushed_to >= grid.height:
            return Progress(first + per_row[strip.index], strip.index + 1, 0)
        row = next(i for i, y in enumerate(grid.ys) if y + grid.tile_h > flushed_to)
        return Progress(first + row * len(strip.cols), strip.index, flushed_to)


class PartialRun:
    """The ``.NAME.partial`` folder beside an output: chunks plus ``progress.json``."""

    def __init__(self, output: Path, fingerprint: dict) -> None:
        self.dir = output.parent / f".{output.name}.partial"
        # stored as the sidecar will read it back (tuples -> lists), so comparisons are like for like
        self.fingerprint = json.loads(json.dumps({"format": FORMAT_VERSION, **fingerprint}))
        self.progress = Progress()

    @property
    def sidecar(self) -> Path:
        return self.dir / "progress.json"

    def start(self, resume: bool) -> Progress:
        """Discard a stale partial run, or (``resume``) load the saved progress after checking that it was
        made with the same arguments."""
        if not resume:
            if self.dir.exists():
                log.warning("discarding the partial run in %s (pass --resume to continue it)", self.dir)
                shutil.rmtree(self.dir)
        elif not self.sidecar.is_file():
            log.warning("nothing to resume in %s; starting from the first tile", self.dir)
        else:
            try:
                saved = json.loads(self.sidecar.read_text())
                old, self.progress = saved["fingerprint"], Progress(**saved["progress"])
            except (ValueError, KeyError, TypeError) as err:
                raise SceneError(
                    f"--resume: progress file {self.sidecar} is unreadable ({err}); rerun without --resume"
                ) from err
            new = self.fingerprint
            changed = sorted(k for k in new.keys() | old.keys() if new.get(k) != old.get(k))
            if changed:
                raise SceneError(
                    f"--resume: the partial run in {self.dir} was made with different {', '.join(changed)}; "
                    "rerun with the original arguments, or without --resume to start over"
                )
        return self.progress

    def chunk_path(self, band: int, strip: int) -> Path:
        return self.dir / f"b{band:06d}_s{strip:04d}.npz"

    def save_chunk(self, band: int, strip: int, classes: np.ndarray, probs: np.ndarray | None) -> None:
        """An ``.npz`` that ``np.load`` reads, deflated at level 1: savez_compressed's level 6 costs more
        time than the model on noisy probabilities, for little space."""
        self.dir.mkdir(exist_ok=True)
        arrays = {"classes": classes} if probs is None else {"classes": classes, "probs": probs}
        with atomic_path(self.chunk_path(band, strip)) as tmp, zipfile.ZipFile(
            tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1
        ) as zf:
            for name, array in arrays.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.ascontiguousarray(array), allow_pickle=False)

    def load_chunk(self, band: int, strip: int, with_probs: bool) -> tuple[np.ndarray, np.ndarray | None]:
        path = self.chunk_path(band, strip)
        try:
            with np.load(path) as chunk:
                return chunk["classes"], (chunk["probs"] if with_probs else None)
        except (OSError, KeyError, ValueError) as err:
            raise SceneError(
                f"partial run {self.dir}: chunk {path.name} is missing or damaged ({err}); rerun without --resume"
            ) from err

    def record(self, progress: Progress) -> None:
        """Save the progress after its chunks are on disk (each write is atomic)."""
        self.progress = progress
        atomic_write_text(self.sidecar, json.dumps({"fingerprint": self.fingerprint, "progress": asdict(progress)}))

    def scratch(self, name: str) -> Path:
        """A path inside the partial run for intermediate files (removed with it)."""
        self.dir.mkdir(exist_ok=True)
        return self.dir / name

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
