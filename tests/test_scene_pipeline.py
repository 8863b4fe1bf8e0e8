"""The scene pipeline on the model's device: blending against a float64 reference over random scenes and
settings, only uint8 results crossing to the host, and the reader and writer threads (errors reach the
caller, nothing is left half-written, a resumed run gives the same bytes)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import rasterio
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from seglstm.inference.scene import BLOCK, NODATA, SceneError, ScenePredictor, window_weight
from seglstm.inference.scene.background import Prefetcher, Writer
from seglstm.inference.scene.outputs import PartialRun
from seglstm.inference.scene.plan import WEIGHT_FLOOR
from seglstm.inference.scene.source import SceneInput
from tests.scene_helpers import MEAN3, STD3, U3, RuleModel, read, run, write_tif

T4 = [255.5, 510.5, 765.5]
LOW, HIGH = 100.0, 3000.0  # --scale range:LOW,HIGH for the uint16 scenes


class WindowLinearModel(nn.Module):
    """Logits ``W x + c + a * mean(window)``: a random pixel-wise rule plus a per-window term, so that
    overlapping windows disagree and every output pixel is a true blend of the windows covering it."""

    def __init__(self, w: np.ndarray, c: np.ndarray, a: np.ndarray) -> None:
        super().__init__()
        self.conv = nn.Conv2d(w.shape[1], w.shape[0], 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.from_numpy(w).view(*w.shape, 1, 1))
            self.conv.bias.copy_(torch.from_numpy(c))
        self.register_buffer("a", torch.from_numpy(a).float().view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.a * x.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)


def _origins(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    return [min(i * stride, length - tile) for i in range(-(-(length - tile) // stride) + 1)]


def _reference(path, model: WindowLinearModel, tile: int, overlap: int, floor: float = WEIGHT_FLOOR):
    """The scene read whole with rasterio (masks from GDAL), scaled and normalised, every window of the
    slide grid through the model's formula and blended over the whole scene, all in float64."""
    with rasterio.open(path) as src:
        raw, masks, valid = src.read().astype(np.float64), src.read_masks() > 0, src.dataset_mask() > 0
    h, w = raw.shape[1:]
    x = np.clip((raw - LOW) * 255.0 / (HIGH - LOW), 0, 255)
    x = (x - np.array(MEAN3)[:, None, None]) / np.array(STD3)[:, None, None]
    x[~(masks & valid[None])] = 0.0
    wm = model.conv.weight.detach().double().numpy()[:, :, 0, 0]
    cb, a = model.conv.bias.detach().double().numpy(), model.a.double().numpy().reshape(-1)
    th, tw = min(tile, h), min(tile, w)
    weight = window_weight(th, tw, floor).astype(np.float64)
    acc, wsum = np.zeros((len(cb), h, w)), np.zeros((h, w))
    for y in _origins(h, th, tile - overlap):
        for x0 in _origins(w, tw, tile - overlap):
            if not valid[y : y + th, x0 : x0 + tw].any():
                continue  # an all-nodata window is not run
            xw = x[:, y : y + th, x0 : x0 + tw]
            z = np.einsum("kc,chw->khw", wm, xw) + cb[:, None, None] + a[:, None, None] * xw.mean()
            p = np.exp(z - z.max(axis=0))
            acc[:, y : y + th, x0 : x0 + tw] += p / p.sum(axis=0) * weight
            wsum[y : y + th, x0 : x0 + tw] += weight
    probs = np.divide(acc, wsum, out=np.zeros_like(acc), where=wsum > 0)
    return probs, valid


@pytest.mark.parametrize(
    ("h", "w", "tile", "overlap", "strip_width", "batch_size"),
    [(300, 457, 128, 32, BLOCK, 3), (300, 457, 128, 32, None, 2), (190, 530, 96, 40, 2 * BLOCK, 4),
     (260, 200, 300, 0, None, 1), (520, 300, 160, 64, BLOCK, 5)],
)  # fmt: skip
def test_device_blend_matches_a_float64_reference(tmp_path, rng, h, w, tile, overlap, strip_width, batch_size):
    k = 5
    raw = rng.integers(0, 4096, (3, h, w)).astype(np.uint16)
    raw[:, : h // 3, : w // 4] = 0  # all-nodata corner: some windows are skipped, their pixels are nodata
    raw[1, rng.random((h, w)) < 0.05] = 0  # band-level holes: the band's value is replaced by the mean
    raw[:, :, w // 2 :] //= 3  # window means differ across the scene
    src = write_tif(tmp_path / "in.tif", raw, nodata=0)
    model = WindowLinearModel(rng.normal(0, 1.5, (k, 3)).astype(np.float32), rng.normal(0, 1, k).astype(np.float32),
                              rng.normal(0, 3, k).astype(np.float32))  # fmt: skip
    out, probs = tmp_path / "out.tif", tmp_path / "probs.tif"
    run(model, src, out, MEAN3, STD3, k, tile=tile, overlap=overlap, batch_size=batch_size, strip_width=strip_width,
        probs_path=probs, scale=f"range:{LOW},{HIGH}")  # fmt: skip
    classes, p8 = read(out)[0][0], read(probs)[0]

    ref, valid = _reference(src, model, tile, overlap)
    assert 0.05 < (~valid).mean() < 0.5
    expected_p8 = np.where(valid, np.rint(ref * 255), 0)
    assert np.abs(p8.astype(int) - expected_p8).max() <= 1  # float32 against float64 rounding
    assert (p8 == expected_p8).mean() > 0.99
    top2 = np.sort(ref, axis=0)[-2:]
    clear = (top2[1] - top2[0] > 1e-4) | ~valid
    assert clear.mean() > 0.99 and len(np.unique(classes[valid])) > 2
    np.testing.assert_array_equal(classes[clear], np.where(valid, ref.argmax(0), NODATA)[clear])


class _HostTransfers(TorchFunctionMode):
    """Every call that can bring a tensor to the host: ``cpu``, ``numpy``, ``tolist``, ``item``, and ``to``
    with a device (on a CPU run the host is the device, so ``to`` calls are recorded to be checked)."""

    def __init__(self) -> None:
        super().__init__()
        self.host: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        self.moves: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in {"cpu", "numpy", "tolist", "item"} and isinstance(args[0], torch.Tensor):
            self.host.append((name, args[0].dtype, tuple(args[0].shape)))
        if name == "to" and any(isinstance(v, (torch.device, str)) for v in (*args[1:], *kwargs.values())):
            self.moves.append((args[0].dtype, tuple(args[0].shape)))
        return func(*args, **kwargs)


@pytest.mark.parametrize("with_probs", [False, True])
def test_only_uint8_results_cross_to_the_host_once_per_chunk(tmp_path, rng, monkeypatch, with_probs):
    k, h, w = 5, 530, 600
    raw = rng.integers(0, 256, (3, h, w), dtype=np.uint8)
    src = write_tif(tmp_path / "in.tif", raw)
    model = WindowLinearModel(rng.normal(0, 1, (k, 3)).astype(np.float32), rng.normal(0, 1, k).astype(np.float32),
                              rng.normal(0, 1, k).astype(np.float32))  # fmt: skip
    spy, windows, batches = _HostTransfers(), ScenePredictor._run, ScenePredictor._batches

    def spied(self, *args, **kwargs):  # the window loop, not the set-up (the model digest reads the weights)
        with spy:
            return windows(self, *args, **kwargs)

    def spied_batches(self, *args, **kwargs):  # torch function modes are per thread: the reader's too
        with spy:
            yield from batches(self, *args, **kwargs)

    monkeypatch.setattr(ScenePredictor, "_run", spied)
    monkeypatch.setattr(ScenePredictor, "_batches", spied_batches)
    probs = tmp_path / "probs.tif" if with_probs else None
    result = run(model, src, tmp_path / "out.tif", MEAN3, STD3, k, tile=128, overlap=32, batch_size=3,
                 strip_width=BLOCK, probs_path=probs)  # fmt: skip
    chunks = -(-h // BLOCK) * result.strips
    assert result.tiles > 2 * chunks  # more windows than chunks: a per-window transfer would show
    assert {dtype for _, dtype, _ in spy.host} == {torch.uint8}, spy.host
    assert sum(name == "cpu" for name, _, _ in spy.host) == chunks * (2 if with_probs else 1)
    # what moves to the device: the raw inputs (uint8) and masks, per batch, and the 2-D blending weight once
    assert {dtype for dtype, _ in spy.moves} == {torch.uint8, torch.bool, torch.float32}, spy.moves
    assert [shape for dtype, shape in spy.moves if dtype == torch.float32] == [(128, 128)]
    assert sum(dtype == torch.uint8 for dtype, _ in spy.moves) == -(-result.tiles // 3)


def _scene_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name in {"scene-reader", "scene-writer"}]


@pytest.mark.parametrize("where", ["reader", "writer"])
def test_a_thread_error_reaches_the_caller_and_the_run_resumes_to_the_same_bytes(tmp_path, rng, monkeypatch, where):
    raw = rng.integers(0, 256, (3, 700, 300), dtype=np.uint8)
    src = write_tif(tmp_path / "in.tif", raw, nodata=0)
    kw = dict(tile=128, overlap=32, batch_size=3, strip_width=BLOCK)
    ref = tmp_path / "ref"
    run(RuleModel(U3, MEAN3, STD3, T4), src, ref / "classes.tif", MEAN3, STD3, 4, probs_path=ref / "probs.tif", **kw)

    calls = {"n": 0}
    if where == "reader":
        original, error = SceneInput.read, SceneError("in.tif: reading window failed: the disk went away")

        def failing(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] > 6:  # in strip 0, after some block rows were flushed
                raise error
            return original(self, *args, **kwargs)

        monkeypatch.setattr(SceneInput, "read", failing)
    else:
        original, error = PartialRun.save_chunk, OSError(28, "No space left on device")

        def failing(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] > 3:
                time.sleep(0.2)  # the main thread is well ahead when the error comes
                raise error
            return original(self, *args, **kwargs)

        monkeypatch.setattr(PartialRun, "save_chunk", failing)
    got = tmp_path / "run"
    with pytest.raises(type(error)) as caught:
        run(RuleModel(U3, MEAN3, STD3, T4), src, got / "classes.tif", MEAN3, STD3, 4, probs_path=got / "probs.tif",
            **kw)  # fmt: skip
    assert caught.value is error and not _scene_threads()
    assert sorted(p.name for p in got.iterdir()) == [".classes.tif.partial"]  # no half-written product
    monkeypatch.undo()

    resumed = RuleModel(U3, MEAN3, STD3, T4)
    result = run(resumed, src, got / "classes.tif", MEAN3, STD3, 4, probs_path=got / "probs.tif", resume=True, **kw)
    assert result.resumed_from_tile > 0 and resumed.calls < -(-result.tiles // 3)
    for name in ("classes.tif", "probs.tif"):
        assert (got / name).read_bytes() == (ref / name).read_bytes(), name


def test_interrupt_stops_both_threads(tmp_path, rng):
    raw = rng.integers(0, 256, (3, 700, 300), dtype=np.uint8)
    src = write_tif(tmp_path / "in.tif", raw)
    with pytest.raises(KeyboardInterrupt):
        run(RuleModel(U3, MEAN3, STD3, T4, interrupt_after=5), src, tmp_path / "o.tif", MEAN3, STD3, 4, tile=128,
            overlap=32, batch_size=3, strip_width=BLOCK)  # fmt: skip
    assert not _scene_threads()


def test_prefetcher_stays_bounded_ahead_and_hands_errors_over():
    produced = []

    def produce():
        for i in range(50):
            produced.append(i)
            yield i

    with Prefetcher(produce, depth=2) as items:
        it = iter(items)
        assert next(it) == 0
        time.sleep(0.3)
        assert len(produced) <= 1 + 2 + 1  # the item taken, the queue's two and one waiting for room
    assert not _scene_threads()  # leaving early stops the thread

    def broken():
        yield 1
        raise ValueError("window 2 is unreadable")

    with pytest.raises(ValueError, match="window 2"), Prefetcher(broken) as items:
        assert list(items)
    assert not _scene_threads()


def test_writer_runs_jobs_in_order_and_fails_the_next_submit():
    done = []
    with Writer(depth=1) as writer:
        for i in range(20):
            writer.submit(lambda i=i: done.append(i))
    assert done == list(range(20))

    def boom():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"), Writer(depth=1) as writer:
        writer.submit(boom)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # a later submit raises the job's error
            writer.submit(lambda: done.append("after"))
            time.sleep(0.01)
    assert "after" not in done[20:]

    with pytest.raises(KeyboardInterrupt), Writer(depth=2) as writer:  # queued jobs still run on the way out
        writer.submit(lambda: (time.sleep(0.1), done.append("queued")))
        writer.submit(lambda: done.append("queued too"))
        raise KeyboardInterrupt
    assert done[-2:] == ["queued", "queued too"] and not _scene_threads()


def test_model_digest_is_reused_until_a_weight_changes(tmp_path, rng, monkeypatch):
    from seglstm.inference.scene import predictor as predictor_module
    from tests.scene_helpers import palette

    calls = []
    digest = predictor_module._model_digest
    monkeypatch.setattr(predictor_module, "_model_digest", lambda m: calls.append(1) or digest(m))
    src = write_tif(tmp_path / "in.tif", rng.integers(0, 256, (3, 64, 80), dtype=np.uint8))
    model = RuleModel(U3, MEAN3, STD3, T4)
    pred = ScenePredictor(model, MEAN3, STD3, [f"c{i}" for i in range(4)], palette(4), tile=64, overlap=16,
                          device="cpu", precision="fp32", progress=False)  # fmt: skip
    first = pred.model_digest()
    pred.predict(src, tmp_path / "a.tif")
    pred.predict(src, tmp_path / "b.tif")
    assert len(calls) == 1 and pred.model_digest() == first
    with torch.no_grad():
        model.score.weight[0, 0] += 1e-3  # in place: the tensor's version counter moves
    assert pred.model_digest() != first and len(calls) == 2
    model.load_state_dict(RuleModel(U3, MEAN3, STD3, T4).state_dict())  # copied in place: back to the original
    assert pred.model_digest() == first and len(calls) == 3
