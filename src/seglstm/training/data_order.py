"""Exact data order across ``--ckpt_path last`` resumes, including mid-epoch ones.

Lightning restores the epoch and the batch counter of a resumed run but restarts the train DataLoader from
the first batch of the epoch, and with worker processes it draws the first indices before it tells the
sampler the epoch. :class:`ResumableDataLoader` fixes both without loading any skipped data:

- its iterator is created lazily, on the first ``next()``, i.e. after Lightning's ``set_epoch``;
- it counts the batches handed out in the current pass and exposes them through ``state_dict`` /
  ``load_state_dict`` (Lightning's stateful-loader protocol, stored in the checkpoint's loop state); after
  a load, the next pass skips that many batches at the index level (``BatchSampler`` indices only).

Its constructor is DataLoader's, so Lightning can rebuild it with a distributed sampler under DDP.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from torch.utils.data import DataLoader

from seglstm.data.datamodule import SegDataModule
from seglstm.training._lightning_compat import IndexSamplerHookLoader


class _SkipFirst:
    """Index sampler that drops the first ``loader._skip_now`` items of the passes it starts.

    The count is read from the loader on every ``iter()``: it is non-zero only while the resumed pass's
    iterator is being created (torch calls ``iter()`` on the index sampler more than once then, with worker
    processes), so later epochs, which reuse this object through persistent workers, are not cut.
    """

    def __init__(self, base: Iterable, loader: ResumableDataLoader) -> None:
        self.base, self.loader = base, loader

    def __iter__(self) -> Iterator:
        n = self.loader._skip_now
        return itertools.islice(iter(self.base), n, None) if n else iter(self.base)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]


class _LazyPass:
    """One pass over a :class:`ResumableDataLoader`, started on the first ``next()``."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self.loader = loader
        self.inner: Iterator | None = None

    def __iter__(self) -> _LazyPass:
        return self

    def __next__(self) -> Any:
        loader = self.loader
        if self.inner is None:
            skip, loader._pending_skip = loader._pending_skip, 0
            loader._skip_now = skip
            try:
                self.inner = DataLoader.__iter__(loader)
            finally:
                loader._skip_now = 0
            loader._batches_done = skip
        batch = next(self.inner)
        loader._batches_done += 1
        return batch

    def __len__(self) -> int:
        return len(self.loader)


class ResumableDataLoader(IndexSamplerHookLoader):
    """A ``DataLoader`` whose position inside an epoch survives a checkpoint round trip (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batches_done = 0
        self._pending_skip = 0
        self._skip_now = 0

    @classmethod
    def from_loader(cls, loader: DataLoader) -> ResumableDataLoader:
        """The same loading (dataset, sampler, batching, workers) as ``loader``, resumable."""
        if loader.batch_sampler is None:
            raise ValueError(
                "ResumableDataLoader needs a batched DataLoader (batch_size or batch_sampler set)"
            )
        kwargs: dict[str, Any] = {
            "num_workers": loader.num_workers,
            "collate_fn": loader.collate_fn,
            "pin_memory": loader.pin_memory,
            "timeout": loader.timeout,
            "worker_init_fn": loader.worker_init_fn,
            "generator": loader.generator,
            "persistent_workers": loader.persistent_workers,
        }
        if loader.num_workers > 0:
            kwargs["prefetch_factor"] = loader.prefetch_factor
            kwargs["multiprocessing_context"] = loader.multiprocessing_context
        if type(loader.batch_sampler).__name__ == "BatchSampler":
            kwargs.update(batch_size=loader.batch_size, sampler=loader.sampler, drop_last=loader.drop_last)
        else:
            kwargs["batch_sampler"] = loader.batch_sampler
        return cls(loader.dataset, **kwargs)

    def wrap_index_sampler(self, sampler: Any) -> Any:
        return _SkipFirst(sampler, self) if self._skip_now else sampler

    def __iter__(self) -> _LazyPass:  # type: ignore[override]
        return _LazyPass(self)

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": int(self._batches_done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        done = int(state.get("batches_done", 0))
        # A checkpoint taken on an epoch's last batch resumes at the start of the next epoch.
        self._pending_skip = done if 0 < done < len(self) else 0


class ResumableSegDataModule(SegDataModule):
    """``SegDataModule`` whose train loader is a :class:`ResumableDataLoader` (what ``seglstm fit`` uses)."""

    def train_dataloader(self) -> ResumableDataLoader:
        return ResumableDataLoader.from_loader(super().train_dataloader())
