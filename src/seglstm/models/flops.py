"""Parameter and FLOP counts for comparing models, measured by torch's own counter rather than by hand.

Convention: ``count_flops`` returns FLOPs = 2 x MACs (a multiply-add is two operations), which is what
``torch.utils.flop_counter.FlopCounterMode`` counts. fvcore, mmcv's ``get_model_complexity_info`` and most
segmentation papers (mmseg model zoo, Swin, VMamba) report MACs under the name "FLOPs": halve our number to
compare. The counter covers matrix products, convolutions and attention kernels; elementwise work (norms,
activations, resizes, and the selective scan of the PyTorch Mamba path) is not counted, as in those tools.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "count_params"]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, input_size: Sequence[int] = (1, 3, 512, 512)) -> int:
    """FLOPs (2 x MACs) of one forward pass on an input of ``input_size``, in eval mode without gradients.

    The input is created on the device and in the dtype of the model's first parameter; a model built on the
    ``meta`` device is counted without running any arithmetic. The model's train/eval mode is restored.
    """
    size = tuple(int(s) for s in input_size)
    if len(size) < 2 or any(s < 1 for s in size):
        raise ValueError(
            f"input_size must be positive dimensions such as (1, 3, 512, 512), got {input_size!r}"
        )
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    x = torch.zeros(size, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
