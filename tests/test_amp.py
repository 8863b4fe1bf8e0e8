"""Mixed precision: every mLSTM backend trains and infers under bf16 and fp16 autocast, on CPU autocast
alone and with CUDA's autocast op lists (tests/references/autocast.py), close to float32.

Criteria: encoder stage maps within 1% relative L2 of float32 (a 4-block timm ViT-Ti at its default
initialisation gives 0.33% under the same comparison, the ViL encoder here about 0.4%), the gradient of
all parameters at cosine >= 0.99 to float32's, and the whole segmentor finite. The Triton kernel's row is
in tests/test_triton.py (it needs Triton's interpreter from process start).
"""

import contextlib

import pytest
import torch

import seglstm
from seglstm.models.vil import VisionLSTM, mlstm
from tests.references.autocast import CudaAutocastPolicy

BACKENDS = ["chunkwise", "parallel", "recurrent"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _policy(name: str):
    return CudaAutocastPolicy() if name == "cuda_lists" else contextlib.nullcontext()


def _encoder(backend: str) -> VisionLSTM:
    """A small encoder at its default initialisation, with input and forget gates that vary per token
    (the default zero gate weights would make them constants)."""
    torch.manual_seed(0)
    enc = VisionLSTM(img_size=64, embed_dim=64, depths=(2,), mlstm_backend=backend, chunk_size=16)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "gate.weight" in name or "outnorm" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return enc


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _train_step(enc, x, weights, dtype, policy):
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None), _policy(policy):
        outs = enc(x)
        loss = sum((o.float() * w).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, list(enc.parameters()))
    return outs, torch.cat([g.flatten().float() for g in grads])


@pytest.mark.parametrize("policy", ["cpu", "cuda_lists"])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_trains_and_infers_under_autocast(backend, dtype, policy):
    enc = _encoder(backend)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 64, 80, generator=gen)  # 4 x 5 = 20 tokens: two chunks of 16, padded
    weights = [torch.randn(2, 64, 4, 5, generator=gen) for _ in enc.depths]
    ref_outs, ref_grad = _train_step(enc, x, weights, None, policy)
    outs, grad = _train_step(enc, x, weights, DTYPES[dtype], policy)
    for o, r in zip(outs, ref_outs):
        assert o.dtype == torch.float32
        assert _rel_l2(o, r) < 0.01
    assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0).item() >= 0.99
    with torch.no_grad():
        ref_inf = enc(x)
        with torch.autocast("cpu", dtype=DTYPES[dtype]), _policy(policy):
            inf = enc(x)
    for o, r in zip(inf, ref_inf):
        assert _rel_l2(o, r) < 0.01


def test_cuda_lists_mode_upcasts_and_rejects_mixed_inplace_gemms():
    """The mode does what it claims: an op on the float32 list runs in float32, matmuls stay bf16, and a
    mixed-dtype in-place GEMM raises as on CUDA."""
    a = torch.randn(2, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16), CudaAutocastPolicy() as mode:
        low = torch.bmm(a, a.transpose(1, 2))
        assert low.dtype == torch.bfloat16
        assert low.exp().dtype == torch.float32 and torch.cumsum(low, -1).dtype == torch.float32
        assert torch.nn.functional.layer_norm(low, (3,)).dtype == torch.float32
        with pytest.raises(RuntimeError, match="in-place or out="):
            low.float().baddbmm_(low, low)
    assert mode.seen["exp"] == 1 and mode.seen["cumsum"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_cell_runs_in_float32_under_autocast(backend):
    """bf16 inputs under autocast: the state math still runs in float32 (the result equals the float32
    cell on the same bf16-rounded inputs)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=gen).bfloat16() for _ in range(3))
    i, f = torch.randn(1, 2, 40, generator=gen), 3 + torch.randn(1, 2, 40, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16), CudaAutocastPolicy():
        h = mlstm(q, k, v, i, f, backend=backend, chunk_size=16)
    ref = mlstm(q.float(), k.float(), v.float(), i, f, backend=backend, chunk_size=16)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["cpu", "cuda_lists"])
def test_segmentor_finite_under_autocast(policy):
    torch.manual_seed(0)
    model = seglstm.create_model("seglstm_upernet_t", num_classes=5, depths=(1, 1, 1, 1), channels=32,
                                 aux_cfg=dict(channels=16))
    gen = torch.Generator().manual_seed(4)
    img = torch.randn(2, 3, 48, 64, generator=gen)
    mask = torch.randint(0, 5, (2, 48, 64), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16), _policy(policy):
        loss = model.loss(img, mask)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), _policy(policy):
        logits = model(img)
    assert logits.shape == (2, 5, 48, 64) and torch.isfinite(logits).all()
