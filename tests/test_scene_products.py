"""Scene products beyond the class GeoTIFF (polygons, COG) and the georeferencing / nodata / grid options,
each checked against an independent reference (whole-raster polygonisation, block statistics, a warped
read done here)."""

from __future__ import annotations

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import torch
from rasterio.control import GroundControlPoint
from rasterio.features import shapes
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform

from seglstm.inference.scene import NODATA, InputOptions, SceneError, VectorSpec
from seglstm.inference.scene.plan import default_tile, model_patch_size
from tests.scene_helpers import (
    CRS,
    MEAN3,
    STD3,
    T4,
    TRANSFORM,
    U3,
    RuleModel,
    read,
    rule_reference,
    run,
    write_tif,
)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(4321)


pytestmark = pytest.mark.usefixtures("one_thread")


def regions(rng, shape, count=3, noise=6.0) -> np.ndarray:
    """Smooth fields plus noise: the rule model turns them into regions of every size, many crossing
    256-row strip borders, with some speckle."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    phases = rng.uniform(0, 2 * np.pi, (count, 2))
    fields = [np.sin(xx / 37.0 + a) * np.cos(yy / 53.0 + b) for a, b in phases]
    speckle = rng.normal(0, noise, (count, *shape))
    return np.clip(np.stack(fields) * 110 + 128 + speckle, 1, 255).astype(np.uint8)


def polygons_of(path) -> tuple[np.ndarray, np.ndarray, list]:
    info = pyogrio.read_info(path)
    _, _, geometry, fields = pyogrio.raw.read(path)
    names = list(info["fields"])
    return fields[names.index("class_id")], fields[names.index("class_name")], shapely.from_wkb(geometry)


def reference_polygons(classes: np.ndarray, transform) -> list[tuple[int, shapely.Geometry]]:
    """The whole class raster polygonised at once: no strips, nothing to merge."""
    return [(int(v), shapely.geometry.shape(g)) for g, v in
            shapes(classes, mask=classes != NODATA, connectivity=4, transform=transform)]


def key(cls, geom):
    c = geom.centroid
    return (cls, round(geom.area, 3), round(c.x, 3), round(c.y, 3))


# ------------------------------------------------------------------------------------------- polygons
def test_polygons_merge_across_strips_exactly_and_match_pixel_areas(tmp_path, rng):
    raw = regions(rng, (700, 530))
    raw[:, 300:420, 50:200] = 0  # nodata crossing a strip border
    src = write_tif(tmp_path / "in.tif", raw, nodata=0)
    out, vec = tmp_path / "classes.tif", tmp_path / "classes.gpkg"
    names = ["water", "field", "forest", "urban"]
    result = run(RuleModel(U3, MEAN3, STD3, T4), src, out, MEAN3, STD3, 4, tile=128, overlap=32,
                 vector=VectorSpec(vec, strip_rows=256), classes=names)
    classes = read(out)[0][0]
    ids, cls_names, geoms = polygons_of(vec)
    assert result.polygons == len(geoms) and pyogrio.read_info(vec)["crs"] == CRS
    assert all(cls_names[i] == names[ids[i]] for i in range(len(ids)))

    pixel_area = abs(TRANSFORM.determinant)
    for k in range(4):
        pixels = (classes == k).sum()
        assert pixels > 1000
        area = shapely.area(geoms[ids == k]).sum()
        assert abs(area - pixels * pixel_area) <= 1e-3 * pixels * pixel_area
        assert area == pytest.approx(pixels * pixel_area, rel=1e-12)  # exact without simplification
    # no seams: the strip-merged layer is the whole raster's polygonisation, polygon for polygon
    ref = sorted(reference_polygons(classes, TRANSFORM), key=lambda t: key(*t))
    got = sorted(zip(ids.tolist(), geoms), key=lambda t: key(*t))
    assert len(got) == len(ref) > 50
    tall = [g for _, g in ref if g.bounds[3] - g.bounds[1] > 256 * 0.5]  # taller than a strip
    assert tall
    for (gc, gg), (rc, rg) in zip(got, ref):
        assert gc == rc and shapely.equals(gg, rg)


def test_coverage_simplification(tmp_path, rng):
    raw = regions(rng, (600, 400), noise=1.5)
    src = write_tif(tmp_path / "in.tif", raw)
    out = tmp_path / "classes.tif"
    exact, simple = (tmp_path / f"{n}.gpkg" for n in ("exact", "simple"))
    model = RuleModel(U3, MEAN3, STD3, T4)
    run(model, src, out, MEAN3, STD3, 4, tile=128, overlap=32, vector=VectorSpec(exact, strip_rows=256))
    run(model, src, out, MEAN3, STD3, 4, tile=128, overlap=32,
        vector=VectorSpec(simple, simplify=1.0, strip_rows=256, batch_vertices=3000))
    _, _, g_exact = polygons_of(exact)
    _, _, g_simple = polygons_of(simple)
    areas = shapely.area(g_exact)
    assert len(g_simple) == len(g_exact)
    n_exact = shapely.get_num_coordinates(g_exact)
    big = n_exact > 40  # staircase outlines (same order in both layers); speckle squares cannot get simpler
    whole = tmp_path / "whole.gpkg"  # one batch: every shared edge simplified
    run(model, src, out, MEAN3, STD3, 4, tile=128, overlap=32,
        vector=VectorSpec(whole, simplify=1.0, strip_rows=256))
    _, _, g_whole = polygons_of(whole)
    assert shapely.get_num_coordinates(g_whole)[big].sum() < 0.5 * n_exact[big].sum()
    assert shapely.coverage_is_valid(g_whole)
    assert shapely.is_valid(g_simple).all()
    # still a coverage: no overlaps, no gaps (the union's area is the sum of the areas, and the total)
    assert shapely.coverage_is_valid(g_simple)
    total = shapely.area(g_simple).sum()
    assert total == pytest.approx(areas.sum(), rel=1e-9)
    assert shapely.union_all(g_simple).area == pytest.approx(total, rel=1e-9)


def test_vector_format_errors_name_the_option(tmp_path, rng):
    src = write_tif(tmp_path / "in.tif", regions(rng, (64, 64)))
    model = RuleModel(U3, MEAN3, STD3, T4)
    with pytest.raises(SceneError, match=r"--vector .*\.shp: unknown format"):
        run(model, src, tmp_path / "o.tif", MEAN3, STD3, 4, vector=tmp_path / "o.shp")
    if "Parquet" not in pyogrio.list_drivers(write=True):
        with pytest.raises(SceneError, match=r"--vector .*cannot write Parquet"):
            run(model, src, tmp_path / "o.tif", MEAN3, STD3, 4, vector=tmp_path / "o.parquet")
    assert not (tmp_path / "o.tif").exists()


# ------------------------------------------------------------------------------------------------ COG
def test_cog_is_valid_with_mode_and_average_overviews(tmp_path, rng):
    raw = regions(rng, (900, 700))
    raw[:, :40] = 0
    src = write_tif(tmp_path / "in.tif", raw, nodata=0)
    plain, cog = tmp_path / "plain.tif", tmp_path / "cog.tif"
    kw = dict(tile=128, overlap=32)
    model = RuleModel(U3, MEAN3, STD3, T4)
    run(model, src, plain, MEAN3, STD3, 4, probs_path=tmp_path / "pp.tif", **kw)
    run(model, src, cog, MEAN3, STD3, 4, probs_path=tmp_path / "cp.tif", cog=True, **kw)
    for path, ref in ((cog, plain), (tmp_path / "cp.tif", tmp_path / "pp.tif")):
        with rasterio.open(path) as ds, rasterio.open(ref) as rs:
            assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"  # GDAL's COG layout marker
            assert ds.profile["tiled"] and ds.block_shapes[0] == (256, 256)
            assert ds.overviews(1) == [2, 4] and ds.crs == rs.crs and ds.transform == rs.transform
            np.testing.assert_array_equal(ds.read(), rs.read())
            full, ov = ds.read(), ds.read(out_shape=(ds.count, 450, 350))  # the 2x overview
            if ds.count == 1:
                assert ds.colormap(1)[1] == rs.colormap(1)[1] and ds.nodata == NODATA
                blocks = full[0].reshape(450, 2, 350, 2).transpose(0, 2, 1, 3).reshape(450, 350, 4)
                counts = np.stack([(blocks == v).sum(-1) for v in range(256)], -1)
                # mode: the overview's value is one of the most frequent values of its 2x2 block
                chosen = np.take_along_axis(counts, ov[0][..., None].astype(int), -1)[..., 0]
                assert (chosen == counts.max(-1)).all()
            else:
                mask = ds.read_masks(1).reshape(450, 2, 350, 2).transpose(0, 2, 1, 3).reshape(450, 350, 4) > 0
                blocks = full.reshape(4, 450, 2, 350, 2).transpose(0, 1, 3, 2, 4).reshape(4, 450, 350, 4)
                mean = (blocks * mask).sum(-1) / np.maximum(mask.sum(-1), 1)
                inside = mask.all(-1)
                assert np.abs(ov[:, inside].astype(float) - mean[:, inside]).max() <= 1.0  # average


# ----------------------------------------------------------------------------- georeference and nodata
def test_gcps_are_copied_instead_of_refused(tmp_path, rng):
    raw = regions(rng, (200, 260))
    gcps = [GroundControlPoint(0, 0, 10.0, 50.0), GroundControlPoint(0, 260, 10.01, 50.0),
            GroundControlPoint(200, 0, 10.0, 49.99), GroundControlPoint(200, 260, 10.012, 49.991)]
    path = tmp_path / "gcp.tif"
    with rasterio.open(path, "w", driver="GTiff", height=200, width=260, count=3, dtype="uint8",
                       gcps=gcps, crs="EPSG:4326") as dst:
        dst.write(raw)
    with rasterio.open(path) as ds:
        assert ds.crs is None and len(ds.gcps[0]) == 4
    for allow in (False, True):
        out = tmp_path / f"out{allow}.tif"
        run(RuleModel(U3, MEAN3, STD3, T4), path, out, MEAN3, STD3, 4, tile=128, overlap=32, allow_no_crs=allow,
            cog=allow)
        with rasterio.open(out) as ds:
            got, gcp_crs = ds.gcps
            assert gcp_crs == rasterio.crs.CRS.from_epsg(4326)
            assert [(g.row, g.col, g.x, g.y) for g in got] == [(g.row, g.col, g.x, g.y) for g in gcps]
            np.testing.assert_array_equal(ds.read(1), rule_reference(raw, U3, T4))
    with pytest.raises(SceneError, match=r"--vector .*GCPs only"):
        run(RuleModel(U3, MEAN3, STD3, T4), path, tmp_path / "v.tif", MEAN3, STD3, 4, tile=128, overlap=32,
            vector=tmp_path / "v.gpkg")
    # as the error says: warped onto a grid (GDAL's GCP transformer), polygons can be written
    result = run(RuleModel(U3, MEAN3, STD3, T4), path, tmp_path / "w.tif", MEAN3, STD3, 4, tile=128, overlap=32,
                 vector=tmp_path / "w.gpkg", input_options=InputOptions(dst_crs="EPSG:32632"))
    with rasterio.open(tmp_path / "w.tif") as ds:
        assert ds.crs == rasterio.crs.CRS.from_epsg(32632) and not ds.gcps[0]
    assert result.polygons > 0 and pyogrio.read_info(tmp_path / "w.gpkg")["crs"] == "EPSG:32632"


def test_all_nodata_scene_works_under_the_default_scaling(tmp_path):
    src = write_tif(tmp_path / "in.tif", np.zeros((3, 100, 140), np.uint16), nodata=0)
    out = tmp_path / "out.tif"
    run(RuleModel(U3, MEAN3, STD3, T4), src, out, MEAN3, STD3, 4, tile=64, overlap=16,
        vector=tmp_path / "v.gpkg")
    assert (read(out)[0] == NODATA).all()
    assert pyogrio.read_info(tmp_path / "v.gpkg")["features"] == 0


def test_nodata_override_masks_pixels_where_every_band_has_it(tmp_path, rng):
    raw = rng.integers(0, 256, (3, 150, 170), dtype=np.uint8)
    raw[:, 20:60, 30:90] = 7
    raw[0, 100:120, :] = 7  # one band only: still valid, that band fed as its mean
    src = write_tif(tmp_path / "in.tif", raw)
    out = tmp_path / "out.tif"
    run(RuleModel(U3, MEAN3, STD3, T4), src, out, MEAN3, STD3, 4, tile=64, overlap=16,
        input_options=InputOptions(nodata=7))
    fed = np.where(raw == 7, np.asarray(MEAN3)[:, None, None], raw)
    expected = rule_reference(fed, U3, T4)
    expected[(raw == 7).all(0)] = NODATA
    np.testing.assert_array_equal(read(out)[0][0], expected)


def test_reprojection_writes_the_requested_grid(tmp_path, rng):
    raw = regions(rng, (300, 280))
    src = write_tif(tmp_path / "in.tif", raw)
    out = tmp_path / "out.tif"
    dst_crs = "EPSG:32632"  # the neighbouring UTM zone: a rotated grid with empty corners
    run(RuleModel(U3, MEAN3, STD3, T4), src, out, MEAN3, STD3, 4, tile=128, overlap=32,
        input_options=InputOptions(dst_crs=dst_crs, resolution=(0.75, 0.75)))
    with rasterio.open(src) as ds:
        transform, width, height = calculate_default_transform(
            ds.crs, dst_crs, ds.width, ds.height, *ds.bounds, resolution=(0.75, 0.75))
        # gdalwarp -tr rounds the suggested extent to whole pixels where rasterio rounds up
        suggested, sw, sh = calculate_default_transform(ds.crs, dst_crs, ds.width, ds.height, *ds.bounds)
        assert (width, height) == (201, 213)
        width, height = int(sw * suggested.a / 0.75 + 0.5), int(-sh * suggested.e / 0.75 + 0.5)
        assert (width, height) == (200, 212)
        with WarpedVRT(ds, crs=dst_crs, transform=transform, width=width, height=height,
                       resampling=rasterio.enums.Resampling.bilinear, add_alpha=True) as vrt:
            warped, alpha = vrt.read([1, 2, 3]), vrt.read(4)
    classes, info = read(out)
    assert info["crs"] == rasterio.crs.CRS.from_string(dst_crs) and info["transform"] == transform
    assert info["shape"] == (height, width) != (300, 280)
    expected = rule_reference(warped, U3, T4)
    expected[alpha == 0] = NODATA
    assert (alpha == 0).mean() > 0.01
    assert (classes[0] == expected).mean() > 0.999


# ------------------------------------------------------------------------------------------- tiling
def test_default_tile_follows_slide_settings_then_training_crop():
    import seglstm

    model = seglstm.create_model("seglstm_fcn_t", num_classes=3, img_size=64, patch_size=8, depths=[1, 1, 1, 1])
    assert model_patch_size(model) == 8
    assert default_tile(model, {"mode": "whole"})[:2] == (64, 16)
    assert default_tile(model, {"mode": "slide", "crop_size": [96, 96], "stride": [64, 64]})[:2] == (96, 32)
    assert default_tile(torch.nn.Conv2d(3, 3, 1), None)[:2] == (1024, 256)


class PatchRuleModel(RuleModel):
    patch_size = 8  # what the CLI reads from an encoder


@pytest.fixture
def fake_loader(monkeypatch):
    from seglstm.inference import loading

    def load_segmentor(ckpt_path, config_path=None, map_location="cpu", unsafe=False):
        meta = dict(classes=["a", "b", "c", "d"], palette=[(i * 40, 0, 0) for i in range(4)], mean=MEAN3,
                    std=STD3, num_classes=4, test_cfg={"mode": "slide", "crop_size": [96, 96], "stride": [64, 64]})
        return PatchRuleModel(U3, MEAN3, STD3, T4), meta

    monkeypatch.setattr(loading, "load_segmentor", load_segmentor)


def test_cli_tiling_choice_is_printed_and_tiny_tiles_refused(tmp_path, rng, fake_loader, capsys, caplog):
    from seglstm.cli.main import main as seglstm

    raw = regions(rng, (300, 270))
    src = write_tif(tmp_path / "in.tif", raw)
    out = tmp_path / "out.tif"
    base = ["predict-scene", "--ckpt", "m.ckpt", str(src), str(out), "--device", "cpu", "--quiet",
            "--precision", "fp32"]
    assert seglstm([*base, "--tile", "7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--tile 7 is below the model's patch size 8" in err
    assert seglstm([*base, "--min-area", "3"]) == 2
    assert "--vector" in capsys.readouterr().err
    with caplog.at_level("INFO"):
        assert seglstm([*base, "--cog", "--vector", str(tmp_path / "v.gpkg"), "--min-area", "0.5"]) == 0
    assert "tile 96, overlap 32: the run config's slide inference (crop 96, stride 64)" in caplog.text
    np.testing.assert_array_equal(read(out)[0][0], rule_reference(raw, U3, T4))
    _, _, geoms = polygons_of(tmp_path / "v.gpkg")
    assert len(geoms) and shapely.area(geoms).min() >= 0.5


def test_interrupted_products_leave_nothing_and_resume_completes_them(tmp_path, rng, monkeypatch):
    from seglstm.inference.scene import predictor as predictor_module

    raw = regions(rng, (300, 260))
    src = write_tif(tmp_path / "in.tif", raw)
    out, vec, probs = tmp_path / "c.tif", tmp_path / "c.gpkg", tmp_path / "p.tif"
    kw = dict(tile=128, overlap=32, cog=True, probs_path=probs, vector=VectorSpec(vec, strip_rows=256))
    real = predictor_module.write_vector

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(predictor_module, "write_vector", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(RuleModel(U3, MEAN3, STD3, T4), src, out, MEAN3, STD3, 4, **kw)
    assert not vec.exists() and (tmp_path / ".c.tif.partial" / "progress.json").is_file()
    monkeypatch.setattr(predictor_module, "write_vector", real)
    again = RuleModel(U3, MEAN3, STD3, T4)
    result = run(again, src, out, MEAN3, STD3, 4, resume=True, **kw)
    assert again.calls == 0 and result.resumed_from_tile == result.tiles  # only the products were redone
    np.testing.assert_array_equal(read(out)[0][0], rule_reference(raw, U3, T4))
    assert pyogrio.read_info(vec)["features"] == result.polygons > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.gpkg", "c.tif", "c.tif.aux.xml", "in.tif", "p.tif"]


def test_cli_input_options_are_parsed_and_checked():
    from seglstm.cli.predict_scene import _input_options, build_parser

    parse = build_parser().parse_args
    opts = _input_options(parse(["in.json", "o.tif", "--ckpt", "m", "--assets", "red, green,blue", "--nodata", "0",
                                 "--dst-crs", "EPSG:3857", "--resolution", "2"]))
    assert opts == InputOptions(("red", "green", "blue"), 0.0, "EPSG:3857", (2.0, 2.0))
    assert _input_options(parse(["i", "o", "--ckpt", "m", "--asset", "visual"])).assets == ("visual",)
    with pytest.raises(SceneError, match="--asset and --assets"):
        _input_options(parse(["i", "o", "--ckpt", "m", "--asset", "a", "--assets", "b,c"]))
    with pytest.raises(SceneError, match="--resolution"):
        _input_options(parse(["i", "o", "--ckpt", "m", "--resolution", "1", "2", "3"]))
    with pytest.raises(SystemExit):  # a checkpoint or an ONNX model, exactly one
        parse(["i", "o", "--ckpt", "m", "--onnx", "m.onnx"])
