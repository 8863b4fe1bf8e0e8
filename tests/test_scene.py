"""Whole-scene inference on GeoTIFFs written here, with toy segmentors whose answer is known per pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from torch import nn

from seglstm.inference.scene import (
    BLOCK,
    NODATA,
    ScaleSpec,
    SceneError,
    ScenePredictor,
    compute_scaling,
    open_input,
    parse_scale,
    plan_strips,
    plan_tiles,
    window_weight,
)
from seglstm.inference.scene import predictor as predictor_module
from seglstm.inference.scene.plan import WEIGHT_FLOOR
from tests.scene_helpers import (
    CRS,
    MEAN3,
    STD3,
    T4,
    TRANSFORM,
    U3,
    ConstModel,
    RuleModel,
    TileMeanModel,
    palette,
    read,
    rule_reference,
    run,
    write_tif,
)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- planning
def test_tile_grid_matches_mmseg_slide_and_covers_scene(rng):
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 900, 2))
        tile = int(rng.integers(16, 300))
        overlap = int(rng.integers(0, tile))
        grid = plan_tiles(h, w, tile, overlap)
        stride = tile - overlap
        for length, t, origins in ((h, grid.tile_h, grid.ys), (w, grid.tile_w, grid.xs)):
            assert t == min(tile, length)
            n = max(length - t + stride - 1, 0) // stride + 1  # mmseg's h_grids / w_grids
            assert origins == tuple(min(i * stride, length - t) for i in range(n))
            covered = np.zeros(length, bool)
            for o in origins:
                covered[o : o + t] = True
            assert covered.all() and origins[-1] + t == length


def test_strips_are_block_aligned_and_hold_every_touching_window():
    grid = plan_tiles(300, 1337, 128, 32)
    strips = plan_strips(grid, 2 * BLOCK)
    assert [(s.x0, s.x1) for s in strips] == [(0, 512), (512, 1024), (1024, 1337)]
    for s in strips:
        touching = [c for c, x in enumerate(grid.xs) if not (x + 128 <= s.x0 or x >= s.x1)]
        assert list(s.cols) == touching
    with pytest.raises(SceneError, match="multiple of 256"):
        plan_strips(grid, 300)


def test_window_weight_is_a_floored_separable_hann():
    w = window_weight(4, 6, floor=0.1).astype(np.float64)
    sin2 = lambda n: np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2  # noqa: E731
    np.testing.assert_allclose(w, np.outer(0.1 + 0.9 * sin2(4), 0.1 + 0.9 * sin2(6)), rtol=1e-6)
    assert w[0, 0] == pytest.approx((0.1 + 0.9 * np.sin(np.pi / 8) ** 2) * (0.1 + 0.9 * np.sin(np.pi / 12) ** 2))
    big = window_weight(128, 128, floor=0.05)
    assert big.min() > 0.05**2 * 0.99 and big.max() <= 1.0
    np.testing.assert_array_equal(big, big[::-1, ::-1])


def test_parse_scale_errors_name_the_option():
    assert parse_scale("percentile:2,98") == ScaleSpec("percentile", 2.0, 98.0)
    assert parse_scale("range:0,4095") == ScaleSpec("range", 0.0, 4095.0)
    for bad in ("percentile:98,2", "range:a,b", "gamma:1,2", "percentile:-1,50"):
        with pytest.raises(SceneError, match="--scale"):
            parse_scale(bad)


# ---------------------------------------------------------------------------------------- exact rules
@pytest.mark.parametrize("strip_width", [None, BLOCK])
def test_rule_model_gives_the_rule_everywhere_with_nodata_and_georeference(tmp_path, rng, strip_width):
    raw = rng.integers(0, 256, (3, 300, 457), dtype=np.uint8)
    raw[:, 40:90, 100:260] = 0  # a nodata block crossing window borders, besides the random zeros
    src = write_tif(tmp_path / "in.tif", raw, nodata=0)
    out, probs = tmp_path / "out" / "classes.tif", tmp_path / "out" / "probs.tif"
    model = RuleModel(U3, MEAN3, STD3, T4)
    result = run(model, src, out, MEAN3, STD3, 4, tile=128, overlap=32, batch_size=3, strip_width=strip_width,
                 probs_path=probs)
    assert result.strips == (2 if strip_width else 1) and result.tiles == (3 * 5 if not strip_width else 3 * 6)

    classes, info = read(out)
    # GDAL's dataset mask: nodata only where every band is 0; a band that is 0 at a valid pixel has no
    # value there and reaches the model as its mean
    fed = np.where(raw == 0, np.asarray(MEAN3)[:, None, None], raw)
    expected = rule_reference(fed, U3, T4)
    invalid = (raw == 0).all(axis=0)
    expected[invalid] = NODATA
    np.testing.assert_array_equal(classes[0], expected)
    assert invalid.sum() >= 50 * 160 and len(np.unique(expected[~invalid])) == 4
    assert ((raw == 0).any(axis=0) & ~invalid).sum() > 1000  # pixels the old any-band rule dropped
    assert info["crs"] == rasterio.crs.CRS.from_string(CRS) and info["transform"] == TRANSFORM
    assert info["shape"] == (300, 457) and info["nodata"] == NODATA
    prof = info["profile"]
    assert prof["tiled"] and (prof["blockxsize"], prof["blockysize"]) == (BLOCK, BLOCK)
    assert prof["compress"] == "deflate" and prof["dtype"] == "uint8"
    assert [info["colormap"][i][:3] for i in range(4)] == palette(4)
    with rasterio.open(probs) as ds:
        prob, prob_mask = ds.read(), ds.read_masks(1)
    np.testing.assert_array_equal(prob_mask, np.where(invalid, 0, 255))
    assert (prob[:, invalid] == 0).all() and (prob[:, ~invalid].argmax(0) == expected[~invalid]).all()
    # no temp left; the sidecar names the categories
    assert sorted(p.name for p in out.parent.iterdir()) == ["classes.tif", "classes.tif.aux.xml", "probs.tif"]


@pytest.mark.parametrize(
    ("shape", "count", "bands", "u"),
    [((1000, 1337), 1, None, [3]), ((301, 455), 4, [4, 2, 1], [1, 1, 2]), ((257, 513), 4, None, [1, 0, 1, 1])],
)
def test_odd_sizes_and_band_selections(tmp_path, rng, shape, count, bands, u):
    raw = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
    mask = np.ones(shape, bool)
    mask[shape[0] // 3 : shape[0] // 2, : shape[1] // 4] = False  # nodata from the internal mask
    src = write_tif(tmp_path / "in.tif", raw, mask=mask)
    used = list(range(1, len(u) + 1)) if bands is None else bands
    mean, std = [100.0 + 7 * i for i in range(len(u))], [50.0 + 3 * i for i in range(len(u))]
    thresholds = [v * sum(u) + 0.5 for v in (60, 130, 200)]
    tile = 256 if shape[0] >= 1000 else 128
    out = tmp_path / "out.tif"
    run(RuleModel(u, mean, std, thresholds), src, out, mean, std, 4, bands=bands, tile=tile, overlap=tile // 4)
    expected = rule_reference(raw[[b - 1 for b in used]], u, thresholds)
    expected[~mask] = NODATA
    np.testing.assert_array_equal(read(out)[0][0], expected)


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_non_uint8_inputs_are_scaled_to_the_training_range(tmp_path, rng, dtype):
    shape = (200, 333)
    if dtype == "uint16":
        raw = rng.integers(0, 4096, (3, *shape)).astype(np.uint16)
        scale, nodata = "percentile:2,98", None
    else:
        raw = rng.normal(0.2, 0.1, (3, *shape)).astype(np.float32)
        raw[1, 50:70, 10:300] = np.nan
        scale, nodata = "range:-0.1,0.5", float("nan")
    src = write_tif(tmp_path / "in.tif", raw, nodata=nodata)
    valid = np.any(np.isfinite(raw), axis=0)  # GDAL's dataset mask: nodata only where every band is
    if dtype == "uint16":
        low, high = np.percentile(raw.reshape(3, -1).astype(np.float64), [2, 98], axis=1)
        with open_input(src) as ds:
            got = compute_scaling(ds, [1, 2, 3], parse_scale(scale))
        np.testing.assert_allclose(got, (low, high), rtol=1e-12)
    else:
        low, high = np.full(3, -0.1), np.full(3, 0.5)
    scaled = np.clip((raw.astype(np.float64) - low[:, None, None]) / (high - low)[:, None, None] * 255, 0, 255)
    out = tmp_path / "out.tif"
    run(RuleModel(U3, MEAN3, STD3, T4), src, out, MEAN3, STD3, 4, scale=scale, tile=128, overlap=32)
    fed = np.where(np.isfinite(scaled), scaled, np.asarray(MEAN3)[:, None, None])  # a NaN band: its mean
    expected = rule_reference(fed, U3, T4)
    expected[~valid] = NODATA
    s = np.tensordot(np.asarray(U3, np.float64), fed, axes=1)
    clear = np.abs(s[..., None] - np.asarray(T4)).min(-1) > 1e-2  # float32 may round the knife-edge ones
    assert clear.mean() > 0.99 and valid.all()
    assert (~np.isfinite(raw)).any(axis=0).sum() == (20 * 290 if dtype == "float32" else 0)
    np.testing.assert_array_equal(read(out)[0][0][clear | ~valid], expected[clear | ~valid])


# ------------------------------------------------------------------------------------------- blending
def test_constant_logits_reproduce_themselves_through_the_blend(tmp_path, rng):
    raw = rng.integers(1, 256, (3, 300, 457), dtype=np.uint8)
    logits = rng.normal(0, 2, 5)
    src = write_tif(tmp_path / "in.tif", raw)
    out, probs = tmp_path / "out.tif", tmp_path / "probs.tif"
    run(ConstModel(logits), src, out, MEAN3, STD3, 5, tile=128, overlap=32, probs_path=probs, strip_width=BLOCK)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    expected = np.rint(p * 255).astype(np.uint8)
    got, _ = read(probs)
    assert got.shape == (5, 300, 457)
    assert np.abs(got.astype(int) - expected[:, None, None]).max() <= 1  # float32 vs float64 rounding
    assert (got == expected[:, None, None]).mean() > 0.99
    assert (read(out)[0][0] == int(np.argmax(logits))).all()


def test_blend_equals_a_full_scene_float64_reference(tmp_path, rng):
    h, w, tile, overlap, floor = 300, 457, 128, 32, WEIGHT_FLOOR
    raw = rng.integers(0, 256, (3, h, w), dtype=np.uint8)
    raw[:, :, 200:] //= 3  # make window means differ a lot across the scene
    src = write_tif(tmp_path / "in.tif", raw)
    a, b = rng.normal(0, 3, 4), rng.normal(0, 1, 4)
    outputs = {}
    for strip_width in (None, BLOCK):
        out, probs = tmp_path / f"out{strip_width}.tif", tmp_path / f"probs{strip_width}.tif"
        run(TileMeanModel(a, b), src, out, MEAN3, STD3, 4, tile=tile, overlap=overlap, batch_size=2,
            probs_path=probs, strip_width=strip_width)
        outputs[strip_width] = read(out)[0][0], read(probs)[0]

    # independent reference: every window of the mmseg grid, blended over the whole scene in float64
    x = (raw.astype(np.float64) - np.array(MEAN3)[:, None, None]) / np.array(STD3)[:, None, None]
    acc, wsum = np.zeros((4, h, w)), np.zeros((h, w))
    hann = lambda n: floor + (1 - floor) * np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2  # noqa: E731
    weight = np.outer(hann(tile), hann(tile))
    stride = tile - overlap
    for y in (min(i * stride, h - tile) for i in range((h - tile + stride - 1) // stride + 1)):
        for x0 in (min(j * stride, w - tile) for j in range((w - tile + stride - 1) // stride + 1)):
            z = a * x[:, y : y + tile, x0 : x0 + tile].mean() + b
            p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            acc[:, y : y + tile, x0 : x0 + tile] += p[:, None, None] * weight
            wsum[y : y + tile, x0 : x0 + tile] += weight
    ref = acc / wsum
    for classes, probs in outputs.values():
        assert np.abs(probs.astype(int) - np.rint(ref * 255)).max() <= 1
        margin = np.sort(ref, axis=0)[-1] - np.sort(ref, axis=0)[-2]
        clear = margin > 1e-4
        assert clear.mean() > 0.99 and len(np.unique(classes)) > 1
        np.testing.assert_array_equal(classes[clear], ref.argmax(0)[clear])
    np.testing.assert_array_equal(outputs[None][0], outputs[BLOCK][0])


def test_model_digest_tells_weights_apart_and_handles_batchnorm_counters():
    from seglstm.inference.scene import _model_digest

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))  # num_batches_tracked is a 0-d int64
    twin = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    twin.load_state_dict(net.state_dict())
    assert _model_digest(net) == _model_digest(twin)
    with torch.no_grad():
        twin[0].weight[0, 0] += 1e-6
    assert _model_digest(net) != _model_digest(twin)
    twin.load_state_dict(net.state_dict())
    twin[1].num_batches_tracked += 1
    assert _model_digest(net) != _model_digest(twin)


# ---------------------------------------------------------------------------------------------- errors
def test_bad_inputs_give_errors_naming_the_file_or_argument(tmp_path, rng):
    raw = rng.integers(0, 256, (3, 64, 80), dtype=np.uint8)
    good = write_tif(tmp_path / "good.tif", raw)
    model = RuleModel(U3, MEAN3, STD3, T4)
    out = tmp_path / "out.tif"

    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(SceneError, match=r"garbage\.tif is not a readable raster"):
        run(model, garbage, out, MEAN3, STD3, 4)

    big = write_tif(tmp_path / "big.tif", rng.integers(0, 256, (3, 600, 600), dtype=np.uint8))
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    with pytest.raises(SceneError, match=r"truncated\.tif"):
        run(model, truncated, out, MEAN3, STD3, 4, tile=128, overlap=32)

    with pytest.raises(SceneError, match=r"input .*missing\.tif does not exist"):
        run(model, tmp_path / "missing.tif", out, MEAN3, STD3, 4)
    with pytest.raises(SceneError, match=r"--bands: band\(s\) \[4\] out of range; input .*good\.tif has 3"):
        run(model, good, out, MEAN3, STD3, 4, bands=[1, 2, 4])
    with pytest.raises(SceneError, match=r"--bands selects 2 band\(s\)"):
        run(model, good, out, MEAN3, STD3, 4, bands=[1, 2])
    with pytest.raises(SceneError, match=r"good\.tif has 3 band\(s\) but the model takes 4"):
        run(RuleModel([1, 1, 1, 1], [*MEAN3, 90], [*STD3, 40], T4), good, out, [*MEAN3, 90], [*STD3, 40], 4)

    no_crs = write_tif(tmp_path / "nocrs.tif", raw, crs=None)
    with pytest.raises(SceneError, match=r"nocrs\.tif has no CRS.*--allow-no-crs"):
        run(model, no_crs, out, MEAN3, STD3, 4)
    run(model, no_crs, out, MEAN3, STD3, 4, allow_no_crs=True)
    _, info = read(out)
    assert info["crs"] is None and info["transform"] == TRANSFORM

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(SceneError, match=r"output .*a_file/out\.tif: cannot create directory"):
        run(model, good, blocker / "out.tif", MEAN3, STD3, 4)
    with pytest.raises(SceneError, match="would overwrite the input"):
        run(model, good, good, MEAN3, STD3, 4)

    with pytest.raises(SceneError, match=r"4 classes as in the palette \(c0, c1, c2, c3\)"):
        run(RuleModel(U3, MEAN3, STD3, [255.5, 510.5]), good, tmp_path / "k.tif", MEAN3, STD3, 4)
    assert not (tmp_path / "k.tif").exists() and not (tmp_path / ".k.tif.partial").exists()
    with pytest.raises(SceneError, match="3 class names but 4 palette colours"):
        ScenePredictor(model, MEAN3, STD3, ["a", "b", "c"], palette(4))


# ---------------------------------------------------------------------------------- interrupt, resume
@pytest.mark.parametrize(("interrupt_after", "dtype"), [(4, "uint8"), (7, "uint16"), (9, "uint8")])
def test_interrupt_leaves_no_output_and_resume_is_byte_identical(tmp_path, rng, interrupt_after, dtype):
    # batches of 3 windows: a strip's row of windows per batch in strip 0 (21 windows), then 7 in strip 1;
    # 4 stops after rows 0..3 (rows 0..255 flushed), 7 at the strip border, 9 in strip 1 where the resumed
    # batch starts with two windows whose rows were already flushed
    raw = rng.integers(0, 256 if dtype == "uint8" else 4096, (3, 700, 300)).astype(dtype)
    src = write_tif(tmp_path / "in.tif", raw, nodata=0)
    kw = dict(tile=128, overlap=32, batch_size=3, strip_width=BLOCK)

    def outputs(d: Path) -> dict:
        return {"out": d / "classes.tif", "probs_path": d / "probs.tif", "preview_path": d / "preview.png"}

    ref, got = outputs(tmp_path / "ref"), outputs(tmp_path / "run")
    run(RuleModel(U3, MEAN3, STD3, T4), src, ref.pop("out"), MEAN3, STD3, 4, **ref, preview_size=100, **kw)

    final = got.pop("out")
    interrupted = RuleModel(U3, MEAN3, STD3, T4, interrupt_after=interrupt_after)
    with pytest.raises(KeyboardInterrupt):
        run(interrupted, src, final, MEAN3, STD3, 4, **got, preview_size=100, **kw)
    assert not any(p.exists() for p in (final, *got.values()))
    partial = final.parent / ".classes.tif.partial"
    assert (partial / "progress.json").is_file()
    assert not [p for p in final.parent.iterdir() if p.name != partial.name]  # only the partial run is left

    with pytest.raises(SceneError, match=r"--resume: .*different tile"):
        run(RuleModel(U3, MEAN3, STD3, T4), src, final, MEAN3, STD3, 4, **got, preview_size=100,
            resume=True, **{**kw, "tile": 96})
    resumed = RuleModel(U3, MEAN3, STD3, T4)
    result = run(resumed, src, final, MEAN3, STD3, 4, **got, preview_size=100, resume=True, **kw)
    total_batches = -(-result.tiles // 3)
    assert result.resumed_from_tile > 0 and resumed.calls < total_batches  # it did continue, not restart
    assert interrupted.calls + resumed.calls >= total_batches
    assert final.read_bytes() == (tmp_path / "ref" / "classes.tif").read_bytes()
    for key, path in got.items():
        assert path.read_bytes() == ref[key].read_bytes(), key
    assert sorted(p.name for p in final.parent.iterdir()) == [
        "classes.tif", "classes.tif.aux.xml", "preview.png", "probs.tif"]


def test_fresh_run_discards_a_stale_partial_run(tmp_path, rng):
    raw = rng.integers(0, 256, (3, 700, 300), dtype=np.uint8)
    src = write_tif(tmp_path / "in.tif", raw)
    out = tmp_path / "classes.tif"
    kw = dict(tile=128, overlap=32, batch_size=3, strip_width=BLOCK)
    with pytest.raises(KeyboardInterrupt):
        run(RuleModel(U3, MEAN3, STD3, T4, interrupt_after=5), src, out, MEAN3, STD3, 4, **kw)
    fresh = RuleModel(U3, MEAN3, STD3, T4)
    assert run(fresh, src, out, MEAN3, STD3, 4, **kw).resumed_from_tile == 0
    assert fresh.calls == -(-28 // 3)
    np.testing.assert_array_equal(read(out)[0][0], rule_reference(raw, U3, T4))


def test_resume_after_all_windows_only_assembles(tmp_path, rng, monkeypatch):
    raw = rng.integers(0, 256, (3, 300, 457), dtype=np.uint8)
    src = write_tif(tmp_path / "in.tif", raw)
    out = tmp_path / "classes.tif"
    kw = dict(tile=128, overlap=32, strip_width=BLOCK)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(predictor_module, "write_rasters", stop)
        with pytest.raises(KeyboardInterrupt):
            run(RuleModel(U3, MEAN3, STD3, T4), src, out, MEAN3, STD3, 4, **kw)
    assert not out.exists()
    again = RuleModel(U3, MEAN3, STD3, T4)
    result = run(again, src, out, MEAN3, STD3, 4, resume=True, **kw)
    assert again.calls == 0 and result.resumed_from_tile == result.tiles
    np.testing.assert_array_equal(read(out)[0][0], rule_reference(raw, U3, T4))


def test_preview_is_the_decimated_colour_coded_map(tmp_path, rng):
    raw = rng.integers(0, 256, (3, 300, 457), dtype=np.uint8)
    raw[:, :30] = 0
    src = write_tif(tmp_path / "in.tif", raw, nodata=0)
    out, preview = tmp_path / "out.tif", tmp_path / "preview.png"
    run(RuleModel(U3, MEAN3, STD3, T4), src, out, MEAN3, STD3, 4, preview_path=preview, preview_size=100,
        tile=128, overlap=32, strip_width=BLOCK)
    classes = read(out)[0][0][::5, ::5]  # ceil(457 / 100) = 5
    img = np.asarray(Image.open(preview))
    assert img.shape == (60, 92, 4)
    lut = np.array([(*c, 255) for c in palette(4)] + [(0, 0, 0, 0)] * 252, np.uint8)
    np.testing.assert_array_equal(img, lut[classes])


# ------------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def fake_loader(monkeypatch):
    """Stand in for ``load_segmentor`` with a rule model, to drive the CLI quickly."""
    from seglstm.inference import loading
    state = {"interrupt_after": None, "calls": []}

    def load_segmentor(ckpt_path, config_path=None, map_location="cpu", unsafe=False):
        state["calls"].append((ckpt_path, config_path, map_location, unsafe))
        model = RuleModel(U3, MEAN3, STD3, T4, interrupt_after=state["interrupt_after"])
        meta = dict(classes=["a", "b", "c", "d"], palette=palette(4), mean=MEAN3, std=STD3, num_classes=4,
                    test_cfg={"mode": "whole"})
        return model, meta

    monkeypatch.setattr(loading, "load_segmentor", load_segmentor)
    return state


def test_cli_runs_reports_errors_and_resumes(tmp_path, rng, fake_loader, capsys):
    from seglstm.cli.main import main as seglstm

    raw = rng.integers(0, 256, (4, 700, 300), dtype=np.uint8)
    src = write_tif(tmp_path / "in.tif", raw)
    out = tmp_path / "res" / "out.tif"
    base = ["predict-scene", "--ckpt", "m.pth", str(src), str(out), "--tile", "128", "--overlap", "32",
            "--batch-size", "3", "--device", "cpu", "--buffer-mb", "1", "--quiet", "--precision", "fp32", "--bands"]

    assert seglstm([*base, "1,2,9"]) == 2
    assert "--bands: band(s) [9] out of range" in capsys.readouterr().err
    base.append("4,2,3")
    assert seglstm([*base, "--scale", "percentile:5"]) == 2
    assert "--scale" in capsys.readouterr().err

    fake_loader["interrupt_after"] = 4
    assert seglstm([*base, "--probs", str(tmp_path / "res" / "p.tif")]) == 130
    assert "--resume" in capsys.readouterr().err and not out.exists()
    fake_loader["interrupt_after"] = None
    assert seglstm([*base, "--probs", str(tmp_path / "res" / "p.tif"), "--resume", "--unsafe-load"]) == 0
    assert fake_loader["calls"][-1] == ("m.pth", None, "cpu", True)
    np.testing.assert_array_equal(read(out)[0][0], rule_reference(raw[[3, 1, 2]], U3, T4))
    assert read(tmp_path / "res" / "p.tif")[0].shape == (4, 700, 300)


@pytest.mark.slow
def test_cli_with_a_real_checkpoint_matches_the_model_on_a_one_window_scene(tmp_path, rng):
    """The real loader end to end: on a scene that is exactly one window the blend is the identity, so the
    output must be the model's own argmax on the normalised image."""
    import seglstm
    from seglstm.cli.main import main as cli
    from seglstm.config import META_KEY

    classes, pal = ["background", "building", "road", "water"], palette(4)
    model = seglstm.create_model("seglstm_fcn_t", num_classes=4).eval()
    meta = dict(model="seglstm_fcn_t", model_kwargs={}, num_classes=4, classes=classes, palette=pal,
                mean=MEAN3, std=STD3, test_cfg={})
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), META_KEY: meta}, ckpt)
    raw = rng.integers(0, 256, (3, 96, 112), dtype=np.uint8)
    src = write_tif(tmp_path / "in.tif", raw)
    out = tmp_path / "out.tif"
    assert cli(["predict-scene", "--ckpt", str(ckpt), str(src), str(out), "--tile", "128", "--quiet",
                "--device", "cpu", "--precision", "fp32"]) == 0
    x = (torch.from_numpy(raw).float() - torch.tensor(MEAN3).view(3, 1, 1)) / torch.tensor(STD3).view(3, 1, 1)
    with torch.no_grad():
        expected = model(x[None]).argmax(1)[0].numpy()
    classes_out, info = read(out)
    np.testing.assert_array_equal(classes_out[0], expected)
    assert [info["colormap"][i][:3] for i in range(4)] == [tuple(c) for c in pal]
