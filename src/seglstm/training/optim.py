"""The seed's optimiser and learning-rate schedule (docs/design.md, section 6), outside Lightning so tests can probe them.

Parameter groups follow mmengine's ``paramwise_cfg.custom_keys`` with ``decay_mult=0`` for ``pos_embed``,
``cls_token`` and ``norm``: a parameter whose full name *contains* one of the keys gets no weight decay.
Nothing else is exempt, as in the seed: biases and the decode heads' BatchNorm parameters (named ``bn``, not
``norm``) keep weight decay 0.01, while every ViL block ``norm``/``outnorm`` weight and the position table
do not. Parameters a model lists in ``no_weight_decay()`` (timm's convention: Mamba's ``A_logs``/``Ds``,
Swin's relative position tables) are exempt too, as those encoders' own recipes have it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

NO_DECAY_KEYS: tuple[str, ...] = ("pos_embed", "cls_token", "norm")


def param_groups(
    model: nn.Module, weight_decay: float, no_decay_keys: Sequence[str] = NO_DECAY_KEYS
) -> list[dict]:
    """Split trainable parameters into a decayed group and a ``weight_decay=0`` group by name substring.

    Groups hold ``(name, parameter)`` pairs, so torch records ``param_names`` in each optimiser group (plain
    strings: checkpoints stay ``weights_only``-loadable) and the split stays inspectable; empty groups are
    left out.
    """
    exempt = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            skip = name in exempt or any(key in name for key in no_decay_keys)
            (no_decay if skip else decay).append((name, param))
    groups = [
        g
        for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def build_adamw(
    model: nn.Module,
    lr: float = 6e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.01,
    no_decay_keys: Sequence[str] = NO_DECAY_KEYS,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, the seed's optimiser."""
    return torch.optim.AdamW(param_groups(model, weight_decay, no_decay_keys), lr=lr, betas=betas)


def check_schedule(
    max_iters: int | None,
    warmup_iters: int,
    max_key: str = "max_iters",
    warmup_key: str = "warmup_iters",
) -> None:
    """The lengths :class:`WarmupPoly` accepts; the CLI runs it before any process starts, naming its keys."""
    if max_iters is None or max_iters <= 0:
        raise ValueError(f"the poly schedule needs {max_key} > 0, got {max_iters}")
    if warmup_iters == 1 or warmup_iters < 0:
        raise ValueError(f"{warmup_key} must be 0 (no warm-up) or >= 2, got {warmup_iters}")
    if max_iters < warmup_iters + 2:
        raise ValueError(f"{max_key}={max_iters} must exceed {warmup_key}={warmup_iters} by at least 2")


class WarmupPoly:
    """LR factor at iteration ``t``: mmengine's LinearLR(begin=0, end=W) then PolyLR(begin=W, end=T).

    Both mmengine schedulers span ``end - begin - 1`` steps, which this closed form keeps: the factor climbs
    linearly from ``warmup_ratio`` at t=0 to 1 at t=W-1, stays 1 at t=W, then decays as
    ``((T-1-t)/(T-1-W))**power`` (blended towards ``min_ratio``) and is exactly ``min_ratio`` at the last
    iteration t=T-1 and after. A callable object rather than a closure so ``LambdaLR.state_dict`` stores its
    plain fields and a resumed run rebuilds the same schedule.
    """

    def __init__(
        self,
        max_iters: int,
        warmup_iters: int = 1500,
        warmup_ratio: float = 1e-6,
        power: float = 1.0,
        min_ratio: float = 0.0,
    ) -> None:
        check_schedule(max_iters, warmup_iters)
        if not 0.0 < warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in (0, 1], got {warmup_ratio}")
        self.max_iters = int(max_iters)
        self.warmup_iters = int(warmup_iters)
        self.warmup_ratio = float(warmup_ratio)
        self.power = float(power)
        self.min_ratio = float(min_ratio)

    def reschedule(self, max_iters: int, warmup_iters: int) -> None:
        """Lay the schedule over a new length, checked as in the constructor: a time budget knows how many
        iterations fit only after timing the first ones."""
        check_schedule(max_iters, warmup_iters)
        self.max_iters, self.warmup_iters = int(max_iters), int(warmup_iters)

    def __call__(self, t: int) -> float:
        w = self.warmup_iters
        if t < w:
            return self.warmup_ratio + (1.0 - self.warmup_ratio) * t / (w - 1)
        span = self.max_iters - w - 1
        remaining = max(0, span - (t - w)) / span
        return self.min_ratio + (1.0 - self.min_ratio) * remaining**self.power


def build_warmup_poly(
    optimizer: torch.optim.Optimizer,
    max_iters: int,
    warmup_iters: int = 1500,
    warmup_ratio: float = 1e-6,
    power: float = 1.0,
    eta_min: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration LambdaLR with :class:`WarmupPoly`; ``eta_min`` is absolute, as in mmengine's PolyLR."""
    base_lrs = {group["lr"] for group in optimizer.param_groups}
    if len(base_lrs) != 1:
        raise ValueError(f"all parameter groups must share one base lr for eta_min to apply, got {base_lrs}")
    min_ratio = eta_min / base_lrs.pop()
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupPoly(max_iters, warmup_iters, warmup_ratio, power, min_ratio)
    )
