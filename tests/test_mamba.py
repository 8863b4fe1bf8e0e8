"""The selective scan and the VMamba-like encoder: scan math against a step-by-step float64 recurrence,
the four SS2D directions, Mamba's initialisation, shapes and the mamba_ssm kernel where one is available."""

import math

import pytest
import torch
import torch.nn.functional as F

from seglstm.models import mamba
from seglstm.models.mamba import SS2D, VMamba, cross_merge, cross_scan, selective_scan

F64 = torch.float64


def reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True):
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t ; y_t = C_t . h_t + D u_t ; y * silu(z), one step at a time."""
    b, d, length = u.shape
    n = A.shape[1]
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    if delta_softplus:
        dt = torch.log1p(torch.exp(dt))

    def at(m, t):  # B or C at step t as a (b, d, n) tensor
        if m.dim() == 2:
            return m.expand(b, d, n)
        if m.dim() == 3:
            return m[:, None, :, t].expand(b, d, n)
        per_group = d // m.shape[1]
        return torch.stack([m[:, ch // per_group, :, t] for ch in range(d)], dim=1)

    h = torch.zeros(b, d, n, dtype=u.dtype)
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, :, t, None] * A) * h + dt[:, :, t, None] * at(B, t) * u[:, :, t, None]
        y = (h * at(C, t)).sum(-1)
        if D is not None:
            y = y + D * u[:, :, t]
        ys.append(y)
    y = torch.stack(ys, dim=-1)
    return y if z is None else y * F.silu(z)


def _inputs(gen, b, d, n, length, layout, dtype=F64, groups=4):
    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    if layout == "time_invariant":
        B, C = r(d, n), r(d, n)
    elif layout == "shared":
        B, C = r(b, n, length), r(b, n, length)
    else:
        B, C = r(b, groups, n, length), r(b, groups, n, length)
    return {
        "u": r(b, d, length),
        "delta": r(b, d, length),
        "A": -(0.2 + torch.rand(d, n, generator=gen, dtype=dtype) * 2),
        "B": B,
        "C": C,
        "D": r(d),
        "z": r(b, d, length),
        "delta_bias": 0.5 * r(d),
    }


@pytest.mark.parametrize("layout", ["time_invariant", "shared", "grouped"])
@pytest.mark.parametrize("length", [1, 7, 16, 37])
def test_scan_matches_float64_recurrence(layout, length):
    gen = torch.Generator().manual_seed(length * 10 + len(layout))
    kw = _inputs(gen, b=2, d=8, n=3, length=length, layout=layout)
    got = selective_scan(**kw, backend="pscan")
    want = reference_scan(**kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["shared", "grouped"])
def test_scan_gradients_match_recurrence(layout):
    """mambapy's parallel scan has a hand-written backward: check it against autograd through the recurrence."""
    gen = torch.Generator().manual_seed(3)
    kw = _inputs(gen, b=2, d=8, n=4, length=21, layout=layout)
    leaves = {k: v.clone().requires_grad_(True) for k, v in kw.items()}
    refs = {k: v.clone().requires_grad_(True) for k, v in kw.items()}
    weight = torch.randn(2, 8, 21, generator=gen, dtype=F64)
    (selective_scan(**leaves, backend="pscan") * weight).sum().backward()
    (reference_scan(**refs) * weight).sum().backward()
    for k in kw:
        torch.testing.assert_close(leaves[k].grad, refs[k].grad, rtol=1e-9, atol=1e-9, msg=f"grad of {k}")


def _whole_sequence_parallel_scan(monkeypatch, **kw):
    """The scan as it was before chunking: mambapy's parallel scan over the whole sequence at once."""
    with monkeypatch.context() as m:
        m.setattr(mamba, "_parallel_in_chunk", lambda device: True)
        return selective_scan(**kw, backend="pscan", chunk_size=None)


@pytest.fixture(params=["sequential", "parallel"])
def in_chunk(request, monkeypatch):
    """Both ways of scanning inside a chunk (a CPU runs the sequential one, a GPU mambapy's parallel scan)."""
    monkeypatch.setattr(mamba, "_parallel_in_chunk", lambda device: request.param == "parallel")
    return request.param


@pytest.mark.parametrize("layout", ["time_invariant", "shared", "grouped"])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 16, None])
def test_chunked_scan_matches_recurrence_and_whole_sequence_scan(layout, chunk_size, in_chunk, monkeypatch):
    """Chunks that divide L, that do not (a short last chunk), one step each and one chunk."""
    gen = torch.Generator().manual_seed((chunk_size or 99) * 7 + len(layout))
    kw = _inputs(gen, b=2, d=8, n=3, length=37, layout=layout)
    got = selective_scan(**kw, backend="pscan", chunk_size=chunk_size)
    torch.testing.assert_close(got, reference_scan(**kw), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, _whole_sequence_parallel_scan(monkeypatch, **kw), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("layout", ["time_invariant", "shared", "grouped"])
@pytest.mark.parametrize("chunk_size", [3, 8, None])
def test_chunked_scan_gradients_match_recurrence(layout, chunk_size, in_chunk, monkeypatch):
    """Through the per-chunk recomputation: gradients of every input (u, delta with its bias and softplus,
    A, B, C, the D skip and the z gate) against autograd through the step-by-step recurrence."""
    gen = torch.Generator().manual_seed(40 + (chunk_size or 0))
    kw = _inputs(gen, b=2, d=8, n=4, length=29, layout=layout)
    kw["delta"] = kw["delta"] * 2  # step sizes spread over a wide range (softplus of N(0, 2) plus bias)
    leaves = {k: v.clone().requires_grad_(True) for k, v in kw.items()}
    refs = {k: v.clone().requires_grad_(True) for k, v in kw.items()}
    whole = {k: v.clone().requires_grad_(True) for k, v in kw.items()}
    weight = torch.randn(2, 8, 29, generator=gen, dtype=F64)
    (selective_scan(**leaves, backend="pscan", chunk_size=chunk_size) * weight).sum().backward()
    (reference_scan(**refs) * weight).sum().backward()
    (_whole_sequence_parallel_scan(monkeypatch, **whole) * weight).sum().backward()
    for k in kw:
        torch.testing.assert_close(leaves[k].grad, refs[k].grad, rtol=1e-9, atol=1e-9, msg=f"grad of {k}")
        torch.testing.assert_close(leaves[k].grad, whole[k].grad, rtol=1e-10, atol=1e-10, msg=f"grad of {k}")


def _saved_bytes_of_forward(fn) -> int:
    """Bytes that autograd keeps for the backward pass of ``fn()`` (each storage counted once)."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


@pytest.mark.parametrize("length", [512, 2048])
def test_chunked_scan_keeps_l_times_d_for_backward(length, in_chunk):
    """What the backward pass holds grows with L * D for the chunked scan (inputs, outputs, one state per
    chunk), and with L * D * N for the whole-sequence scan: measured by autograd's saved tensors."""
    gen = torch.Generator().manual_seed(length)
    b, d, n = 1, 64, 16  # 4 groups: B and C are (1, 4, 16, L), as large as u
    kw = {k: v.float().requires_grad_(True) for k, v in _inputs(gen, b, d, n, length, "grouped").items()}
    ld = b * length * d * 4  # bytes of one (B, L, D) float32 tensor
    chunked = _saved_bytes_of_forward(lambda: selective_scan(**kw, backend="pscan", chunk_size=64))
    whole = _saved_bytes_of_forward(lambda: selective_scan(**kw, backend="pscan", chunk_size=None))
    # The inputs u, delta, z, B, C (5 L*D here) and the output; the states add one (D, N) per 64-step chunk,
    # the whole-sequence scan keeps N L*D and more.
    assert chunked <= 7 * ld + (length // 64) * d * n * 4, chunked / ld
    assert whole > n * ld, whole / ld


def test_vmamba_chunked_scan_matches_whole_sequence():
    """The encoder with a chunk size below its token count (several chunks per stage) against one chunk."""
    torch.manual_seed(6)
    chunked = VMamba(dims=(8, 16), depths=(1, 1), d_state=4, scan_chunk_size=24).double()
    whole = VMamba(dims=(8, 16), depths=(1, 1), d_state=4, scan_chunk_size=None).double()
    whole.load_state_dict(chunked.state_dict())
    x = torch.randn(2, 3, 40, 36, dtype=F64)  # 10 x 9 = 90 tokens in stage 1: 4 chunks
    outs = [enc(x) for enc in (chunked, whole)]
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    grads = []
    for enc, o in zip((chunked, whole), outs):
        sum((t * torch.linspace(-1, 1, t.numel(), dtype=F64).view_as(t)).sum() for t in o).backward()
        grads.append([p.grad for p in enc.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_auto_chunk_size_targets_the_state_bytes():
    u = torch.empty(2, 768, 16384)  # VMamba-T's first stage at 512 x 512, batch 2: 96 KiB of states per step
    t = mamba.auto_chunk_size(u, 16)
    assert t == 512 and mamba.AUTO_CHUNK_BYTES // 2 <= t * 2 * 768 * 16 * 4 <= mamba.AUTO_CHUNK_BYTES
    assert mamba.auto_chunk_size(torch.empty(64, 4096, 8), 64) == 16  # never below 16 steps
    assert mamba.auto_chunk_size(u.double(), 16) == 256


def test_scan_logs_its_choice_once(caplog):
    gen = torch.Generator().manual_seed(8)
    kw = _inputs(gen, b=1, d=4, n=2, length=6, layout="shared")
    mamba._logged_choices.discard("pscan-cpu")
    with caplog.at_level("INFO", logger="seglstm.models.mamba"):
        selective_scan(**kw, chunk_size=4)
        selective_scan(**kw, chunk_size=4)
    messages = [r.getMessage() for r in caplog.records if r.name == "seglstm.models.mamba"]
    assert messages == ["selective_scan: chunked PyTorch scan on cpu, chunks of 4 steps"]


def test_scan_options_and_float32():
    gen = torch.Generator().manual_seed(5)
    kw = _inputs(gen, b=1, d=6, n=2, length=11, layout="grouped", groups=3)
    # Without softplus the step size is used as given, so it must be positive; no D, no z, no bias.
    kw["delta"] = kw["delta"].abs() + 0.01
    plain = {k: kw[k] for k in ("u", "delta", "A", "B", "C")}
    torch.testing.assert_close(
        selective_scan(**plain, delta_softplus=False),
        reference_scan(**plain, delta_softplus=False),
        rtol=1e-10,
        atol=1e-10,
    )
    f32 = {k: v.float() for k, v in kw.items()}
    y32 = selective_scan(**f32)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), reference_scan(**kw), rtol=1e-4, atol=1e-5)


def test_scan_rejects_bad_shapes():
    gen = torch.Generator().manual_seed(0)
    kw = _inputs(gen, b=1, d=6, n=2, length=5, layout="grouped", groups=3)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(**{**kw, "A": kw["A"][:4]})
    with pytest.raises(ValueError, match="B of shape"):
        selective_scan(**{**kw, "B": kw["B"][..., :4]})
    with pytest.raises(ValueError, match="same group count"):
        selective_scan(**{**kw, "C": torch.randn(1, 2, 2, 5, dtype=F64)})
    with pytest.raises(ValueError, match="backend"):
        selective_scan(**kw, backend="cuda")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            selective_scan(**kw, chunk_size=bad)
    if not mamba.MAMBA_SSM_AVAILABLE:
        with pytest.raises(RuntimeError, match="mamba_ssm"):
            selective_scan(**kw, backend="mamba_ssm")


@pytest.mark.skipif(
    not (mamba.MAMBA_SSM_AVAILABLE and torch.cuda.is_available()),
    reason="needs mamba_ssm (a CUDA build) and a CUDA device"
    + ("" if mamba.MAMBA_SSM_AVAILABLE else "; mamba_ssm does not import here"),
)
def test_mamba_ssm_kernel_agrees_with_pscan():
    gen = torch.Generator().manual_seed(11)
    kw = _inputs(gen, b=2, d=64, n=16, length=300, layout="grouped", dtype=torch.float32)
    kw = {k: v.cuda().requires_grad_(True) for k, v in kw.items()}
    twins = {k: v.detach().clone().requires_grad_(True) for k, v in kw.items()}
    y_kernel = selective_scan(**kw, backend="mamba_ssm")
    y_torch = selective_scan(**twins, backend="pscan")
    torch.testing.assert_close(y_kernel, y_torch, rtol=1e-3, atol=1e-4)
    weight = torch.randn_like(y_kernel)
    (y_kernel * weight).sum().backward()
    (y_torch * weight).sum().backward()
    for k in kw:
        torch.testing.assert_close(kw[k].grad, twins[k].grad, rtol=1e-2, atol=1e-3, msg=f"grad of {k}")


def test_cross_scan_orders_and_merge():
    x = torch.randn(2, 3, 4, 5)
    h, w = 4, 5
    rows = [(i, j) for i in range(h) for j in range(w)]
    cols = [(i, j) for j in range(w) for i in range(h)]
    orders = [rows, cols, rows[::-1], cols[::-1]]
    xs = cross_scan(x)
    assert xs.shape == (2, 4, 3, h * w)
    for k, order in enumerate(orders):
        want = torch.stack([x[:, :, i, j] for i, j in order], dim=-1)
        torch.testing.assert_close(xs[:, k], want)
    # Merging scatters each direction's sequence back to its pixel: ys_k[t] belongs to orders[k][t].
    ys = torch.randn(2, 4, 3, h * w)
    want = torch.zeros(2, 3, h, w)
    for k, order in enumerate(orders):
        for t, (i, j) in enumerate(order):
            want[:, :, i, j] += ys[:, k, :, t]
    torch.testing.assert_close(cross_merge(ys, h, w), want.flatten(2))


def reference_ss2d(m: SS2D, x: torch.Tensor) -> torch.Tensor:
    """SS2D written out: per direction, explicit pixel order, own projections, the float64 recurrence."""
    b, h, w, _ = x.shape
    d, n, r = m.d_inner, m.d_state, m.dt_rank
    xz = x @ m.in_proj.weight.T
    xm, z = xz[..., :d], xz[..., d:]
    xm = F.silu(
        F.conv2d(xm.permute(0, 3, 1, 2), m.conv2d.weight, m.conv2d.bias, padding=m.conv2d.padding, groups=d)
    )
    rows = [(i, j) for i in range(h) for j in range(w)]
    cols = [(i, j) for j in range(w) for i in range(h)]
    y = torch.zeros(b, d, h, w, dtype=x.dtype)
    for k, order in enumerate([rows, cols, rows[::-1], cols[::-1]]):
        seq = torch.stack([xm[:, :, i, j] for i, j in order], dim=-1)  # (b, d, L)
        proj = torch.einsum("cd,bdl->bcl", m.x_proj_weight[k], seq)
        dt_low, Bk, Ck = proj[:, :r], proj[:, r : r + n], proj[:, r + n :]
        dt = torch.einsum("dr,brl->bdl", m.dt_projs_weight[k], dt_low)
        sl = slice(k * d, (k + 1) * d)
        out = reference_scan(
            seq, dt, -torch.exp(m.A_logs[sl]), Bk, Ck, m.Ds[sl], delta_bias=m.dt_projs_bias[k]
        )
        for t, (i, j) in enumerate(order):
            y[:, :, i, j] += out[:, :, t]
    y = F.layer_norm(y.permute(0, 2, 3, 1), (d,), m.out_norm.weight, m.out_norm.bias, m.out_norm.eps)
    return (y * F.silu(z)) @ m.out_proj.weight.T


def test_ss2d_matches_written_out_reference():
    torch.manual_seed(0)
    m = SS2D(dim=6, d_state=3, ssm_ratio=1.5, d_conv=3).double()
    with torch.no_grad():
        for p in (m.out_norm.weight, m.out_norm.bias, m.conv2d.bias):
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 3, 5, 6, dtype=F64)
    torch.testing.assert_close(m(x), reference_ss2d(m, x), rtol=1e-9, atol=1e-10)


def test_ss2d_sees_every_pixel():
    """Four directions together give each output token a path from every input token (one scan would not)."""
    torch.manual_seed(1)
    m = SS2D(dim=8, d_state=4).double()
    x = torch.randn(1, 5, 7, 8, dtype=F64, requires_grad=True)
    m(x)[0, 2, 3].sum().backward()
    assert (x.grad[0].abs().sum(-1) > 0).all()


def test_ssm_initialisation():
    torch.manual_seed(2)
    m = SS2D(dim=32, d_state=16, ssm_ratio=2.0, dt_min=0.001, dt_max=0.1)
    d = m.d_inner
    assert m.dt_rank == 2
    torch.testing.assert_close(-torch.exp(m.A_logs), -torch.arange(1, 17.0).expand(4 * d, 16))
    torch.testing.assert_close(m.Ds, torch.ones(4 * d))
    dt = F.softplus(m.dt_projs_bias)
    assert dt.min() >= 0.001 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    # log-uniform: the mean of log dt sits halfway between log dt_min and log dt_max
    assert abs(dt.log().mean().item() - (math.log(0.001) + math.log(0.1)) / 2) < 0.3
    assert m.dt_projs_weight.abs().max() <= m.dt_rank**-0.5
    # The encoder's generic trunc-normal init must not overwrite these.
    enc = VMamba(dims=16, depths=(1, 1), d_state=4)
    op = enc.stages[0].blocks[0].op
    torch.testing.assert_close(op.A_logs, torch.arange(1, 5.0).log().expand_as(op.A_logs))
    assert enc.no_weight_decay() == {
        f"stages.{i}.blocks.0.op.{name}" for i in range(2) for name in ("A_logs", "Ds")
    }


@pytest.mark.parametrize("hw", [(64, 96), (37, 50)])
def test_vmamba_shapes_feature_info_and_gradients(hw):
    torch.manual_seed(3)
    enc = VMamba(dims=(16, 24, 32, 40), depths=(1, 1, 2, 1), d_state=4, mlp_ratio=2.0)
    assert enc.out_channels == [16, 24, 32, 40]
    assert [f["reduction"] for f in enc.feature_info] == [4, 8, 16, 32]
    x = torch.randn(2, 3, *hw)
    outs = enc(x)
    h, w = hw
    assert [tuple(o.shape) for o in outs] == [
        (2, c, math.ceil(h / r), math.ceil(w / r)) for c, r in zip(enc.out_channels, (4, 8, 16, 32))
    ]
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    unused = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not unused


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(4)
    enc = VMamba(dims=8, depths=(1, 2), d_state=2)
    x = torch.randn(1, 3, 32, 24)
    grads = []
    for ckpt in (False, True):
        enc.zero_grad()
        enc.set_grad_checkpointing(ckpt)
        sum(o.square().sum() for o in enc(x)).backward()
        grads.append([p.grad.clone() for p in enc.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert all(s.grad_checkpointing for s in VMamba(dims=8, depths=(1, 1), grad_checkpointing=True).stages)


def test_presets_register_and_match_vmamba_v0():
    from seglstm.models.registry import create_encoder

    with torch.device("meta"):  # structure and sizes only
        enc = create_encoder("vmamba_t", drop_path_rate=0.0)
        small = create_encoder("vmamba_s")
    assert [len(s.blocks) for s in enc.stages] == [2, 2, 9, 2]
    assert enc.out_channels == [96, 192, 384, 768]
    # VMamba-T (v0) is reported at 22M parameters.
    assert 21.5e6 < sum(p.numel() for p in enc.parameters()) < 22.5e6
    assert [len(s.blocks) for s in small.stages] == [2, 2, 27, 2]
    with pytest.raises(ValueError, match="pretrained"):
        create_encoder("vmamba_t", pretrained=True)
