"""Bad input to the ``scenes`` dataset gets one line naming the file and the fix; ``check-data`` on scenes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import shapely

from seglstm.data.io import DataError, DatasetNotFoundError
from seglstm.data.scenes import SceneDataset
from tests.scenes_data_helpers import (
    CLASSES,
    make_scene,
    pixels_to_crs,
    write_image,
    write_scenes_yaml,
    write_vector,
)


def build(folder: Path, scene: dict, subset: str = "train", crop=(16, 16), **top) -> SceneDataset:
    """The ``subset`` split of a one-scene ``scenes.yaml`` with top-level keys ``top``."""
    top.setdefault("split", {"val": 0.1, "test": 0.1, "block": 64})
    return SceneDataset(None, subset, write_scenes_yaml(folder, [scene], **top), crop_size=crop)


@pytest.fixture
def files(tmp_path, rng):
    image, labels, _, _ = make_scene(tmp_path, rng, height=128, width=160, n_polygons=40)
    return tmp_path, {"image": image.name, "labels": labels.name, "label_field": "class"}


def one_line(err: pytest.ExceptionInfo, *words: str) -> str:
    text = str(err.value)
    assert "\n" not in text
    for word in words:
        assert word in text, (word, text)
    return text


def test_missing_and_unreadable_image(files):
    folder, scene = files
    with pytest.raises(DataError) as err:
        build(folder, {**scene, "image": "nope.tif"})
    one_line(err, str(folder / "nope.tif"), "does not exist", "scenes file")
    (folder / "bad.tif").write_text("not a raster")
    with pytest.raises(DataError) as err:
        build(folder, {**scene, "image": "bad.tif"})
    one_line(err, "bad.tif", "not a readable raster")


def test_missing_and_unreadable_labels(files):
    folder, scene = files
    with pytest.raises(DataError) as err:
        build(folder, {**scene, "labels": "nope.gpkg"})
    one_line(err, str(folder / "nope.gpkg"), "does not exist", "scenes file")
    (folder / "bad.gpkg").write_text("garbage")
    with pytest.raises(DataError) as err:
        build(folder, {**scene, "labels": "bad.gpkg"})
    one_line(err, "bad.gpkg", "not a readable vector file")


def test_no_overlap_gives_both_extents_in_one_crs(files):
    folder, scene = files
    far = pixels_to_crs(shapely.box(0, 0, 50, 50).buffer(0), crs="EPSG:4326")
    far = shapely.affinity.translate(far, xoff=2.0)  # two degrees east of the image
    write_vector(folder / "far.gpkg", [far], ["road"])
    with pytest.raises(DataError) as err:
        build(folder, {**scene, "labels": "far.gpkg"})
    text = one_line(err, "far.gpkg", "no label overlaps the image", "EPSG:32633", "CRS")
    assert len(re.findall(r"\(([-\d.e+]+, ){3}[-\d.e+]+\)", text)) == 2  # both extents, four numbers each


def test_label_field_absent_and_unknown_class_values(files, rng):
    folder, scene = files
    with pytest.raises(DataError) as err:
        build(folder, {**scene, "label_field": "kind"})
    one_line(err, "label_field 'kind'", "['class']", "label_class")
    polys = [pixels_to_crs(shapely.box(10, 10, 60, 60)), pixels_to_crs(shapely.box(70, 10, 90, 60))]
    write_vector(folder / "odd.gpkg", polys, ["road", "forest"])
    with pytest.raises(DataError) as err:
        build(folder, {**scene, "labels": "odd.gpkg"})
    one_line(err, "odd.gpkg", "['forest']", "not in the class file")
    with pytest.raises(DataError) as err:
        build(folder, {**scene, "label_field": None, "label_class": "forest"})
    one_line(err, "label_class 'forest'", "not in the class file")


def test_empty_and_too_small_split_areas_and_crop_larger_than_an_area(files):
    folder, scene = files
    with pytest.raises(DataError) as err:
        build(folder, scene, "val", split={"val": 0.1, "test": 0.1, "block": 128})
    one_line(err, "scenes.yaml", "val split is empty", "split.block")
    write_vector(folder / "nowhere.gpkg", [pixels_to_crs(shapely.box(-500, -500, -400, -400))])
    with pytest.raises(DataError) as err:
        build(folder, {**scene, "areas": {"test": "nowhere.gpkg"}}, "test")
    one_line(err, "test split is empty", "areas.test")
    with pytest.raises(DataError) as err:
        build(folder, scene, crop=(200, 200))
    one_line(err, "scene.tif", "smaller than the crop", "crop_size")
    write_vector(folder / "train.gpkg", [pixels_to_crs(shapely.box(0, 0, 20, 20))])
    with pytest.raises(DataError) as err:
        build(folder, {**scene, "areas": {"train": "train.gpkg"}}, crop=(32, 32))
    one_line(err, "no training window of 32x32 fits", "crop_size")


def test_stac_asset_missing(files, rng):
    import pystac

    folder, scene = files
    from datetime import datetime, timezone

    item = pystac.Item("s", None, None, datetime(2024, 1, 1, tzinfo=timezone.utc), {})
    item.add_asset("visual", pystac.Asset(str(folder / scene["image"])))
    item.set_self_href(str(folder / "item.json"))
    item.save_object(include_self_link=False)
    ok = build(folder, {**scene, "image": "item.json", "assets": ["visual"]})
    assert ok.grids[0].width == 160
    with pytest.raises(DataError) as err:
        build(folder, {**scene, "image": "item.json", "assets": ["nir"]})
    one_line(err, "nir", "item.json", "visual", "scenes file")
    with pytest.raises(DataError) as err:
        build(folder, {**scene, "image": "item.json"})
    one_line(err, "item.json", "assets")
    assert json.loads((folder / "item.json").read_text())["id"] == "s"


def test_scenes_file_problems(tmp_path, files):
    folder, scene = files
    with pytest.raises(DatasetNotFoundError, match="scenes file does not exist"):
        SceneDataset(None, "train", tmp_path / "none.yaml")
    with pytest.raises(DataError, match=r"label_field .* or label_class"):
        build(folder, {**scene, "label_class": "road"})
    with pytest.raises(DataError, match="no areas and no split"):
        build(folder, scene, split=None)
    with pytest.raises(DataError, match="priority must list distinct class names"):
        build(folder, scene, priority=["roads"])
    with pytest.raises(DataError, match=r"split.val \+ split.test"):
        build(folder, scene, **{"split": {"val": 0.6, "test": 0.5}})
    write_image(folder / "two.tif", np.zeros((2, 64, 64), np.uint8))
    with pytest.raises(DataError, match="has 2 band"):
        build(folder, {**scene, "image": "two.tif"})
    assert CLASSES


def test_check_data_reports_each_scene(tmp_path, rng, capsys):
    import rasterio
    from rasterio.features import rasterize
    from rasterio.warp import transform_geom

    from seglstm.cli.check_data import main
    from tests.scenes_data_helpers import CRS, TRANSFORM, random_polygons

    data = rng.integers(0, 256, (3, 96, 128), dtype=np.uint8)
    write_image(tmp_path / "a.tif", data)
    write_image(tmp_path / "b.tif", data)
    polys = random_polygons(rng, 128, 96, 25)
    names = [CLASSES[k % 3] for k in range(len(polys))]
    # self-intersecting, so invalid; off-grid vertices keep its edges off pixel centres (ties on an edge are
    # decided by rounding, differently in any two implementations)
    bowtie = shapely.Polygon([(10.3, 10.1), (40.2, 40.7), (40.1, 10.2), (10.2, 40.4)])
    outside = shapely.Polygon([(-40, 35), (35, -40), (-40, -40)])  # its box meets the image, it does not
    odd = shapely.box(100, 70, 120, 90)
    geoms = [*polys, bowtie, outside, odd]
    write_vector(tmp_path / "a.gpkg", [pixels_to_crs(g) for g in geoms], [*names, "road", "road", "forest"])
    write_vector(tmp_path / "b.gpkg", [shapely.affinity.translate(pixels_to_crs(p), xoff=3.0) for p in polys], names)
    scenes = [{"image": "a.tif", "labels": "a.gpkg", "label_field": "class", "split": "val"},
              {"image": "b.tif", "labels": "b.gpkg", "label_field": "class", "split": "train"}]
    write_scenes_yaml(tmp_path, scenes)
    config = tmp_path / "config.yaml"
    config.write_text(f"data:\n  dataset: scenes\n  scenes: {tmp_path / 'scenes.yaml'}\n  crop_size: [32, 32]\n"
                      "  test_scale: null\n")
    assert main([str(config), "--quiet", "--previews", str(tmp_path / "previews")]) == 1
    out, err = capsys.readouterr()
    assert "a.gpkg: vector, EPSG:4326, reprojected to the image CRS; 28 feature(s) in the file, 27 over the image, " \
           "1 invalid (repaired with make_valid), 1 outside the image" in out
    assert "['forest'] (1 features) are not in the class file" in err
    assert "b.gpkg: no label overlaps the image" in err and "EPSG:32633" in err
    assert (tmp_path / "previews" / tmp_path.name / "a.png").is_file()
    # labelled pixels of scene a (whole scene val): GDAL's whole-scene rasterisation, known classes only
    order = {c: r for r, c in enumerate([0, 1, 2])}
    shapes = sorted(((transform_geom("EPSG:4326", CRS, shapely.geometry.mapping(pixels_to_crs(g))), CLASSES.index(n))
                     for g, n in zip([*polys, shapely.make_valid(bowtie)], [*names, "road"])), key=lambda s: order[s[1]])
    ref = rasterize(shapes, out_shape=(96, 128), transform=TRANSFORM, fill=255, dtype=np.uint8)
    counts = np.bincount(ref.ravel(), minlength=256)[:3]
    row = {line.split()[0]: line.split() for line in out.splitlines() if line.strip().split()[:1] in (["building"], ["road"], ["water"])}
    for k, name in enumerate(CLASSES):
        assert int(row[name][2].replace(",", "")) == counts[k]
    mean = data.reshape(3, -1).astype(np.float64).mean(1)
    assert f"band mean: {[round(float(m), 3) for m in mean]}" in out
    assert rasterio.open(tmp_path / "a.tif").count == 3


def test_label_raster_with_unknown_values_or_elsewhere(files, rng):
    import rasterio

    from tests.scenes_data_helpers import CRS, TRANSFORM

    folder, scene = files

    def raster(name: str, data: np.ndarray, transform) -> str:
        with rasterio.open(folder / name, "w", driver="GTiff", height=data.shape[0], width=data.shape[1], count=1,
                           dtype="uint8", crs=CRS, transform=transform) as dst:
            dst.write(data[None])
        return name

    data = rng.integers(0, 3, (128, 160)).astype(np.uint8)
    data[40:50, 60:70] = 9
    with pytest.raises(DataError) as err:
        build(folder, {"image": scene["image"], "labels": raster("odd.tif", data, TRANSFORM)})
    one_line(err, "odd.tif", "[9]", "class ids 0..2")
    far = TRANSFORM @ TRANSFORM.translation(5000, 0)
    with pytest.raises(DataError) as err:
        build(folder, {"image": scene["image"], "labels": raster("far.tif", data % 3, far)})
    one_line(err, "far.tif", "no label overlaps the image", "EPSG:32633")
