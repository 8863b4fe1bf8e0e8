"""Independent reference of the ViL layer (docs/design.md, section 3): the math written out from the layer's
weights, not through its modules, for float64 comparisons."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.references.mlstm import reference_mlstm


def reference_vil_layer(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """docs/design.md, section 3, step by step from the layer's weights, with explicit loops (conv taps,
    blocks) where the package uses fused ops, and the cell from ``reference_mlstm``."""
    if layer.reverse:
        x = x.flip(1)
    e = layer.proj_up.weight.shape[0] // 2
    up = x @ layer.proj_up.weight.T
    x_m, z = up[..., :e], up[..., e:]
    w = layer.conv1d.conv.weight[:, 0]  # (e, K)
    kk = w.shape[1]
    padded = F.pad(x_m, (0, 0, kk - 1, 0))
    conv = sum(padded[:, j : j + x.shape[1]] * w[:, j] for j in range(kk)) + layer.conv1d.conv.bias
    a = F.silu(conv)

    def blockdiag(t, weight):
        nb, bs, _ = weight.shape
        out = torch.zeros_like(t)
        for h in range(nb):
            out[..., h * bs : (h + 1) * bs] = t[..., h * bs : (h + 1) * bs] @ weight[h].T
        return out

    q, k, v = blockdiag(a, layer.q_proj.weight), blockdiag(a, layer.k_proj.weight), blockdiag(x_m, layer.v_proj.weight)
    cell = layer.mlstm_cell
    gate_in = torch.cat([q, k, v], -1)
    i = (gate_in @ cell.igate.weight.T + cell.igate.bias).transpose(1, 2)
    f = (gate_in @ cell.fgate.weight.T + cell.fgate.bias).transpose(1, 2)
    nh = cell.num_heads
    heads = [t.reshape(t.shape[0], t.shape[1], nh, -1).transpose(1, 2) for t in (q, k, v)]
    h = reference_mlstm(*heads, i, f)  # (B, NH, S, DH)
    h = h.transpose(1, 2)
    mu = h.mean(-1, keepdim=True)
    var = ((h - mu) ** 2).mean(-1, keepdim=True)
    h = ((h - mu) / torch.sqrt(var + 1e-5)).reshape(x.shape[0], x.shape[1], e) * (1 + cell.outnorm.weight)
    h = (h + layer.learnable_skip * a) * F.silu(z)
    out = h @ layer.proj_down.weight.T
    return out.flip(1) if layer.reverse else out
