"""Scratch buffers of the ViL layer's CPU inference path: named fields, allocated once per input geometry.

A fresh multi-megabyte tensor costs a page fault per 4 KiB page on first touch (about 1.5 us each on the
benchmark VM: at 1024x1024 that was a quarter of a ViL block's time), so CPU inference writes every
intermediate of a layer call into a ``LayerBuffers`` object instead. ``VisionLSTM`` opens a ``workspace()``
for each inference pass: its layers all have the same geometry, so the first layer call allocates one
``LayerBuffers`` and every later layer of the pass reuses it. Outside a workspace each layer call allocates
its own (the result is then the caller's to keep).

Rules, checked: a layer claims the buffers for the duration of its call (``claim``), so a second claim
before the first ends (a re-entrant call, another layer inside it) raises; a claim for another geometry
(shape, dtype or device) raises. A layer's result may live in its buffers: it stays valid until the next
layer call of the same workspace, which is how ``ViLBlock.forward`` consumes it (the residual add).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator

import torch


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What a layer call's buffers depend on. ``tokens``: the input's tokens, ``seq``: after padding to a
    multiple of the chunk; ``chunk``: the
    chunk length of the chunkwise cell (0 when another cell runs); ``act``: dtype of the activations outside
    the cell (the autocast dtype under CPU autocast, else ``dtype``)."""

    batch: int
    tokens: int
    seq: int
    dim: int
    inner: int
    heads: int
    chunk: int
    dtype: torch.dtype
    act: torch.dtype
    device: torch.device


@dataclasses.dataclass
class CellBuffers:
    """Buffers of the chunkwise cell's CPU inference (``seglstm.models.vil.mlstm``), B batch, NH heads, D the
    query/key head dim, Dv1 the value head dim plus the row of ones, NC chunks of L tokens."""

    log_d: torch.Tensor  # (B, NH, NC, L, L) log weights, then the intra-chunk weights Dmat
    qk: torch.Tensor  # (B, NH, NC, L, L) scores Q^T K, then P = (Q^T K) * Dmat
    kg: torch.Tensor  # (B, NH, D, S) keys times their weight in the chunk's state
    qs: torch.Tensor  # (B, NH, D, S) queries times their inter-chunk weight
    states: torch.Tensor  # (B, NH, NC, Dv1, D) each chunk's state, then the states entering the chunks
    out: torch.Tensor  # (B, NH, NC, Dv1, L) numerator rows and the denominator row

    @staticmethod
    def shapes(batch: int, heads: int, d: int, dv1: int, chunks: int, length: int) -> dict[str, tuple[int, ...]]:
        """Each field's shape."""
        seq = chunks * length
        return dict(
            log_d=(batch, heads, chunks, length, length),
            qk=(batch, heads, chunks, length, length),
            kg=(batch, heads, d, seq),
            qs=(batch, heads, d, seq),
            states=(batch, heads, chunks, dv1, d),
            out=(batch, heads, chunks, dv1, length),
        )

    @classmethod
    def allocate(
        cls, batch: int, heads: int, d: int, dv1: int, chunks: int, length: int, like: torch.Tensor
    ) -> CellBuffers:
        return cls(**{k: like.new_empty(v) for k, v in cls.shapes(batch, heads, d, dv1, chunks, length).items()})

    def check(self, batch: int, heads: int, d: int, dv1: int, chunks: int, length: int, like: torch.Tensor) -> None:
        """Raise unless every field has the shape, dtype and device a call on operands like ``like`` needs."""
        for name, shape in self.shapes(batch, heads, d, dv1, chunks, length).items():
            t = getattr(self, name)
            if t.shape != shape or t.dtype != like.dtype or t.device != like.device:
                raise ValueError(
                    f"cell buffer {name} is {tuple(t.shape)} {t.dtype} on {t.device}, the call needs {shape} "
                    f"{like.dtype} on {like.device}: allocate the buffers for this call's shapes"
                )


@dataclasses.dataclass
class LayerBuffers:
    """Every intermediate of one ViL layer call on CPU without autograd (``seglstm.models.vil.fused``), for one
    ``Geometry`` (B batch, S padded tokens, d width, e inner width, NH heads of DH). Fields only one
    configuration uses are None otherwise (``x_act``, ``x_m``: autocast; ``cell``: the chunkwise cell)."""

    geometry: Geometry
    flip_in: torch.Tensor  # (B, T, d) the input in scan order (reverse layers; T tokens before padding)
    x_act: torch.Tensor | None  # (B, S, d) the input in the autocast dtype
    up: torch.Tensor  # (B, 2e, S) proj_up's output [x_m; z], act dtype
    x_m: torch.Tensor | None  # (B, e, S) x_m in the cell's dtype (autocast)
    conv: torch.Tensor  # (B, e, S) causal conv, then a = silu(conv)
    q: torch.Tensor  # (B, e, S) queries (parallel, recurrent and Triton cells)
    k: torch.Tensor  # (B, e, S) keys (chunkwise: the folded keys)
    v: torch.Tensor  # (B, e, S) values (parallel, recurrent and Triton cells)
    v1: torch.Tensor  # (B, NH, DH + 1, S) values with a row of ones (chunkwise)
    h: torch.Tensor  # (B, e, S) the gated, normalised cell output, act dtype
    down: torch.Tensor  # (B, S, d) proj_down's output, act dtype
    out: torch.Tensor  # (B, S, d) the output in the input's dtype (autocast)
    flip_out: torch.Tensor  # (B, T, d) the output in image order (reverse layers)
    cell: CellBuffers | None
    _in_use: bool = dataclasses.field(default=False, repr=False)

    @classmethod
    def allocate(cls, g: Geometry) -> LayerBuffers:
        """All buffers at once (untouched pages of an unused field cost no memory)."""

        def new(*shape: int, dtype: torch.dtype = g.dtype) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, device=g.device)

        b, s, d, e, nh = g.batch, g.seq, g.dim, g.inner, g.heads
        amp = g.act != g.dtype
        cell = None
        if g.chunk:
            cell = CellBuffers.allocate(b, nh, e // nh, e // nh + 1, s // g.chunk, g.chunk, new(0))
        return cls(
            geometry=g,
            flip_in=new(b, g.tokens, d),
            x_act=new(b, s, d, dtype=g.act) if amp else None,
            up=new(b, 2 * e, s, dtype=g.act),
            x_m=new(b, e, s) if amp else None,
            conv=new(b, e, s),
            q=new(b, e, s),
            k=new(b, e, s),
            v=new(b, e, s),
            v1=new(b, nh, e // nh + 1, s),
            h=new(b, e, s, dtype=g.act),
            down=new(b, s, d, dtype=g.act),
            out=new(b, s, d),
            flip_out=new(b, g.tokens, d),
            cell=cell,
        )

    @contextlib.contextmanager
    def claim(self, geometry: Geometry) -> Iterator[LayerBuffers]:
        """The buffers for one layer call of ``geometry``; raises if they are for another geometry or
        already claimed (a layer call inside another one on the same buffers would overwrite its data)."""
        if geometry != self.geometry:
            raise ValueError(f"layer buffers allocated for {self.geometry} cannot serve a call with {geometry}")
        if self._in_use:
            raise RuntimeError(
                "layer buffers already in use: a ViL layer call started inside another one on the same buffers "
                "(call layers one after another, or each in its own workspace())"
            )
        self._in_use = True
        try:
            yield self
        finally:
            self._in_use = False


class Workspace:
    """The ``LayerBuffers`` that the layers of one inference pass share, one per geometry."""

    def __init__(self) -> None:
        self._buffers: dict[Geometry, LayerBuffers] = {}

    def buffers(self, geometry: Geometry) -> LayerBuffers:
        if geometry not in self._buffers:
            self._buffers[geometry] = LayerBuffers.allocate(geometry)
        return self._buffers[geometry]


_local = threading.local()


@contextlib.contextmanager
def workspace() -> Iterator[Workspace]:
    """Let the ViL layers called in this thread share buffers for the duration of the block (inference only;
    ignored under autograd)."""
    previous = getattr(_local, "workspace", None)
    _local.workspace = Workspace()
    try:
        yield _local.workspace
    finally:
        _local.workspace = previous


def layer_buffers(geometry: Geometry) -> LayerBuffers:
    """The active workspace's buffers for ``geometry``, or new ones outside a workspace."""
    ws = getattr(_local, "workspace", None)
    return LayerBuffers.allocate(geometry) if ws is None else ws.buffers(geometry)
