"""Independent reference of the mLSTM cell: docs/design.md, section 4 (parallel form), written out one
(batch, head, token) at a time in whatever dtype it is given (tests pass float64)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_mlstm(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """h for q, k, v (B, NH, S, D) and gate pre-activations i, f (B, NH, S), by explicit loops over t.

    F_t = sum_{s<=t} logsigmoid(f_s); log D_ts = F_t - F_s + i_s; m_t = max_s log D_ts;
    C_ts = q_t . k_s / sqrt(D) * exp(log D_ts - m_t); n_t = max(|sum_s C_ts|, exp(-m_t));
    h_t = sum_s C_ts v_s / (n_t + eps).
    """
    b, nh, s, d = q.shape
    out = torch.empty_like(v)
    logf = F.logsigmoid(f)
    for bi in range(b):
        for h in range(nh):
            cum = torch.cumsum(logf[bi, h], 0)
            for t in range(s):
                logd = cum[t] - cum[: t + 1] + i[bi, h, : t + 1]
                m = logd.max()
                c = (k[bi, h, : t + 1] @ q[bi, h, t]) / math.sqrt(d) * torch.exp(logd - m)
                n = torch.maximum(c.sum().abs(), torch.exp(-m))
                out[bi, h, t] = (c[:, None] * v[bi, h, : t + 1]).sum(0) / (n + eps)
    return out
