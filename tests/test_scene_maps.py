"""Map-ready scene products: no seams along window edges, a minimum mapping unit without holes, RFC 7946
GeoJSON, gdalwarp's output grids (``-tr``, ``-tap``), GCP scenes warped by GDAL's GCP transformer, STAC
assets by the single-file nodata rule and on different grids, and class names as GDAL category names.
Each is checked against an independent reference (rasterio / GDAL doing the same thing, shapely,
hand-computed values)."""

from __future__ import annotations

import json
import logging
import threading
import xml.etree.ElementTree as ET
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.shutil
import shapely
import torch
from rasterio.control import GroundControlPoint
from rasterio.enums import Resampling
from rasterio.features import sieve
from rasterio.vrt import WarpedVRT
from rasterio.warp import aligned_target, calculate_default_transform, reproject, transform_geom
from torch import nn

from seglstm.inference.scene import (
    NODATA,
    InputOptions,
    SceneError,
    VectorSpec,
    open_input,
    plan_tiles,
    window_weight,
)
from seglstm.inference.scene.source import warp_grid
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

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(2468)


def smooth_scene(rng, shape, count=3, noise=4.0) -> np.ndarray:
    """Smooth random fields plus noise: class regions of every size and curved boundaries."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    a, b, c = rng.uniform(0, 2 * np.pi, 3)
    field = np.sin(xx / 41 + a) * np.cos(yy / 57 + b) + 0.5 * np.sin((xx + yy) / 23 + c)
    return np.clip(128 + 100 * field[None] + rng.normal(0, noise, (count, *shape)), 1, 255).astype(np.uint8)


def polygons(path) -> tuple[np.ndarray, np.ndarray]:
    info = pyogrio.read_info(path)
    _, _, geometry, fields = pyogrio.raw.read(path)
    return fields[list(info["fields"]).index("class_id")], shapely.from_wkb(geometry)


# ------------------------------------------------------------------------------------------- seams
class WindowBiasModel(nn.Module):
    """A weak model whose answer depends on the window: logit difference ``alpha * s + beta * sin(997 m)``
    with ``s`` the pixel's mean band and ``m`` the window's mean, a pseudo-random offset per window. Its
    class boundaries move from window to window, which a blend with a weight step at window edges turns
    into straight boundaries along those edges."""

    def __init__(self, alpha: float, beta: float) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(1, keepdim=True)
        m = x.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
        d = self.alpha * s + self.beta * torch.sin(997.0 * m)
        return torch.cat([-d, d], 1)


def seam_ratio(classes: np.ndarray, tile: int, overlap: int) -> float:
    """Class changes per line across window-edge lines over those across all other lines (rows and
    columns; line ``x`` lies between pixels ``x - 1`` and ``x``)."""
    h, w = classes.shape
    grid = plan_tiles(h, w, tile, overlap)
    sums = np.zeros((2, 2))  # [edge, other] x [changes, lines]
    for changes, origins, size, n in (
        ((classes[:, 1:] != classes[:, :-1]).sum(0), grid.xs, grid.tile_w, w),
        ((classes[1:] != classes[:-1]).sum(1), grid.ys, grid.tile_h, h),
    ):
        edge = np.zeros(n - 1, bool)
        for o in origins:
            for line in (o, o + size):
                if 0 < line < n:
                    edge[line - 1] = True
        sums += [[changes[edge].sum(), edge.sum()], [changes[~edge].sum(), (~edge).sum()]]
    return (sums[0, 0] / sums[0, 1]) / (sums[1, 0] / sums[1, 1])


def test_default_weight_falls_to_near_zero_at_edges_and_centres_dominate():
    for n in (64, 128, 1024):
        w = window_weight(n, n).astype(np.float64)
        hann = 1e-3 + (1 - 1e-3) * np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2
        np.testing.assert_allclose(w, np.outer(hann, hann), rtol=1e-6)
        assert w.min() > 0 and w[0].max() < 2e-3 and w[n // 2, n // 2] > 0.99
        assert (w[n // 4 : 3 * n // 4, n // 4 : 3 * n // 4] >= 0.25).all()  # the centre half dominates


def test_no_seams_along_window_edges_at_the_default_weights(tmp_path, rng):
    raw = smooth_scene(rng, (480, 480))
    src = write_tif(tmp_path / "in.tif", raw)
    ratios = {}
    for floor in (0.1, None):
        out = tmp_path / f"c{floor}.tif"
        kw = {} if floor is None else {"weight_floor": floor}
        run(WindowBiasModel(0.5, 1.0), src, out, MEAN3, STD3, 2, tile=64, overlap=16, **kw)
        classes = read(out)[0][0]
        assert 0.3 < classes.mean() < 0.7  # both classes, many boundaries
        ratios[floor] = seam_ratio(classes, 64, 16)
    assert ratios[0.1] > 2.0, ratios  # the old floor: class boundaries pile up on window edges
    # the default: no excess on window edges (a window hands over inside the overlap, not on its edge)
    assert 0.5 < ratios[None] < 1.1, ratios


# ------------------------------------------------------------------------------- minimum mapping unit
def sieved_reference(classes: np.ndarray, unit: int) -> np.ndarray:
    """The whole class raster sieved at once (GDAL, 4-connected, nodata excluded), then what has no valid
    neighbour to merge into (islands in nodata below the unit) set to nodata."""
    valid = classes != NODATA
    out = sieve(classes, unit, mask=valid, connectivity=4)
    islands = sieve(valid.astype(np.uint8), unit, connectivity=4)  # small valid components flip to 0
    out[(islands == 0) & valid] = NODATA
    return out


@pytest.mark.parametrize("simplify", [0.0, 1.0])
def test_min_area_merges_small_regions_without_holes(tmp_path, rng, simplify):
    raw = smooth_scene(rng, (700, 380), noise=12.0)  # speckle: many regions below the unit
    raw[:, 300:420, 40:200] = 0  # nodata crossing a strip border
    raw[:, 350:353, 100:103] = 200  # a 9-pixel island inside it, below the unit: nothing to merge into
    src = write_tif(tmp_path / "in.tif", raw, nodata=0)
    out, vec = tmp_path / "classes.tif", tmp_path / "v.gpkg"
    pixel_area = abs(TRANSFORM.determinant)
    unit = 30
    min_area = unit * pixel_area
    run(RuleModel(U3, MEAN3, STD3, T4), src, out, MEAN3, STD3, 4, tile=128, overlap=32,
        vector=VectorSpec(vec, min_area=min_area, simplify=simplify, strip_rows=256, batch_vertices=20_000))
    classes = read(out)[0][0]
    ref = sieved_reference(classes, unit)
    ids, geoms = polygons(vec)
    areas = shapely.area(geoms)
    assert len(geoms) > 20 and areas.min() >= min_area * (1 - 1e-12)
    assert shapely.is_valid(geoms).all() and (simplify == 0 or shapely.coverage_is_valid(geoms))
    # no holes or gaps: the union covers exactly the valid area the sieve leaves (the island is gone)
    union = shapely.union_all(geoms)
    valid_area = (ref != NODATA).sum() * pixel_area
    assert union.area == pytest.approx(valid_area, rel=1e-9) and areas.sum() == pytest.approx(valid_area, rel=1e-9)
    assert (ref[350:353, 100:103] == NODATA).all() and (classes[350:353, 100:103] != NODATA).all()
    # regions below the unit existed and were merged, not dropped
    labels_before = len(list(rasterio.features.shapes(classes, mask=classes != NODATA, connectivity=4)))
    assert labels_before > 3 * len(geoms)
    for k in range(4):
        expected = (ref == k).sum() * pixel_area
        got = areas[ids == k].sum()
        if simplify == 0:
            assert got == pytest.approx(expected, rel=1e-12), k  # exactly the whole-raster sieve
        else:
            assert got == pytest.approx(expected, rel=0.05), k


def test_cli_help_and_errors_of_the_map_options(tmp_path, rng, capsys):
    from seglstm.cli.main import main as seglstm
    from seglstm.cli.predict_scene import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "minimum mapping unit" in text and "--tap" in text and "--asset-grid" in text and "RFC 7946" in text
    src = write_tif(tmp_path / "in.tif", smooth_scene(rng, (40, 40)))
    assert seglstm(["predict-scene", "--ckpt", "missing.ckpt", str(src), str(tmp_path / "o.tif"), "--tap"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--tap snaps the output bounds to the resolution: add --resolution" in err
    with pytest.raises(SceneError, match="--min-area and --simplify must not be negative"):
        VectorSpec(tmp_path / "v.gpkg", min_area=-1).check()


# ------------------------------------------------------------------------------------------ GeoJSON
def test_geojson_is_rfc7946_wgs84_right_handed_without_crs(tmp_path, rng):
    raw = smooth_scene(rng, (300, 200), noise=8.0)
    src = write_tif(tmp_path / "in.tif", raw)
    gpkg, geojson = tmp_path / "v.gpkg", tmp_path / "v.geojson"
    model = RuleModel(U3, MEAN3, STD3, T4)
    for path in (gpkg, geojson):  # small batches: the GeoJSON layer is appended to several times
        run(model, src, tmp_path / "c.tif", MEAN3, STD3, 4, tile=128, overlap=32,
            vector=VectorSpec(path, strip_rows=256, batch_vertices=2000))
    doc = json.loads(geojson.read_text())
    assert "crs" not in doc and doc["type"] == "FeatureCollection"
    ids, projected = polygons(gpkg)
    features = doc["features"]
    assert len(features) == len(projected) > 50
    # the same polygons as the projected layer's, reprojected by GDAL (rasterio.warp.transform_geom)
    refs = transform_geom(CRS, "EPSG:4326", [shapely.geometry.mapping(g) for g in projected])
    for feature, cls, ref in zip(features, ids, refs):
        assert feature["properties"]["class_id"] == cls
        rings = feature["geometry"]["coordinates"]
        lon, lat = np.array(rings[0]).T
        assert (14 < lon).all() and (lon < 16).all() and (37 < lat).all() and (lat < 39).all()
        assert shapely.LinearRing(rings[0]).is_ccw and not any(shapely.LinearRing(r).is_ccw for r in rings[1:])
        got = shapely.geometry.shape(feature["geometry"])
        assert shapely.hausdorff_distance(got, shapely.geometry.shape(ref)) < 1e-7
    holes = sum(len(f["geometry"]["coordinates"]) > 1 for f in features)
    assert holes > 0  # interior rings were checked too


def test_geojson_without_a_crs_is_refused_before_inference(tmp_path, rng):
    src = write_tif(tmp_path / "in.tif", smooth_scene(rng, (100, 90)), crs=None)
    model = RuleModel(U3, MEAN3, STD3, T4)
    with pytest.raises(SceneError, match=r"--vector .*v\.geojson: GeoJSON holds WGS84 .* write \.gpkg instead"):
        run(model, src, tmp_path / "c.tif", MEAN3, STD3, 4, allow_no_crs=True, vector=tmp_path / "v.geojson")
    assert model.calls == 0


# ------------------------------------------------------------------------------------------- grids
def gdalwarp_size(extent: float, res: float) -> int:
    """gdalwarp's pixel count for ``-tr``: ``(int)((max - min + res / 2) / res)`` (apps/gdalwarp_lib.cpp)."""
    return int((extent + res / 2) / res)


@pytest.mark.parametrize(("dst_crs", "res"), [(None, 0.65), ("EPSG:32632", 0.75), ("EPSG:3857", 1.3)])
def test_resolution_and_tap_give_gdalwarps_grid(dst_crs, res):
    src_crs, width, height = rasterio.crs.CRS.from_string(CRS), 280, 300
    bounds = rasterio.transform.array_bounds(height, width, TRANSFORM)
    dst = rasterio.crs.CRS.from_user_input(dst_crs or CRS)
    suggested, sw, sh = calculate_default_transform(src_crs, dst, width, height, *bounds)
    transform, w, h = warp_grid(src_crs, dst, width, height, bounds=bounds, resolution=(res, res))
    rio_t, rio_w, rio_h = calculate_default_transform(src_crs, dst, width, height, *bounds, resolution=(res, res))
    assert transform == rio_t  # same origin and pixel size as rasterio
    assert (w, h) == (gdalwarp_size(sw * suggested.a, res), gdalwarp_size(-sh * suggested.e, res))
    assert (rio_w - w, rio_h - h) in {(0, 0), (1, 0), (0, 1), (1, 1)}  # rasterio rounds up
    if dst_crs is None:  # the source grid itself: 140 m x 150 m at 0.65 m is 215.4 x 230.8 pixels
        assert suggested == TRANSFORM and (w, h) == (215, 231) and (rio_w, rio_h) == (216, 231)
    tap, tw, th = warp_grid(src_crs, dst, width, height, bounds=bounds, resolution=(res, res), tap=True)
    ref_t, ref_w, ref_h = aligned_target(suggested, sw, sh, (res, res))
    assert tap.almost_equals(ref_t, precision=1e-9)  # the snapped bounds of rasterio's aligned_target
    # aligned_target's ceil turns float noise in the snapped extent (an integer number of pixels) into one
    # more pixel; gdalwarp's + res / 2 does not
    assert tw in (ref_w, ref_w - 1) and th in (ref_h, ref_h - 1)
    right, bottom = suggested.c + sw * suggested.a, suggested.f + sh * suggested.e
    snapped_w = (np.ceil(right / res) - np.floor(suggested.c / res))
    snapped_h = (np.ceil(suggested.f / res) - np.floor(bottom / res))
    assert (tw, th) == (int(snapped_w), int(snapped_h))
    assert abs(tap.c / res - round(tap.c / res)) < 1e-6 and abs(tap.f / res - round(tap.f / res)) < 1e-6


def test_tap_output_grid_and_its_errors(tmp_path, rng):
    raw = smooth_scene(rng, (200, 180))
    src = write_tif(tmp_path / "in.tif", raw)
    out = tmp_path / "c.tif"
    run(RuleModel(U3, MEAN3, STD3, T4), src, out, MEAN3, STD3, 4, tile=64, overlap=16,
        input_options=InputOptions(resolution=(0.7, 0.7), tap=True))
    info = read(out)[1]
    bounds = rasterio.transform.array_bounds(200, 180, TRANSFORM)
    t, w, h = aligned_target(*calculate_default_transform(CRS, CRS, 180, 200, *bounds), (0.7, 0.7))
    assert info["transform"].almost_equals(t, precision=1e-9) and info["shape"][1] == w
    assert info["shape"][0] in (h, h - 1)  # aligned_target's ceil may add a row (see above)
    assert abs(t.f / 0.7 - round(t.f / 0.7)) < 1e-9 and abs(t.c / 0.7 - round(t.c / 0.7)) < 1e-9
    with pytest.raises(SceneError, match=r"--tap .*add --resolution"):
        run(RuleModel(U3, MEAN3, STD3, T4), src, out, MEAN3, STD3, 4, input_options=InputOptions(tap=True))


# ------------------------------------------------------------------------------------------- GCPs
def write_gcp_scene(path, raw):
    h, w = raw.shape[1:]
    gcps = [GroundControlPoint(0, 0, 10.0, 50.0), GroundControlPoint(0, w, 10.01, 50.0005),
            GroundControlPoint(h, 0, 9.9995, 49.99), GroundControlPoint(h, w, 10.0105, 49.9904)]
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=raw.shape[0], dtype="uint8",
                       gcps=gcps, crs="EPSG:4326") as dst:
        dst.write(raw)
    with rasterio.open(path) as ds:
        return ds.gcps[0]  # as GDAL stores them (z = 0)


def test_gcp_scene_reprojects_like_gdal_and_refuses_polygons_before_inference(tmp_path, rng):
    raw = smooth_scene(rng, (200, 260))
    path = tmp_path / "gcp.tif"
    gcps = write_gcp_scene(path, raw)
    dst_crs, res = "EPSG:32632", (4.0, 4.0)
    out = tmp_path / "c.tif"
    run(RuleModel(U3, MEAN3, STD3, T4), path, out, MEAN3, STD3, 4, tile=64, overlap=16,
        input_options=InputOptions(dst_crs=dst_crs, resolution=res))
    classes, info = read(out)
    gcp_crs = rasterio.crs.CRS.from_epsg(4326)
    transform, w, h = warp_grid(gcp_crs, dst_crs, 260, 200, gcps=gcps, resolution=res)
    suggested, sw, sh = calculate_default_transform(gcp_crs, dst_crs, 260, 200, gcps=gcps)
    assert (w, h) == (gdalwarp_size(sw * suggested.a, 4.0), gdalwarp_size(-sh * suggested.e, 4.0))
    assert info["transform"] == transform and info["shape"] == (h, w)
    assert info["crs"] == rasterio.crs.CRS.from_string(dst_crs)
    # the reference: rasterio.warp.reproject with the GCPs onto the same grid (the values are >= 1, so 0
    # marks pixels no source pixel reaches)
    warped = np.zeros((3, h, w), np.uint8)
    reproject(raw, warped, gcps=gcps, src_crs=gcp_crs, dst_crs=dst_crs, dst_transform=transform,
              resampling=Resampling.bilinear, dst_nodata=0)
    covered = (warped > 0).all(0)
    with open_input(path, InputOptions(dst_crs=dst_crs, resolution=res)) as source:  # the pixels themselves
        pixels, _, valid = source.read([1, 2, 3])
    both = valid & covered
    assert both.sum() > 0.97 * covered.sum() and (~valid & covered).mean() < 0.01
    assert np.abs(pixels[:, both].astype(int) - warped[:, both]).max() <= 1
    assert (pixels[:, both] == warped[:, both]).mean() > 0.99
    expected = rule_reference(warped, U3, T4)
    got = classes[0]
    assert 0.5 < covered.mean() < 0.98  # a rotated footprint: not all nodata, not all data
    inside = covered & (got != NODATA)
    assert inside.sum() > 0.97 * covered.sum() and (got[~covered] == NODATA).mean() > 0.97
    assert (got[inside] == expected[inside]).mean() > 0.995

    model = RuleModel(U3, MEAN3, STD3, T4)
    with pytest.raises(SceneError, match=r"--vector .*GCPs only .*add --dst-crs"):
        run(model, path, tmp_path / "v.tif", MEAN3, STD3, 4, tile=64, overlap=16, vector=tmp_path / "v.gpkg")
    assert model.calls == 0 and not (tmp_path / "v.tif").exists()


# ------------------------------------------------------------------------------------------- STAC
def write_item(path, assets: dict) -> None:
    item = {"type": "Feature", "stac_version": "1.0.0", "id": "scene", "stac_extensions": [], "geometry": None,
            "properties": {"datetime": "2024-05-01T10:00:00Z"}, "links": [],
            "assets": {name: {"href": href, "type": "image/tiff"} for name, href in assets.items()}}
    path.write_text(json.dumps(item))


def test_stac_nodata_follows_the_single_file_rule(tmp_path, rng):
    raw = rng.integers(1, 256, (3, 150, 170), dtype=np.uint8)
    raw[0, 10:40, 20:60] = 0  # nodata in one band only: valid, that band fed as its mean
    raw[:2, 60:80, :] = 0  # in two bands
    raw[:, 100:120, 30:90] = 0  # in every band: nodata
    single = tmp_path / "scene.tif"
    write_tif(single, raw, nodata=0)
    for i, name in enumerate(("red", "green", "blue")):
        write_tif(tmp_path / f"{name}.tif", raw[i : i + 1], nodata=0)
    write_item(tmp_path / "item.json", {n: f"./{n}.tif" for n in ("red", "green", "blue")})
    model = RuleModel(U3, MEAN3, STD3, T4)
    run(model, single, tmp_path / "single.tif", MEAN3, STD3, 4, tile=64, overlap=16)
    run(model, tmp_path / "item.json", tmp_path / "stac.tif", MEAN3, STD3, 4, tile=64, overlap=16,
        input_options=InputOptions(assets=("red", "green", "blue")))
    a, b = read(tmp_path / "single.tif")[0][0], read(tmp_path / "stac.tif")[0][0]
    np.testing.assert_array_equal(a, b)
    expected = rule_reference(np.where(raw == 0, np.asarray(MEAN3)[:, None, None], raw), U3, T4)
    expected[(raw == 0).all(0)] = NODATA
    np.testing.assert_array_equal(b, expected)
    assert (b == NODATA).sum() == 20 * 60


def test_dropped_bands_are_named(tmp_path, rng, caplog):
    raw = rng.integers(1, 256, (4, 80, 90), dtype=np.uint8)
    write_tif(tmp_path / "bgrn.tif", raw)
    for i, name in enumerate(("red", "green", "blue", "nir")):
        write_tif(tmp_path / f"{name}.tif", raw[i : i + 1])
    write_item(tmp_path / "item.json", {n: f"./{n}.tif" for n in ("red", "green", "blue", "nir")})
    model = RuleModel(U3, MEAN3, STD3, T4)
    with caplog.at_level(logging.WARNING):
        run(model, tmp_path / "bgrn.tif", tmp_path / "a.tif", MEAN3, STD3, 4)
        run(model, tmp_path / "item.json", tmp_path / "b.tif", MEAN3, STD3, 4,
            input_options=InputOptions(assets=("red", "green", "blue", "nir")))
    lines = [r.getMessage() for r in caplog.records if "dropping" in r.getMessage()]
    assert len(lines) == 2
    assert "has 4 bands and the model takes 3: using bands 1, 2, 3 and dropping 4; choose others with --bands" in lines[0]
    assert "dropping 4 (asset nir)" in lines[1] and "1 (asset red)" in lines[1]


def test_stac_assets_on_different_grids_are_resampled_onto_the_chosen_one(tmp_path, rng, caplog):
    raw = smooth_scene(rng, (160, 200))
    for i, name in enumerate(("red", "green")):
        write_tif(tmp_path / f"{name}.tif", raw[i : i + 1])
    coarse = raw[2:3].reshape(1, 80, 2, 100, 2).mean((2, 4)).round().astype(np.uint8)  # a 20 m band
    coarse_path = tmp_path / "swir.tif"
    with rasterio.open(coarse_path, "w", driver="GTiff", height=80, width=100, count=1, dtype="uint8", crs=CRS,
                       transform=TRANSFORM @ rasterio.Affine.scale(2)) as dst:
        dst.write(coarse)
    write_item(tmp_path / "item.json", {"red": "./red.tif", "swir": "./swir.tif", "green": "./green.tif"})
    model = RuleModel(U3, MEAN3, STD3, T4)
    with caplog.at_level(logging.WARNING):
        run(model, tmp_path / "item.json", tmp_path / "fine.tif", MEAN3, STD3, 4, tile=64, overlap=16,
            input_options=InputOptions(assets=("red", "swir", "green")))
    assert any("swir resampled (bilinear) onto the 200x160 grid of asset red" in r.getMessage() for r in caplog.records)
    classes, info = read(tmp_path / "fine.tif")
    assert info["transform"] == TRANSFORM and info["shape"] == (160, 200)
    with rasterio.open(coarse_path) as ds, WarpedVRT(ds, crs=CRS, transform=TRANSFORM, width=200, height=160,
                                                      resampling=Resampling.bilinear) as vrt:
        swir = vrt.read(1)
    expected = rule_reference(np.stack([raw[0], swir, raw[1]]), U3, T4)
    assert (classes[0] == expected).mean() > 0.999
    run(model, tmp_path / "item.json", tmp_path / "coarse.tif", MEAN3, STD3, 4, tile=64, overlap=16,
        input_options=InputOptions(assets=("red", "swir", "green"), grid_asset="swir"))
    info = read(tmp_path / "coarse.tif")[1]
    assert info["transform"] == TRANSFORM @ rasterio.Affine.scale(2) and info["shape"] == (80, 100)
    with pytest.raises(SceneError, match=r"--asset-grid nir: not among the stacked assets \(red, swir, green\)"):
        run(model, tmp_path / "item.json", tmp_path / "x.tif", MEAN3, STD3, 4,
            input_options=InputOptions(assets=("red", "swir", "green"), grid_asset="nir"))
    with pytest.raises(SceneError, match=r"--asset-grid chooses among stacked STAC assets: add --assets"):
        run(model, tmp_path / "red.tif", tmp_path / "x.tif", MEAN3, STD3, 4,
            input_options=InputOptions(grid_asset="red"))


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    root = tmp_path / "www"
    root.mkdir()
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_remote_items_local_asset_is_refused(tmp_path, rng, http_root):
    root, url = http_root
    local = write_tif(tmp_path / "secret.tif", rng.integers(1, 256, (3, 40, 40), dtype=np.uint8))
    write_item(root / "item.json", {"visual": local.as_uri()})
    with pytest.raises(SceneError, match=rf"STAC item {url}/item\.json: asset visual points to a local file"):
        run(RuleModel(U3, MEAN3, STD3, T4), f"{url}/item.json", tmp_path / "x.tif", MEAN3, STD3, 4,
            input_options=InputOptions(assets=("visual",)))
    assert not (tmp_path / "x.tif").exists()


# ------------------------------------------------------------------------------------ category names
@pytest.mark.parametrize("cog", [False, True])
def test_class_names_are_gdal_category_names(tmp_path, rng, cog):
    src = write_tif(tmp_path / "in.tif", smooth_scene(rng, (120, 100)))
    out = tmp_path / "classes.tif"
    names = ["water", "field", "forest & scrub", "urban <dense>"]
    run(RuleModel(U3, MEAN3, STD3, T4), src, out, MEAN3, STD3, 4, tile=64, overlap=16, cog=cog, classes=names)
    # read back through GDAL: its VRT serialisation lists the band's category names as GDAL sees them
    rasterio.shutil.copy(out, tmp_path / "view.vrt", driver="VRT")
    band = ET.parse(tmp_path / "view.vrt").find("VRTRasterBand")
    assert [c.text for c in band.find("CategoryNames")] == names
    with rasterio.open(out) as ds:
        assert json.loads(ds.tags()["classes"]) == names and ds.colormap(1)[0][3] == 255
        if cog:
            assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"


def test_simplification_never_takes_a_polygon_below_the_unit():
    from seglstm.inference.scene.vector import _simplify_above

    yy, xx = np.mgrid[:40, :40]
    raster = np.where((xx - 20) ** 2 + (yy - 20) ** 2 < 30, 1, np.where(xx > 34, 2, 0)).astype(np.uint8)
    found = list(rasterio.features.shapes(raster, connectivity=4))
    geoms = shapely.segmentize(np.array([shapely.geometry.shape(g) for g, _ in found], dtype=object), 1.0)
    disc = [v for _, v in found].index(1)
    unit = float((raster == 1).sum())  # 97 pixels: exactly the disc
    assert shapely.area(geoms[disc]) == unit
    plain = _simplify_above(geoms, 3.0, 0.0)  # what coverage simplification alone does: cuts the disc
    assert shapely.area(plain[disc]) < unit - 10
    kept = _simplify_above(geoms, 3.0, unit)
    assert shapely.equals(kept[disc], geoms[disc])  # its pixel outline, so exactly the unit
    assert (shapely.area(kept) >= unit).all() and shapely.coverage_is_valid(kept)
    assert shapely.area(kept).sum() == pytest.approx(40 * 40, rel=1e-12)
    others = [i for i in range(len(geoms)) if i != disc]
    # the rest is still simplified: fewer vertices than the pixel outlines
    assert shapely.get_num_coordinates(kept[others]).sum() < shapely.get_num_coordinates(geoms[others]).sum()
