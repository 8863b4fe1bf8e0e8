"""The seed's optimiser and schedule: no-decay groups by name, mmengine's warm-up + poly, AdamW's update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seglstm.training.optim import NO_DECAY_KEYS, WarmupPoly, build_adamw, build_warmup_poly, param_groups
from tests.references.schedule import mmengine_warmup_poly


@pytest.mark.parametrize(
    ("max_iters", "warmup", "ratio", "power", "eta_min"),
    [(15000, 1500, 1e-6, 1.0, 0.0), (300, 40, 1e-3, 0.9, 1e-5), (50, 0, 1.0, 1.0, 0.0)],
)
def test_schedule_matches_mmengine_recursion(max_iters, warmup, ratio, power, eta_min) -> None:
    base = 6e-4
    model = nn.Linear(3, 2)
    opt = build_adamw(model, lr=base)
    sched = build_warmup_poly(opt, max_iters, warmup, ratio, power, eta_min)
    got = []
    opt.step()  # no gradients: a no-op that only tells LambdaLR the optimizer has stepped
    for _ in range(max_iters + 3):  # Lightning: lr used at iteration t, then scheduler.step()
        got.append(opt.param_groups[0]["lr"])
        sched.step()
    ref = mmengine_warmup_poly(base, max_iters, warmup, ratio, power, eta_min)
    torch.testing.assert_close(
        torch.tensor(got, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64), rtol=1e-9, atol=1e-15
    )
    assert all(g["lr"] == opt.param_groups[0]["lr"] for g in opt.param_groups)


def test_seed_schedule_key_iterations() -> None:
    f = WarmupPoly(15000, 1500, 1e-6, 1.0)
    assert f(0) == pytest.approx(1e-6, rel=1e-12)
    assert f(1499) == 1.0  # warm-up reaches the base lr on its last iteration
    assert f(1500) == 1.0
    assert f(749) == pytest.approx(1e-6 + (1 - 1e-6) * 749 / 1499, rel=1e-12)
    assert f(8250) == pytest.approx((14999 - 8250) / 13499, rel=1e-12)
    assert f(14999) == 0.0 and f(15000) == 0.0 and f(20000) == 0.0


def test_schedule_state_survives_a_round_trip() -> None:
    """A resumed run rebuilds the schedule from the checkpoint's plain fields."""
    model = nn.Linear(2, 2)
    opt = build_adamw(model)
    sched = build_warmup_poly(opt, 100, 10)
    for _ in range(37):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = build_adamw(nn.Linear(2, 2))
    sched2 = build_warmup_poly(opt2, 100, 10)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 37
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_iters": 100, "warmup_iters": 1}, "warmup_iters"),
        ({"max_iters": 10, "warmup_iters": 9}, "must exceed"),
        ({"max_iters": 100, "warmup_iters": 10, "warmup_ratio": 0.0}, "warmup_ratio"),
    ],
)
def test_schedule_rejects_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WarmupPoly(**kwargs)


class _Named(nn.Module):
    """Parameter names as the ViL encoder and mmseg heads spell them."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.pos_embed = nn.Module()
        self.backbone.pos_embed.embed = nn.Parameter(torch.randn(1, 4, 4, 8))
        self.backbone.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.backbone.patch_embed = nn.Conv2d(3, 8, 2)
        block = nn.Module()
        block.norm = nn.LayerNorm(8, bias=False)
        block.layer = nn.Module()
        block.layer.proj_up = nn.Linear(8, 16, bias=False)
        block.layer.outnorm = nn.GroupNorm(2, 16)
        self.backbone.blocks1 = nn.ModuleList([block])
        self.decode_head = nn.Module()
        self.decode_head.bottleneck = nn.Module()
        self.decode_head.bottleneck.conv = nn.Conv2d(8, 8, 3, bias=False)
        self.decode_head.bottleneck.bn = nn.BatchNorm2d(8)
        self.decode_head.conv_seg = nn.Conv2d(8, 3, 1)
        self.frozen = nn.Parameter(torch.zeros(2), requires_grad=False)


def test_param_groups_follow_the_seed_names() -> None:
    groups = param_groups(_Named(), weight_decay=0.01)
    by_decay = {g["weight_decay"]: set(n for n, _ in g["params"]) for g in groups}
    assert by_decay[0.0] == {
        "backbone.pos_embed.embed",
        "backbone.cls_token",
        "backbone.blocks1.0.norm.weight",
        "backbone.blocks1.0.layer.outnorm.weight",
        "backbone.blocks1.0.layer.outnorm.bias",
    }
    # biases and the heads' BatchNorm (named bn) keep weight decay, as with mmengine's custom_keys
    assert by_decay[0.01] == {
        "backbone.patch_embed.weight",
        "backbone.patch_embed.bias",
        "backbone.blocks1.0.layer.proj_up.weight",
        "decode_head.bottleneck.conv.weight",
        "decode_head.bottleneck.bn.weight",
        "decode_head.bottleneck.bn.bias",
        "decode_head.conv_seg.weight",
        "decode_head.conv_seg.bias",
    }
    assert NO_DECAY_KEYS == ("pos_embed", "cls_token", "norm")


def test_adamw_step_applies_decoupled_decay_only_to_the_decay_group() -> None:
    torch.manual_seed(0)
    model = _Named()
    lr, wd = 6e-4, 0.01
    opt = build_adamw(model, lr=lr, betas=(0.9, 0.999), weight_decay=wd)
    assert opt.param_groups[0]["param_names"][0].startswith("backbone.")
    before = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.grad = grads[n].clone()
    opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = grads[n].double()
        # first AdamW step: m = 0.1 g, v = 0.001 g^2, bias-corrected m/sqrt(v) = g/|g| (eps 1e-8)
        m_hat = (0.1 * g) / (1 - 0.9)
        v_hat = (0.001 * g * g) / (1 - 0.999)
        decay = 0.0 if any(k in n for k in NO_DECAY_KEYS) else wd
        expected = before[n] * (1 - lr * decay) - lr * m_hat / (v_hat.sqrt() + 1e-8)
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=1e-9, msg=n)


def test_model_no_weight_decay_names_are_exempt():
    import seglstm
    from seglstm.training.optim import param_groups

    model = seglstm.create_model("mamba_upernet", num_classes=3, dims=(16, 32, 64, 128), depths=(1, 1, 1, 1),
                                 channels=32)
    exempt = model.no_weight_decay()
    assert any("A_log" in n for n in exempt)
    groups = param_groups(model, 0.01)
    no_decay = {n for g in groups if g["weight_decay"] == 0.0 for n, _ in g["params"]}
    decay = {n for g in groups if g["weight_decay"] > 0.0 for n, _ in g["params"]}
    assert exempt <= no_decay and not exempt & decay
    assert any(n.startswith("decode_head.") and n.endswith("conv.weight") for n in decay)
