"""The ``scenes`` dataset: labels per window against whole-scene references, splits that cannot leak,
weighted and deterministic window sampling, workers, and the DataModule wiring."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import torch
from rasterio.features import rasterize
from rasterio.warp import Resampling, reproject, transform_geom
from torch.utils.data import DataLoader

from seglstm.data.base import EpochSampler, collate
from seglstm.data.scenes import SceneDataset
from tests.scenes_data_helpers import (
    CLASSES,
    CRS,
    TRANSFORM,
    make_scene,
    pixels_to_crs,
    write_image,
    write_scenes_yaml,
    write_vector,
)


def assemble(ds: SceneDataset, scene: int, height: int, width: int, tile: tuple[int, int] = (29, 37)) -> np.ndarray:
    """The scene's labels put together from windows of an odd size (none aligned with anything)."""
    out = np.zeros((height, width), np.uint8)
    labels = ds.labels(scene)
    for y in range(0, height, tile[0]):
        for x in range(0, width, tile[1]):
            h, w = min(tile[0], height - y), min(tile[1], width - x)
            out[y : y + h, x : x + w] = labels.window(x, y, w, h)
    return out


def reference_labels(polys_4326: list, ids: list[int], order: list[int], height: int, width: int) -> np.ndarray:
    """Whole-scene rasterisation by GDAL: polygons reprojected by ``transform_geom``, burnt in paint order."""
    rank = {c: r for r, c in enumerate(order)}
    shapes = sorted(
        ((transform_geom("EPSG:4326", CRS, shapely.geometry.mapping(p)), k) for p, k in zip(polys_4326, ids)),
        key=lambda s: rank[s[1]],
    )
    return rasterize(shapes, out_shape=(height, width), transform=TRANSFORM, fill=255, all_touched=False,
                     dtype=np.uint8)


@pytest.fixture
def scene(tmp_path: Path, rng: np.random.Generator):
    image, labels, polys, names = make_scene(tmp_path, rng, height=256, width=384, n_polygons=120)
    yaml_path = write_scenes_yaml(tmp_path, [{"image": image.name, "labels": labels.name, "label_field": "class"}],
                                  split={"val": 0.1, "test": 0.1, "block": 64}, sampling={"samples_per_epoch": 40})
    return yaml_path, polys, names


def test_window_rasterisation_matches_whole_scene_reference(scene, tmp_path):
    yaml_path, polys, names = scene
    # plus a polygon with a hole and a multi-polygon, written after the others
    donut = shapely.box(100.3, 60.2, 180.7, 140.1).difference(shapely.box(120.1, 80.4, 160.6, 120.3))
    multi = shapely.MultiPolygon([shapely.box(250.2, 20.6, 280.1, 50.3), shapely.box(290.4, 30.2, 300.7, 90.9)])
    extra = [donut, multi]
    write_vector(tmp_path / "scene.gpkg", [pixels_to_crs(p) for p in [*polys, *extra]], [*names, "water", "road"])
    polys, names = [*polys, *extra], [*names, "water", "road"]
    ds = SceneDataset(None, "val", yaml_path, crop_size=(32, 32))
    got = assemble(ds, 0, 256, 384)
    ids = [CLASSES.index(n) for n in names]
    ref = reference_labels([pixels_to_crs(p) for p in polys], ids, ds.spec.paint_order(), 256, 384)
    assert (ref != 255).mean() > 0.3 and len(np.unique(ref)) == 4  # a real test: many labelled pixels, all classes
    np.testing.assert_array_equal(got, ref)


def test_pixel_centre_rule_on_a_hand_computed_polygon(tmp_path, rng):
    image = write_image(tmp_path / "s.tif", rng.integers(0, 256, (3, 8, 10), dtype=np.uint8))
    poly = shapely.box(2.6, 1.2, 5.4, 3.6)  # pixel space: centres x in {3.5, 4.5}, y in {1.5, 2.5, 3.5}
    write_vector(tmp_path / "l.gpkg", [pixels_to_crs(poly, crs=CRS)], ["road"], crs=CRS)
    yaml_path = write_scenes_yaml(tmp_path, [{"image": "s.tif", "labels": "l.gpkg", "label_field": "class",
                                              "split": "val"}])
    ds = SceneDataset(None, "val", yaml_path, crop_size=(8, 10))
    want = np.full((8, 10), 255, np.uint8)
    want[1:4, 3:5] = CLASSES.index("road")
    np.testing.assert_array_equal(ds.labels(0).window(0, 0, 10, 8), want)
    np.testing.assert_array_equal(ds[0]["mask"].numpy(), want)
    assert image.exists()


def _overlap(tmp_path: Path, rng, priority, reverse_file_order: bool) -> np.ndarray:
    write_image(tmp_path / "s.tif", rng.integers(0, 256, (3, 20, 20), dtype=np.uint8))
    shapes = [(shapely.box(2, 2, 12, 12), "building"), (shapely.box(6, 6, 16, 16), "water")]
    if reverse_file_order:
        shapes = shapes[::-1]
    write_vector(tmp_path / "l.gpkg", [pixels_to_crs(g) for g, _ in shapes], [n for _, n in shapes])
    top = {"priority": priority} if priority else {}
    yaml_path = write_scenes_yaml(tmp_path, [{"image": "s.tif", "labels": "l.gpkg", "label_field": "class",
                                              "split": "val"}], **top)
    return SceneDataset(None, "val", yaml_path, crop_size=(20, 20)).labels(0).window(0, 0, 20, 20)


@pytest.mark.parametrize("reverse", [False, True])
def test_overlaps_resolve_by_priority_not_file_order(tmp_path, rng, reverse):
    default = _overlap(tmp_path / "a", rng, None, reverse) if (tmp_path / "a").mkdir() is None else None
    chosen = _overlap(tmp_path / "b", rng, ["building"], reverse) if (tmp_path / "b").mkdir() is None else None
    # overlap pixels 6..11: the later class in the class file (water) by default, building when prioritised
    assert (default[6:12, 6:12] == CLASSES.index("water")).all()
    assert (chosen[6:12, 6:12] == CLASSES.index("building")).all()
    for lab in (default, chosen):
        assert (lab[2:6, 2:6] == CLASSES.index("building")).all() and (lab[12:16, 12:16] == CLASSES.index("water")).all()


def test_label_raster_in_another_grid_matches_gdal_nearest(tmp_path, rng):
    height, width = 96, 128
    write_image(tmp_path / "s.tif", rng.integers(0, 256, (3, height, width), dtype=np.uint8))
    # labels on a coarser, shifted grid in another CRS (Web Mercator), with nodata and a hole
    src_transform = rasterio.Affine(5.0, 0, 1_672_000.0, 0, -5.0, 4_510_000.0)
    bounds = rasterio.warp.transform_bounds(CRS, "EPSG:3857", *rasterio.transform.array_bounds(height, width, TRANSFORM))
    src_transform = rasterio.Affine(5.0, 0, bounds[0] - 40, 0, -5.0, bounds[3] + 25)
    lh, lw = int((bounds[3] - bounds[1]) / 5) + 5, int((bounds[2] - bounds[0]) / 5) - 10
    data = rng.integers(0, 3, (lh, lw)).astype(np.uint8)
    data[5:15, 5:20] = 200  # the raster's nodata
    with rasterio.open(tmp_path / "l.tif", "w", driver="GTiff", height=lh, width=lw, count=1, dtype="uint8",
                       crs="EPSG:3857", transform=src_transform, nodata=200) as dst:
        dst.write(data[None])
    yaml_path = write_scenes_yaml(tmp_path, [{"image": "s.tif", "labels": "l.tif", "split": "val"}])
    ds = SceneDataset(None, "val", yaml_path, crop_size=(32, 32))
    got = assemble(ds, 0, height, width)
    ref = np.full((height, width), 255, np.uint8)
    reproject(data, ref, src_transform=src_transform, src_crs="EPSG:3857", src_nodata=200, dst_transform=TRANSFORM,
              dst_crs=CRS, dst_nodata=255, resampling=Resampling.nearest)
    assert (ref == 255).mean() > 0.02 and (ref != 255).mean() > 0.5
    np.testing.assert_array_equal(got, ref)


def test_image_nodata_and_mask_are_ignored(tmp_path, rng):
    mask = np.ones((40, 40), bool)
    mask[10:20, 5:30] = False
    write_image(tmp_path / "s.tif", rng.integers(1, 256, (3, 40, 40), dtype=np.uint8), mask=mask)
    write_vector(tmp_path / "l.gpkg", [pixels_to_crs(shapely.box(0, 0, 40, 40))], ["road"])
    yaml_path = write_scenes_yaml(tmp_path, [{"image": "s.tif", "labels": "l.gpkg", "label_field": "class",
                                              "split": "val"}])
    sample = SceneDataset(None, "val", yaml_path, crop_size=(40, 40))[0]
    want = np.where(mask, CLASSES.index("road"), 255)
    np.testing.assert_array_equal(sample["mask"].numpy(), want)
    assert (sample["image"][:, ~torch.from_numpy(mask)] == 0).all()


def _val_test_reference(ds: SceneDataset, height: int, width: int) -> np.ndarray:
    """Val/test pixels from the documented block rule, recomputed here."""
    spec = ds.spec.split
    b = spec.block
    nx, ny = math.ceil(width / b), math.ceil(height / b)
    order = np.random.default_rng([spec.seed, 0]).permutation(nx * ny)
    held = order[: round(spec.val * nx * ny) + round(spec.test * nx * ny)]
    out = np.zeros((height, width), bool)
    for k in held.tolist():
        r, c = divmod(k, nx)
        out[r * b : (r + 1) * b, c * b : (c + 1) * b] = True
    return out


def test_block_splits_are_deterministic_and_training_never_touches_the_buffer(tmp_path, rng):
    image, labels, _, _ = make_scene(tmp_path, rng, height=384, width=448, n_polygons=150)
    yaml_path = write_scenes_yaml(tmp_path, [{"image": image.name, "labels": labels.name, "label_field": "class"}],
                                  split={"val": 0.15, "test": 0.15, "block": 64},
                                  sampling={"samples_per_epoch": 400})
    crop = (24, 24)
    ds = SceneDataset(None, "train", yaml_path, crop_size=crop, seed=3)
    again = SceneDataset(None, "train", yaml_path, crop_size=crop, seed=3)
    held = _val_test_reference(ds, 384, 448)
    assert held.any() and not held.all()
    assert ds.areas[0].val.equals(again.areas[0].val) and ds.areas[0].test.equals(again.areas[0].test)
    buf = max(crop)
    for epoch in (0, 1):
        for index in range(len(ds)):
            _, x0, y0, w, h = ds.window(epoch, index)
            assert ds.window(epoch, index) == again.window(epoch, index)
            # no val/test pixel within Chebyshev distance `buf` of any training pixel
            near = held[max(0, y0 - buf) : y0 + h + buf, max(0, x0 - buf) : x0 + w + buf]
            assert not near.any(), (epoch, index, x0, y0)
    # val + test items score exactly the held-out pixels, each once
    scored = np.zeros((384, 448), np.int64)
    for split in ("val", "test"):
        ev = SceneDataset(None, split, yaml_path, crop_size=crop)
        for i in range(len(ev)):
            item = ev.items[i]
            _, x0, y0, w, h = ev.window(0, i)
            keep = ev.areas[0].mask(split, x0, y0, w, h)
            own = np.zeros_like(keep)
            own[item[6] - y0 : item[8] - y0, item[5] - x0 : item[7] - x0] = True
            scored[y0 : y0 + h, x0 : x0 + w] += keep & own
    np.testing.assert_array_equal(scored, held.astype(np.int64))


def test_polygon_split_areas_keep_the_buffer(tmp_path, rng):
    image, labels, _, _ = make_scene(tmp_path, rng, height=256, width=320, n_polygons=120)
    val_poly = shapely.Polygon([(200, 30), (300, 60), (260, 150), (190, 120)])
    write_vector(tmp_path / "val.gpkg", [pixels_to_crs(val_poly)])
    yaml_path = write_scenes_yaml(tmp_path, [{"image": image.name, "labels": labels.name, "label_field": "class",
                                              "areas": {"val": "val.gpkg"}}], sampling={"samples_per_epoch": 300})
    crop = (20, 20)
    ds = SceneDataset(None, "train", yaml_path, crop_size=crop)
    ref = rasterize([(transform_geom("EPSG:4326", CRS, shapely.geometry.mapping(pixels_to_crs(val_poly))), 1)],
                    out_shape=(256, 320), transform=TRANSFORM, fill=0, dtype=np.uint8).astype(bool)
    assert ref.sum() > 5000
    for index in range(len(ds)):
        _, x0, y0, w, h = ds.window(0, index)
        assert not ref[max(0, y0 - 20) : y0 + h + 20, max(0, x0 - 20) : x0 + w + 20].any()
    val = SceneDataset(None, "val", yaml_path, crop_size=crop)
    scored = np.zeros((256, 320), bool)
    for i in range(len(val)):
        s = val[i]
        _, x0, y0, w, h = s["window"]
        scored[y0 : y0 + h, x0 : x0 + w] |= s["mask"].numpy() != 255
    labelled = assemble(val, 0, 256, 320) != 255
    np.testing.assert_array_equal(scored, ref & labelled)


def test_windows_land_on_labels_and_class_balance_shifts_frequencies(tmp_path, rng):
    height, width = 256, 384
    write_image(tmp_path / "s.tif", rng.integers(0, 256, (3, height, width), dtype=np.uint8))
    # labels only on the left third: a large common class and a few small rare ones
    common = [shapely.box(10, 10, 120, 240)]
    rare = [shapely.box(x, y, x + 6, y + 6) for x, y in rng.uniform(15, 100, (6, 2))]
    geoms = common + rare
    names = ["road"] + ["building"] * len(rare)
    write_vector(tmp_path / "l.gpkg", [pixels_to_crs(g) for g in geoms], names)
    freqs = {}
    for balanced in (False, True):
        yaml_path = write_scenes_yaml(
            tmp_path, [{"image": "s.tif", "labels": "l.gpkg", "label_field": "class", "split": "train"}],
            priority=["building"], sampling={"samples_per_epoch": 300, "class_balanced": balanced})
        ds = SceneDataset(None, "train", yaml_path, crop_size=(32, 32))
        counts = np.zeros(256, np.int64)
        for i in range(len(ds)):
            s = ds.load_item(0, i)
            m = s["mask"].numpy()
            assert (m != 255).any(), s["window"]  # every window lands on labels
            counts += np.bincount(m.ravel(), minlength=256)
        freqs[balanced] = counts[CLASSES.index("building")] / counts[:3].sum()
    assert freqs[True] > 2 * freqs[False] > 0


def test_windows_depend_only_on_seed_epoch_index(scene):
    yaml_path, _, _ = scene
    a = SceneDataset(None, "train", yaml_path, crop_size=(32, 32), seed=1)
    b = SceneDataset(None, "train", yaml_path, crop_size=(32, 32), seed=1)
    c = SceneDataset(None, "train", yaml_path, crop_size=(32, 32), seed=2)
    order = list(range(len(a)))[::-1]
    wa = [a.window(0, i) for i in range(len(a))]
    wb = [b.window(0, i) for i in order][::-1]
    assert wa == wb
    assert wa != [a.window(1, i) for i in range(len(a))]
    assert wa != [c.window(0, i) for i in range(len(c))]
    assert len(set(wa)) > len(wa) // 2


def test_workers_open_their_own_files_and_give_the_same_samples(scene):
    yaml_path, _, _ = scene
    from seglstm.data.transforms import train_transforms

    ds = SceneDataset(None, "train", yaml_path, crop_size=(32, 32),
                      transforms=train_transforms((32, 32), (32, 32), (0.75, 1.5), 0.75))
    ds.read_window(0, 0, 0, 8, 8)  # the parent opens its files first: workers must not reuse them
    batches = {}
    for workers in (0, 2):
        sampler = EpochSampler(len(ds), seed=0)
        sampler.set_epoch(1)
        loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers, collate_fn=collate)
        batches[workers] = list(loader)
    for x, y in zip(batches[0], batches[2]):
        assert x["path"] == y["path"]
        torch.testing.assert_close(x["image"], y["image"], rtol=0, atol=0)
        torch.testing.assert_close(x["mask"], y["mask"], rtol=0, atol=0)
    import pickle

    state = pickle.loads(pickle.dumps(ds))
    assert state._handles == {} and state.window(1, 3) == ds.window(1, 3)


def test_datamodule_builds_scenes_from_a_config(scene):
    from seglstm.data import SegDataModule

    yaml_path, _, _ = scene
    dm = SegDataModule(dataset="scenes", scenes=str(yaml_path), crop_size=(32, 32), train_scale=(32, 32),
                       ratio_range=(1.0, 1.0), test_scale=None, batch_size=4, num_workers=0)
    assert dm.classes == tuple(CLASSES)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["mask"].shape == (4, 32, 32)
    val = next(iter(dm.val_dataloader()))
    assert val["mask"].shape[-2:] == (32, 32)
    dm.scan("val", progress=False)
    with pytest.raises(ValueError, match="test_scale: null"):
        SegDataModule(dataset="scenes", scenes=str(yaml_path), crop_size=(32, 32))


def test_validate_equals_predict_scene_scored_on_the_val_area(tmp_path, rng, registry, one_thread):
    """``validate`` over a val area gives predict-scene's mIoU on that area: the val windows are
    predict-scene's tiles (crop = tile, no overlap, a scene a multiple of the crop, so no window overlaps
    another) and the normalisation is the identity, so a model with spatial context (3x3 convolutions,
    zero padding at window borders) sees exactly the same inputs in both."""
    import lightning as L

    from seglstm.data import SegDataModule
    from seglstm.inference.scene import predict_scene
    from seglstm.metrics import SegmentationMetrics
    from seglstm.training.task import SegmentationTask
    from tests.reliability_helpers import rel_tiny_seg

    registry.model(rel_tiny_seg)
    height, width, crop = 128, 192, 32
    image, labels, polys, names = make_scene(tmp_path, rng, height=height, width=width, n_polygons=70)
    val_poly = shapely.Polygon([(20, 10), (170, 30), (150, 120), (40, 100)])
    write_vector(tmp_path / "val.gpkg", [pixels_to_crs(val_poly)])
    yaml_path = write_scenes_yaml(tmp_path, [{"image": image.name, "labels": labels.name, "label_field": "class",
                                              "areas": {"val": "val.gpkg"}}])
    dm = SegDataModule(dataset="scenes", scenes=str(yaml_path), crop_size=(crop, crop), test_scale=None,
                       mean=[0.0] * 3, std=[1.0] * 3, val_batch_size=3, num_workers=0)
    torch.manual_seed(0)
    task = SegmentationTask(model="rel_tiny_seg", num_classes=3)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    validated = trainer.validate(task, datamodule=dm, verbose=False)[0]["val/mIoU"]

    out = tmp_path / "pred.tif"
    predict_scene(task.model, image, out, mean=[0.0] * 3, std=[1.0] * 3, classes=CLASSES,
                  palette=[(1, 2, 3), (4, 5, 6), (7, 8, 9)], tile=crop, overlap=0, precision="fp32", scale="none",
                  progress=False, device="cpu")
    with rasterio.open(out) as src:
        pred = src.read(1)
    area = rasterize([(transform_geom("EPSG:4326", CRS, shapely.geometry.mapping(pixels_to_crs(val_poly))), 1)],
                     out_shape=(height, width), transform=TRANSFORM, fill=0, dtype=np.uint8).astype(bool)
    ref = reference_labels([pixels_to_crs(p) for p in polys], [CLASSES.index(n) for n in names],
                           [0, 1, 2], height, width)
    ref[~area] = 255
    metric = SegmentationMetrics(3)
    metric.update(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(ref.astype(np.int64)))
    expected = float(metric.compute()["mIoU"])
    assert 0.05 < expected < 0.95  # a model that is neither always right nor always wrong
    assert validated == pytest.approx(expected, abs=1e-6)


def test_mid_epoch_resume_continues_with_the_same_windows(scene):
    from seglstm.training.data_order import ResumableSegDataModule

    yaml_path, _, _ = scene

    def loader():
        dm = ResumableSegDataModule(dataset="scenes", scenes=str(yaml_path), crop_size=(32, 32),
                                    train_scale=(32, 32), ratio_range=(0.75, 1.5), test_scale=None, batch_size=4,
                                    num_workers=0, seed=5)
        return dm.train_dataloader()

    full = [b["path"] for b in loader()]
    resumed = loader()
    resumed.load_state_dict({"batches_done": 3})
    assert [b["path"] for b in resumed] == full[3:]
    assert len(full) == 10 and len(set(map(tuple, full))) == 10
