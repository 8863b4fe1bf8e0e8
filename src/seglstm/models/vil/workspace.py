"""Scratch buffers that successive ViL layers of one CPU inference pass reuse (a fresh multi-megabyte tensor
costs a page fault per 4 KiB page on first touch)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch


class Workspace:
    """Scratch buffers that successive layers of one inference pass reuse.

    A fresh multi-megabyte tensor costs a page fault per 4 KiB page on first touch (about 1.5 us each on the
    benchmark VM): at 1024x1024 that was a quarter of a ViL block's time. Buffers taken from a workspace are
    valid until the same key is taken again, i.e. within one layer call.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, key: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffers[key] = like.new_empty(numel)
        return buf[:numel].view(shape)


_local = threading.local()


@contextlib.contextmanager
def workspace() -> Iterator[Workspace]:
    """Let ``scratch`` reuse buffers for the duration of the block (inference only; ignored under autograd)."""
    previous = getattr(_local, "workspace", None)
    _local.workspace = Workspace()
    try:
        yield _local.workspace
    finally:
        _local.workspace = previous


def scratch(key: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor: the active workspace's buffer for ``key`` when there is one and autograd is
    off, else a new one. ``key`` must be unique among the buffers alive at the same time."""
    ws = getattr(_local, "workspace", None)
    if ws is None or torch.is_grad_enabled():
        return like.new_empty(shape)
    return ws.take(key, tuple(shape), like)
