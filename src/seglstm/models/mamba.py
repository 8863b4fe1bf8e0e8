"""A VMamba-like encoder (state-space comparison model) and the selective scan it runs on.

The encoder follows VMamba's original (v0) design, which the 2024 remote-sensing Mamba segmenters build on: a
stride-4 patch embedding, four stages of VSS blocks whose SS2D mixer scans the token grid in four directions
(row-major, column-major and both reversed) and sums the four results, and Swin-style patch merging between
stages, giving maps at 1/4, 1/8, 1/16 and 1/32.

``selective_scan`` has the signature and semantics of ``mamba_ssm``'s ``selective_scan_fn``. It uses that CUDA
kernel when the package imports (``pip install 'seglstm[mamba-cuda]'``, needs a CUDA toolkit) and the tensors
live on a GPU. Otherwise it runs a chunked scan in plain PyTorch: the sequence is cut into chunks of
``chunk_size`` steps, each chunk's (B, chunk, D, N) states are computed (by a sequential recurrence on CPUs, by
the parallel (Blelloch) scan of the ``mambapy`` package on GPUs, ``pip install 'seglstm[mamba]'``), and only the
(B, D, N) state at the chunk's end is carried to the next one. When gradients are needed every chunk
runs under ``torch.utils.checkpoint``, so the backward pass recomputes a chunk's states instead of keeping
them. Memory then grows with L * D (inputs, outputs, one state per chunk) rather than with L * D * N.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from seglstm.models.registry import register_encoder
from seglstm.utils.optional import missing_extra_message, require

__all__ = [  # and MAMBA_SSM_AVAILABLE, computed on first use (module __getattr__)
    "SS2D",
    "VMamba",
    "VSSBlock",
    "cross_merge",
    "cross_scan",
    "selective_scan",
]

ScanBackend = Literal["auto", "mamba_ssm", "pscan"]
ChunkSize = int | Literal["auto"] | None
# "auto" chunks hold this many bytes of states (B, chunk, D, N): large enough that the allocator returns
# their memory to the system between chunks (glibc maps blocks over 32 MiB on their own; smaller ones
# fragment its heap, which then grows with every chunk) and that the Python loop costs little, small
# enough that a chunk's working set stays a few hundred MiB (benchmarks/NOTES.md, "Mamba chunked selective
# scan").
AUTO_CHUNK_BYTES = 64 * 2**20

log = logging.getLogger(__name__)
_logged_choices: set[str] = set()


@functools.cache
def _mamba_ssm_scan_fn():
    """The fused CUDA kernel, imported on first use; it only builds against a CUDA toolkit, so CPU installs
    go without it (None)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


def __getattr__(name: str) -> Any:
    if name == "MAMBA_SSM_AVAILABLE":  # computed on first use: importing mamba_ssm loads its CUDA extension
        return _mamba_ssm_scan_fn() is not None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _log_choice_once(key: str, level: int, message: str) -> None:
    """Say once per process which scan runs: the PyTorch fallback is far slower than the CUDA kernel."""
    if key not in _logged_choices:
        _logged_choices.add(key)
        log.log(level, message)


def _group_view(m: torch.Tensor, name: str, batch: int, dim: int, length: int, groups: int) -> torch.Tensor:
    """View a B or C input as (B|1, L|1, G|1, D/G|1, N), broadcastable against the (B, L, G, D/G, N) states."""
    if m.dim() == 2:  # (D, N): time-invariant, one row per channel
        if m.shape[0] != dim:
            raise ValueError(f"selective_scan: {name} of shape {tuple(m.shape)} must be (D={dim}, N)")
        return m.reshape(1, 1, groups, dim // groups, m.shape[-1])
    if m.dim() in (3, 4) and m.shape[0] == batch and m.shape[-1] == length:
        if m.dim() == 3:  # (B, N, L): shared by all channels
            return m.permute(0, 2, 1)[:, :, None, None, :]
        return m.permute(0, 3, 1, 2).unsqueeze(3)  # (B, G, N, L) -> (B, L, G, 1, N)
    raise ValueError(
        f"selective_scan: {name} of shape {tuple(m.shape)} must be (D={dim}, N), (B={batch}, N, L={length}) or "
        f"(B, G, N, L) with G dividing D"
    )


class _SequentialRecurrence(torch.autograd.Function):
    """``h_t = a_t * h_{t-1} + x_t`` over (T, ...) tensors, one fused multiply-add per step.

    On a CPU this is far faster than a parallel scan (one pass over the data instead of 2 log2(T) strided
    ones, benchmarks/NOTES.md, "Mamba chunked selective scan"). The backward pass is the same recurrence run in
    reverse: ``g_t = dL/dh_t + a_{t+1} g_{t+1}``, so ``dL/dx_t = g_t``, ``dL/da_t = g_t h_{t-1}`` and
    ``dL/dh_0 = a_1 g_1``.
    """

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
        h = torch.empty_like(x)
        if h0 is None:
            h[0] = x[0]
        else:
            torch.addcmul(x[0], a[0], h0, out=h[0])
        for t in range(1, x.shape[0]):
            torch.addcmul(x[t], a[t], h[t - 1], out=h[t])
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        a, h, h0 = ctx.saved_tensors
        g = torch.empty_like(grad_h)
        g[-1] = grad_h[-1]
        for t in range(g.shape[0] - 2, -1, -1):
            torch.addcmul(grad_h[t], a[t + 1], g[t + 1], out=g[t])
        grad_a = torch.empty_like(a)
        torch.mul(g[1:], h[:-1], out=grad_a[1:])
        if h0 is None:
            grad_a[0] = 0
        else:
            torch.mul(g[0], h0, out=grad_a[0])
        return grad_a, g, None if h0 is None else a[0] * g[0]


def _parallel_in_chunk(device: torch.device) -> bool:
    """Within a chunk, mambapy's parallel scan on GPUs (few, large kernels) and the sequential recurrence on
    CPUs (one pass over memory)."""
    return device.type == "cuda"


def _scan_chunk(
    h0: torch.Tensor | None,
    u: torch.Tensor,
    delta: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    z: torch.Tensor | None,
    A: torch.Tensor,
    D: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of the scan from state ``h0`` (None = zeros): u, delta, z (b, D, T) -> y (T, b, D), h_T (b, D, N).

    Everything elementwise happens here too (delta's bias and softplus, the D skip, the z gate), so that
    under recomputation only the chunk's inputs and outputs are kept, and the chunk's (T, b, D, N) states
    exist only inside this call.
    """
    b, d, length = u.shape
    u = u.permute(2, 0, 1).contiguous()  # (T, b, D): one step is a contiguous slab
    delta = delta.permute(2, 0, 1).contiguous()
    if delta_bias is not None:
        delta = delta + delta_bias
    if delta_softplus:
        delta = F.softplus(delta)
    Bv = _group_view(B, "B", b, d, length, groups).transpose(0, 1)  # (T|1, b|1, G|1, D/G|1, N)
    Cv = _group_view(C, "C", b, d, length, groups).transpose(0, 1)
    dA = torch.exp(delta.unsqueeze(-1) * A)  # (T, b, D, N)
    du = (delta * u).unflatten(-1, (groups, d // groups)).unsqueeze(-1)  # (T, b, G, D/G, 1)
    dBu = (du * Bv).flatten(2, 3)  # (T, b, D, N)
    if _parallel_in_chunk(u.device):
        if h0 is not None:  # fold the carried state into the first step: h_1 = dA_1 h_0 + dBu_1
            dBu[0] += dA[0] * h0
        pscan = require("mambapy.pscan", "the Mamba model's parallel scan on a GPU").pscan
        h = pscan(dA.transpose(0, 1), dBu.transpose(0, 1)).transpose(0, 1)  # pscan works on (b, T, D, N)
    else:
        h = _SequentialRecurrence.apply(dA, dBu, h0)
    y = (h.unflatten(2, (groups, d // groups)) * Cv).sum(-1).flatten(2)  # (T, b, D)
    if D is not None:
        y = y + D * u
    if z is not None:
        y = y * F.silu(z.permute(2, 0, 1))
    return y, h[-1].clone()  # a copy: a view would keep the chunk's (T, b, D, N) states alive


def auto_chunk_size(u: torch.Tensor, d_state: int) -> int:
    """Steps per chunk whose (B, chunk, D, N) states take about ``AUTO_CHUNK_BYTES``: a power of two >= 16."""
    b, d, _ = u.shape
    per_step = b * d * d_state * torch.promote_types(u.dtype, torch.float32).itemsize
    return max(16, 2 ** int(math.log2(max(AUTO_CHUNK_BYTES // per_step, 1))))


def _chunked_selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    chunk_size: ChunkSize,
) -> torch.Tensor:
    """The PyTorch selective scan, chunk by chunk along L (see the module docstring)."""
    b, d, length = u.shape
    group_counts = {int(t.shape[1]) for t in (B, C) if t.dim() == 4}
    if len(group_counts) > 1 or any(d % g for g in group_counts):
        raise ValueError(
            f"selective_scan: grouped B and C need the same group count dividing D={d}, got {sorted(group_counts)}"
        )
    g = group_counts.pop() if group_counts else 1
    for name, m in (("B", B), ("C", C)):  # full-length check here, as the chunks only see slices
        _group_view(m, name, b, d, length, g)
    step = length if chunk_size is None else auto_chunk_size(u, A.shape[1]) if chunk_size == "auto" else chunk_size
    step = min(step, length)
    # Recomputing in the backward pass only saves memory when there is more than one chunk.
    recompute = step < length and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias)
    )
    # Chunks are views along L. split, not indexing: its backward concatenates the chunks' gradients once,
    # where each slice's backward would add a zero-filled full-length gradient.
    n_chunks = -(-length // step)
    u_chunks, delta_chunks, B_chunks, C_chunks, z_chunks = (
        (m,) * n_chunks if m is None or m.dim() == 2 else m.split(step, dim=-1) for m in (u, delta, B, C, z)
    )
    h: torch.Tensor | None = None
    ys = []
    for args in zip(u_chunks, delta_chunks, B_chunks, C_chunks, z_chunks):
        args = (h, *args, A, D, delta_bias, delta_softplus, g)
        if recompute:
            y, h = checkpoint(_scan_chunk, *args, use_reentrant=False)
        else:
            y, h = _scan_chunk(*args)
        ys.append(y)
    return torch.cat(ys).permute(1, 2, 0)  # (b, D, L), channels stride 1


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    backend: ScanBackend = "auto",
    chunk_size: ChunkSize = "auto",
) -> torch.Tensor:
    """Mamba's selective scan, ``mamba_ssm.selective_scan_fn`` semantics.

    With dt = softplus(delta + delta_bias) (softplus only if ``delta_softplus``), per channel d and state n:
    ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t``, ``y_t = C_t . h_t + D u_t``, then ``y * silu(z)``.

    Args:
        u, delta, z: (B, D, L).
        A: (D, N), real (negative for a stable scan).
        B, C: (D, N) time-invariant, (B, N, L) shared by all channels, or (B, G, N, L) with G groups of D/G
            consecutive channels (VMamba's four directions are four groups).
        D, delta_bias: (D,).
        delta_softplus: apply softplus to ``delta + delta_bias``. True by default, as every Mamba block uses it
            (``mamba_ssm`` defaults to False).
        backend: ``"auto"`` picks ``mamba_ssm`` for CUDA tensors when it imports and the chunked PyTorch scan
            otherwise; ``"mamba_ssm"`` or ``"pscan"`` force one.
            The choice is logged once per process.
        chunk_size: steps per chunk of the PyTorch scan; ``"auto"`` sizes chunks by ``AUTO_CHUNK_BYTES``, None
            scans the whole sequence at once (the (B, L, D, N) states in memory, no recomputation). Ignored
            by ``mamba_ssm``.

    Returns:
        y: (B, D, L) in ``u``'s dtype. The PyTorch path computes in float32 at least (float64 stays float64).
    """
    if backend not in ("auto", "mamba_ssm", "pscan"):
        raise ValueError(f"selective_scan: backend must be 'auto', 'mamba_ssm' or 'pscan', got {backend!r}")
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(
            f"selective_scan: u and delta must both be (B, D, L), got {tuple(u.shape)} and {tuple(delta.shape)}"
        )
    d = u.shape[1]
    if A.dim() != 2 or A.shape[0] != d or A.is_complex():
        raise ValueError(
            f"selective_scan: A must be a real (D={d}, N) tensor, got {tuple(A.shape)} {A.dtype}"
        )
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (d,):
            raise ValueError(f"selective_scan: {name} must be ({d},), got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must match u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    if chunk_size not in (None, "auto") and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(f"selective_scan: chunk_size must be a positive integer, 'auto' or None, got {chunk_size!r}")

    kernel = _mamba_ssm_scan_fn() if backend == "mamba_ssm" or u.is_cuda else None
    use_kernel = backend == "mamba_ssm" or (backend == "auto" and kernel is not None and u.is_cuda)
    if use_kernel:
        if kernel is None:
            raise RuntimeError(
                "selective_scan: " + missing_extra_message("mamba_ssm", "backend='mamba_ssm'", "does not import")
                + " (on a machine with a CUDA toolkit)"
            )
        if not u.is_cuda:
            raise RuntimeError("selective_scan: the mamba_ssm kernel needs CUDA tensors")
        _log_choice_once("mamba_ssm", logging.INFO, "selective_scan: mamba_ssm's fused CUDA kernel")
        return kernel(
            u.contiguous(),
            delta.contiguous(),
            A.contiguous(),
            B.contiguous(),
            C.contiguous(),
            None if D is None else D.float(),
            None if z is None else z.contiguous(),
            None if delta_bias is None else delta_bias.float(),
            delta_softplus,
        )

    if u.is_cuda and kernel is None:
        _log_choice_once(
            "pscan-cuda",
            logging.WARNING,
            "selective_scan: mamba_ssm is not installed, so Mamba models run the chunked PyTorch scan on the GPU, "
            "several times slower than the fused kernel (pip install 'seglstm[mamba-cuda]')",
        )
    else:
        _log_choice_once(
            f"pscan-{u.device.type}",
            logging.INFO,
            f"selective_scan: chunked PyTorch scan on {u.device.type}, chunks of {chunk_size or 'all'} steps"
            + (f" (about {AUTO_CHUNK_BYTES // 2**20} MiB of states each)" if chunk_size == "auto" else ""),
        )
    dtype = torch.promote_types(u.dtype, torch.float32)
    y = _chunked_selective_scan(
        *(t.to(dtype) for t in (u, delta, A, B, C)),
        *(None if t is None else t.to(dtype) for t in (D, z, delta_bias)),
        delta_softplus,
        chunk_size,
    )
    return y.to(u.dtype)


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """Unfold a (B, C, H, W) map into the four SS2D sequences (B, 4, C, H*W).

    Order: row-major, column-major, reversed row-major, reversed column-major.
    """
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)


def cross_merge(ys: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Put the four scanned sequences (B, 4, C, H*W) back in row-major order and sum them -> (B, C, H*W)."""
    rows = ys[:, 0] + ys[:, 2].flip(-1)
    cols = ys[:, 1] + ys[:, 3].flip(-1)
    cols = cols.unflatten(-1, (width, height)).transpose(2, 3).flatten(2)
    return rows + cols


class SS2D(nn.Module):
    """2-D selective scan mixer: VMamba's replacement for attention, linear in the number of tokens.

    Args:
        dim: token channels.
        d_state: SSM state size N per channel.
        ssm_ratio: inner width ``d_inner = ssm_ratio * dim``.
        dt_rank: rank of the low-rank delta projection; ``"auto"`` = ceil(dim / 16).
        d_conv: depthwise conv kernel applied before the scan.
        dt_min, dt_max, dt_init_floor, dt_scale: Mamba's initialisation of the step size.
        scan_backend, scan_chunk_size: ``backend`` and ``chunk_size`` of ``selective_scan``.
    """

    num_directions = 4

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        dt_rank: int | Literal["auto"] = "auto",
        d_conv: int = 3,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        scan_backend: ScanBackend = "auto",
        scan_chunk_size: ChunkSize = "auto",
    ) -> None:
        super().__init__()
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"SS2D: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if d_conv % 2 != 1:
            raise ValueError(f"SS2D: d_conv must be odd so the conv keeps the grid size, got {d_conv}")
        k = self.num_directions
        self.d_inner = d_inner = int(ssm_ratio * dim)
        self.d_state = d_state
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan_backend = scan_backend
        self.scan_chunk_size = scan_chunk_size

        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=d_conv // 2, groups=d_inner, bias=True)
        # One x -> (dt, B, C) projection, one dt projection and one set of SSM parameters per direction.
        self.x_proj_weight = nn.Parameter(torch.empty(k, self.dt_rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, self.dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner))
        self.A_logs = nn.Parameter(torch.empty(k * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(k * d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        self._dt_init = (dt_min, dt_max, dt_init_floor, dt_scale)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's state-space initialisation (kept out of the generic trunc-normal init of the encoder)."""
        dt_min, dt_max, floor, dt_scale = self._dt_init
        # x_proj: nn.Linear's default bound, as VMamba builds these from Linear layers.
        bound = 1.0 / math.sqrt(self.d_inner)
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        std = self.dt_rank**-0.5 * dt_scale
        nn.init.uniform_(self.dt_projs_weight, -std, std)
        # dt log-uniform in [dt_min, dt_max]; store its inverse softplus so softplus(bias) = dt at init.
        log_dt = torch.rand_like(self.dt_projs_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(
            dt_min
        )
        dt = log_dt.exp().clamp(min=floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real: A_n = -n for n = 1..N in every channel, stored as log so A stays negative.
        n = torch.arange(1, self.d_state + 1, dtype=self.A_logs.dtype, device=self.A_logs.device)
        self.A_logs.copy_(n.log().expand_as(self.A_logs))
        self.Ds.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        b, h, w, _ = x.shape
        k, d, n, r = self.num_directions, self.d_inner, self.d_state, self.dt_rank
        xz = self.in_proj(x)
        x, z = xz.chunk(2, dim=-1)
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2)))  # (B, d, H, W)

        xs = cross_scan(x)  # (B, K, d, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [r, n, n], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        ys = selective_scan(
            xs.flatten(1, 2),
            dts.flatten(1, 2),
            -torch.exp(self.A_logs.float()),
            Bs,
            Cs,
            self.Ds.float(),
            delta_bias=self.dt_projs_bias.flatten().float(),
            delta_softplus=True,
            backend=self.scan_backend,
            chunk_size=self.scan_chunk_size,
        ).view(b, k, d, h * w)
        y = cross_merge(ys, h, w).transpose(1, 2).reshape(b, h, w, d)
        y = self.out_norm(y) * F.silu(z)
        return self.out_proj(y)


class VSSBlock(nn.Module):
    """Pre-norm residual SS2D block, optionally followed by a pre-norm residual MLP. (B, H, W, C) in and out."""

    def __init__(self, dim: int, drop_path: float = 0.0, mlp_ratio: float = 0.0, **ss2d_kwargs: Any) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, **ss2d_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))  # fc1, GELU, fc2
        else:
            self.norm2 = self.mlp = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class PatchMerging(nn.Module):
    """Halve the grid by concatenating 2 x 2 neighbours (odd sizes padded), then LayerNorm + Linear 4C -> 2C."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = x.unflatten(1, (-1, 2)).unflatten(3, (-1, 2))  # (B, H/2, 2, W/2, 2, C)
        x = x.permute(0, 1, 3, 4, 2, 5).flatten(3)  # (B, H/2, W/2, 4C)
        return self.reduction(self.norm(x))


class VSSStage(nn.Module):
    """Optional patch merging, then ``len(drop_path)`` VSS blocks; (B, H, W, C) in and out."""

    def __init__(
        self, in_dim: int, dim: int, drop_path: Sequence[float], downsample: bool, **block_kwargs: Any
    ) -> None:
        super().__init__()
        if not downsample and in_dim != dim:
            raise ValueError(f"VSSStage: without downsampling in_dim must equal dim, got {in_dim} and {dim}")
        self.downsample = PatchMerging(in_dim, dim) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(VSSBlock(dim, drop_path=dp, **block_kwargs) for dp in drop_path)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for blk in self.blocks:
            if self.grad_checkpointing and x.requires_grad:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


class VMamba(nn.Module):
    """Hierarchical VMamba-like encoder returning maps at 1/4, 1/8, 1/16 and 1/32 of the input.

    Args:
        dims: channels per stage (an int ``c`` means ``(c, 2c, 4c, 8c)``).
        depths: VSS blocks per stage.
        patch_size: stride of the patch embedding (the first output's reduction).
        in_chans: image channels.
        d_state, ssm_ratio, dt_rank, d_conv, scan_backend, scan_chunk_size: SS2D settings.
        mlp_ratio: hidden ratio of the MLP after each SS2D (0 = no MLP, VMamba v0).
        drop_path_rate: stochastic depth, increased linearly over all blocks.
        grad_checkpointing: start with ``set_grad_checkpointing(True)`` (selectable from configs).
    """

    def __init__(
        self,
        dims: int | Sequence[int] = 96,
        depths: Sequence[int] = (2, 2, 9, 2),
        patch_size: int = 4,
        in_chans: int = 3,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        dt_rank: int | Literal["auto"] = "auto",
        d_conv: int = 3,
        mlp_ratio: float = 0.0,
        drop_path_rate: float = 0.0,
        scan_backend: ScanBackend = "auto",
        scan_chunk_size: ChunkSize = "auto",
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(dims, int):
            dims = [dims * 2**i for i in range(len(depths))]
        dims = [int(c) for c in dims]
        if len(dims) != len(depths) or not depths or any(dd < 1 for dd in depths):
            raise ValueError(
                f"VMamba: need one positive depth per stage, got dims={dims}, depths={list(depths)}"
            )
        self.patch_size = patch_size
        # Non-overlapping patch x patch convolution, then LayerNorm on channels-last tokens (proj.*, norm.*).
        self.patch_embed = PatchEmbed(
            img_size=None, patch_size=patch_size, in_chans=in_chans, embed_dim=dims[0], norm_layer=nn.LayerNorm,
            output_fmt="NHWC", strict_img_size=False,
        )  # fmt: skip

        n_blocks = sum(depths)
        dpr = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        block_kwargs = {
            "mlp_ratio": mlp_ratio,
            "d_state": d_state,
            "ssm_ratio": ssm_ratio,
            "dt_rank": dt_rank,
            "d_conv": d_conv,
            "scan_backend": scan_backend,
            "scan_chunk_size": scan_chunk_size,
        }
        stages, start = [], 0
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            in_dim = dims[i - 1] if i else dim
            stages.append(VSSStage(in_dim, dim, dpr[start : start + depth], downsample=i > 0, **block_kwargs))
            start += depth
        self.stages = nn.ModuleList(stages)
        self.out_norms = nn.ModuleList(nn.LayerNorm(dim) for dim in dims)

        self.feature_info: list[dict[str, Any]] = [
            {"num_chs": dim, "reduction": patch_size * 2**i, "module": f"out_norms.{i}"}
            for i, dim in enumerate(dims)
        ]
        self.out_channels: list[int] = list(dims)
        self.apply(self._init_weights)
        for m in self.modules():
            if isinstance(m, SS2D):
                m.reset_ssm_parameters()
        self.set_grad_checkpointing(grad_checkpointing)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass: trades compute for the blocks' stored activations."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """SSM parameters that Mamba trains without weight decay (names as in ``named_parameters``)."""
        return {n for n, _ in self.named_parameters() if n.endswith((".A_logs", ".Ds"))}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) -> maps (B, dims[i], ceil(H / (patch * 2^i)), ceil(W / (patch * 2^i)))."""
        if x.dim() != 4:
            raise ValueError(f"VMamba: expected a (B, C, H, W) image batch, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        p = self.patch_size
        x = F.pad(x, (0, (-w) % p, 0, (-h) % p))
        x = self.patch_embed(x)
        outs = []
        for stage, norm in zip(self.stages, self.out_norms):
            x = stage(x)
            outs.append(norm(x).permute(0, 3, 1, 2).contiguous())
        return outs


def _create_vmamba(pretrained: bool, **kwargs: Any) -> VMamba:
    if pretrained:
        raise ValueError(
            "VMamba presets have no pretrained weights in this project; build with pretrained=False and load a "
            "checkpoint explicitly"
        )
    return VMamba(**kwargs)


@register_encoder
def vmamba_t(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """VMamba-T (v0): widths 96-768, depths (2, 2, 9, 2), d_state 16, no MLP; drop path 0.2 as for ADE20K."""
    args: dict[str, Any] = {"dims": 96, "depths": (2, 2, 9, 2), "d_state": 16, "ssm_ratio": 2.0}
    return _create_vmamba(pretrained, **{**args, "drop_path_rate": 0.2, **kwargs})


@register_encoder
def vmamba_s(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """VMamba-S (v0): widths 96-768, depths (2, 2, 27, 2), d_state 16, no MLP; drop path 0.3."""
    args: dict[str, Any] = {"dims": 96, "depths": (2, 2, 27, 2), "d_state": 16, "ssm_ratio": 2.0}
    return _create_vmamba(pretrained, **{**args, "drop_path_rate": 0.3, **kwargs})
