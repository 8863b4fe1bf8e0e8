"""mmengine's warm-up + poly learning rate as its runner computes it: recursive schedulers, stepped once per
iteration (docs/design.md, section 6). A second implementation for the closed form in ``seglstm.training.optim``."""

from __future__ import annotations


def mmengine_warmup_poly(
    base: float, max_iters: int, warmup: int, ratio: float, power: float, eta_min: float
) -> list:
    """Second implementation: mmengine's *recursive* LinearLR then PolyLR, stepped as its runner steps them.

    Each scheduler multiplies the current lr by its own per-step factor while ``begin <= step < end``; both
    span ``end - begin - 1`` steps. Float64 throughout.
    """
    lr = base
    lrs = []
    lin_total = warmup - 1
    poly_total = max_iters - warmup - 1
    for step in range(max_iters + 3):
        if step < warmup:  # LinearLR(start_factor=ratio, begin=0, end=warmup)
            k = step
            if k == 0:
                lr = base * ratio
            else:
                lr = lr * (1.0 + (1.0 - ratio) / (lin_total * ratio + (k - 1) * (1.0 - ratio)))
        elif step < max_iters:  # PolyLR(begin=warmup, end=max_iters)
            k = step - warmup
            if k > 0:
                lr = (lr - eta_min) * (1.0 - 1.0 / (poly_total - k + 1)) ** power + eta_min
        lrs.append(lr)
    return lrs
