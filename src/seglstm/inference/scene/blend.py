"""The rolling buffer in which one strip's overlapping windows are blended before rows are flushed.

It lives on the model's device (a torch tensor there), so a window's probabilities never leave it: only the
uint8 classes (and uint8 probabilities) of finished rows cross to the host.
"""

from __future__ import annotations

import torch

from seglstm.inference.scene.plan import BLOCK, Strip, TileGrid


class StripBuffer:
    """Running weighted-probability sums for rows ``[y0, y0 + cap)`` of one strip's window extent."""

    def __init__(self, strip: Strip, grid: TileGrid, num_classes: int, y0: int, device: torch.device) -> None:
        self.strip, self.y0, self.end = strip, y0, y0  # rows [y0, end) may hold sums, the rest are zero
        self.ex0, ex1 = strip.extent(grid)
        self.cap = grid.tile_h + BLOCK
        width = ex1 - self.ex0
        self.acc = torch.zeros((num_classes, self.cap, width), dtype=torch.float32, device=device)
        self.wsum = torch.zeros((self.cap, width), dtype=torch.float32, device=device)
        self.valid = torch.zeros((self.cap, width), dtype=torch.bool, device=device)

    def add(self, y: int, x: int, wprobs: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor) -> None:
        top = max(y, self.y0)  # rows above y0 were flushed already (only on resume can a window reach them)
        skip = top - y
        r0, r1 = top - self.y0, y + wprobs.shape[1] - self.y0
        c0, c1 = x - self.ex0, x - self.ex0 + wprobs.shape[2]
        self.acc[:, r0:r1, c0:c1] += wprobs[:, skip:]
        self.wsum[r0:r1, c0:c1] += weight[skip:]
        self.valid[r0:r1, c0:c1] = valid[skip:]
        self.end = max(self.end, y + wprobs.shape[1])

    def blended(self, y0: int, y1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Blended probabilities ``(K, h, w)`` and validity of rows ``[y0, y1)`` in the output columns."""
        r0, r1 = y0 - self.y0, y1 - self.y0
        c0, c1 = self.strip.x0 - self.ex0, self.strip.x1 - self.ex0
        acc, wsum = self.acc[:, r0:r1, c0:c1], self.wsum[r0:r1, c0:c1]
        # where no window reached, acc is 0 too: 0 / tiny = 0, and every reached sum is far above tiny
        return acc / wsum.clamp_min(torch.finfo(torch.float32).tiny), self.valid[r0:r1, c0:c1]

    def slide(self, y1: int) -> None:
        """Drop the rows above ``y1`` (flushed) so that the buffer starts there."""
        n, used = y1 - self.y0, self.end - self.y0
        keep = max(0, used - n)  # only rows some window reached move; the others are zero already
        for t in (self.acc, self.wsum[None], self.valid[None]):
            for r in range(0, keep, n):  # moves of n rows at a time: source and target never overlap
                m = min(n, keep - r)
                t[:, r : r + m] = t[:, r + n : r + n + m]
            t[:, keep:used] = 0
        self.y0, self.end = y1, max(y1, self.end)


def first_argmax(p: torch.Tensor) -> torch.Tensor:
    """``p.argmax(dim=0)`` as uint8 (ties to the first class, as NumPy's and torch's): a running maximum
    over the classes, several times faster on a CPU than torch's reduction over a leading dimension."""
    best, index = p[0].clone(), torch.zeros(p.shape[1:], dtype=torch.uint8, device=p.device)
    for k in range(1, p.shape[0]):
        better = p[k] > best
        index.masked_fill_(better, k)
        best = torch.maximum(best, p[k])
    return index
