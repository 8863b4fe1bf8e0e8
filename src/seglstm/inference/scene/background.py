"""The two threads beside the model: one reads the next batches' windows while the model runs, one
compresses and writes finished chunks. GDAL reads and zlib release the GIL, so both overlap the forward.

Both talk to the caller through bounded queues (``depth`` items), so memory stays bounded however far the
disk or the model falls behind. An exception in either thread reaches the caller at its next hand-over (and
at the latest on leaving the ``with`` block); leaving the block for any reason (an error, Ctrl-C) stops the
reader and lets the writer finish the jobs it was already given, so what is on disk stays consistent.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_POLL_S = 0.1  # how often a blocked hand-over checks whether the other side has stopped
_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher(Generic[T]):
    """Runs ``produce()`` (a generator) in a thread, ``depth`` items ahead of the caller's iteration.

    ``busy_s`` is the time the thread spent producing (not waiting for room in the queue)."""

    def __init__(self, produce: Callable[[], Iterator[T]], depth: int = 2, name: str = "scene-reader") -> None:
        self._produce, self._queue = produce, queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.busy_s = 0.0

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            items = self._produce()
            while True:
                t0 = time.perf_counter()
                item = next(items, _DONE)
                self.busy_s += time.perf_counter() - t0
                if not self._put(item) or item is _DONE:
                    return
        except BaseException as err:  # handed to the caller, who re-raises it
            self._put(_Failure(err))

    def __enter__(self) -> Prefetcher[T]:
        self._thread.start()
        return self

    def __iter__(self) -> Iterator[T]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        while self._thread.is_alive():  # empty the queue so that a blocked put sees the stop
            try:
                self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                pass
        self._thread.join()


class Writer:
    """Runs submitted jobs (callables) one at a time, in order, in a thread.

    ``busy_s`` is the time the thread spent in jobs; ``wait_s`` the time the caller spent in ``submit``
    waiting for room in the queue (not the wait for the last jobs on leaving the block)."""

    def __init__(self, depth: int = 2, name: str = "scene-writer") -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.busy_s = self.wait_s = 0.0

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is _DONE:
                return
            if self._error is not None:
                continue  # after a failure, later jobs (which depend on it) are dropped
            t0 = time.perf_counter()
            try:
                job()
            except BaseException as err:
                self._error = err
            self.busy_s += time.perf_counter() - t0

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _put(self, item: object) -> None:
        while True:
            if item is not _DONE:
                self._raise()
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def submit(self, job: Callable[[], object]) -> None:
        """Queue ``job``; raises the error of an earlier job instead."""
        t0 = time.perf_counter()
        try:
            self._put(job)
        finally:
            self.wait_s += time.perf_counter() - t0

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._put(_DONE)  # the thread finishes the queued jobs (each leaves the disk consistent) and stops
        self._thread.join()
        if exc is None:
            self._raise()
