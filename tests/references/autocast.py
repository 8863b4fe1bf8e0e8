"""CUDA's autocast policy on the CPU, for tests: CPU autocast plus a TorchFunctionMode that runs the ops on
CUDA autocast's float32 list in float32 and widens the ops on its promote list, as CUDA does.

Use together with ``torch.autocast("cpu", dtype=torch.bfloat16)``. The op lists are torch's "Autocast Op
Reference" (CUDA ops that can autocast to float32 / to the widest input type). As on CUDA, in-place
variants and calls with ``out=`` are never autocast; a matmul-family in-place or ``out=`` call whose
floating operands differ in dtype raises, as it does on CUDA.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

# CUDA ops that can autocast to float32 (torch docs, Autocast Op Reference); functional spellings that
# reach a TorchFunctionMode under another name are listed beside them.
CUDA_FP32_OPS = frozenset(
    {
        "__pow__", "__rdiv__", "__rpow__", "__rtruediv__", "acos", "asin", "binary_cross_entropy_with_logits",
        "cosh", "cosine_embedding_loss", "cdist", "cosine_similarity", "cross_entropy", "cumprod", "cumsum",
        "dist", "erfinv", "exp", "expm1", "group_norm", "hinge_embedding_loss", "kl_div", "l1_loss",
        "layer_norm", "log", "log_softmax", "log10", "log1p", "log2", "margin_ranking_loss", "mse_loss",
        "multilabel_margin_loss", "multi_margin_loss", "nll_loss", "norm", "normalize", "pdist",
        "poisson_nll_loss", "pow", "prod", "reciprocal", "rsqrt", "sinh", "smooth_l1_loss",
        "soft_margin_loss", "softmax", "softmin", "softplus", "sum", "renorm", "tan", "triplet_margin_loss",
    }
)
# CUDA ops that autocast to the widest input type.
CUDA_PROMOTE_OPS = frozenset(
    {"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "grid_sample", "index_put", "scatter_add",
     "tensordot"}
)
# Ops whose in-place / out= forms must see one dtype (CUDA raises "Bad in-place call" / "expected ...").
MATMUL_OPS = frozenset({"addbmm", "addmm", "addmv", "addr", "baddbmm", "bmm", "matmul", "mm", "mv"})


def _name(func) -> str:
    return getattr(func, "__name__", "")


def _tensors(args, kwargs) -> list[torch.Tensor]:
    flat = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            flat.append(a)
        elif isinstance(a, (list, tuple)):
            flat.extend(t for t in a if isinstance(t, torch.Tensor))
    return flat


def _cast(obj, dtype: torch.dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != torch.float64 else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(o, dtype) for o in obj)
    return obj


class CudaAutocastPolicy(TorchFunctionMode):
    """Makes CPU autocast follow CUDA's float32 and promote lists (see the module docstring).

    ``seen`` counts the calls the mode upcast or widened, so a test can check the mode did something.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        inplace = name.endswith("_") and not name.startswith("__")
        base = name.rstrip("_")
        if inplace or "out" in kwargs:
            if base in MATMUL_OPS:
                dtypes = {t.dtype for t in _tensors(args, kwargs) if t.is_floating_point()}
                if len(dtypes) > 1:
                    raise RuntimeError(
                        f"Bad in-place or out= call: {name} mixes {sorted(map(str, dtypes))} (CUDA autocast does not "
                        "cast in-place or out= calls)"
                    )
            return func(*args, **kwargs)
        if torch.is_autocast_enabled("cpu") and "dtype" not in kwargs:
            if name in CUDA_FP32_OPS:
                self.seen[name] = self.seen.get(name, 0) + 1
                args, kwargs = _cast(args, torch.float32), {k: _cast(v, torch.float32) for k, v in kwargs.items()}
            elif name in CUDA_PROMOTE_OPS:
                floats = [t.dtype for t in _tensors(args, kwargs) if t.is_floating_point()]
                if len(set(floats)) > 1:
                    wide = floats[0]
                    for d in floats[1:]:
                        wide = torch.promote_types(wide, d)
                    self.seen[name] = self.seen.get(name, 0) + 1
                    args, kwargs = _cast(args, wide), {k: _cast(v, wide) for k, v in kwargs.items()}
        return func(*args, **kwargs)
