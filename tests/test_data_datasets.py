"""Datasets: layout detection, domain filtering, label reduction, multi-band folders, seeding, loaders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from matplotlib.figure import Figure
from PIL import Image
from torch.utils.data import DataLoader

from seglstm.data import (
    DataError,
    EpochSampler,
    LoveDA,
    Potsdam,
    SegFolder,
    Vaihingen,
    build_dataset,
    collate,
    read_class_file,
    train_transforms,
)
from tests.data_helpers import make_isprs, make_loveda_mmseg, make_loveda_official, rgb, save


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(99)


def stems(ds: LoveDA) -> list[str]:
    return sorted(Path(img).stem for img, _ in ds.files)


# ------------------------------------------------------------------------------------------ LoveDA
def test_loveda_mmseg_layout_and_official_id_domains(tmp_path: Path, rng: np.random.Generator) -> None:
    ids = {"train": [3, 1365, 1366, 2000], "val": [2600, 3513, 3514], "test": [4200, 5166, 5167, 5986]}
    make_loveda_mmseg(tmp_path, rng, ids)
    ds = LoveDA(tmp_path, "train")
    assert ds.layout == "mmseg" and len(ds) == 4
    assert stems(LoveDA(tmp_path, "train", "rural")) == ["1365", "3"]
    assert stems(LoveDA(tmp_path, "train", "urban")) == ["1366", "2000"]
    assert stems(LoveDA(tmp_path, "val", "urban")) == ["3514"]
    assert stems(LoveDA(tmp_path, "test", "rural")) == ["4200", "5166"]
    assert stems(LoveDA(tmp_path, "test", "urban")) == ["5167", "5986"]
    test = LoveDA(tmp_path, "test")
    item = test[0]
    assert "mask" not in item and item["image"].shape == (3, 32, 32) and item["path"].endswith(".png")


def test_loveda_official_layout(tmp_path: Path, rng: np.random.Generator) -> None:
    counts = {("Train", "Urban"): 3, ("Train", "Rural"): 2, ("Val", "Urban"): 1, ("Val", "Rural"): 2}
    counts |= {("Test", "Urban"): 2, ("Test", "Rural"): 1}
    make_loveda_official(tmp_path, rng, counts)
    ds = LoveDA(tmp_path, "train")
    assert ds.layout == "official" and len(ds) == 5
    assert len(LoveDA(tmp_path, "train", "urban")) == 3
    assert len(LoveDA(tmp_path, "train", "rural")) == 2
    assert all("Rural" in str(img) for img, _ in LoveDA(tmp_path, "val", "rural").files)
    test = LoveDA(tmp_path, "test", "urban")
    assert len(test) == 2 and all(ann is None for _, ann in test.files)
    (tmp_path / "Val" / "Urban").rename(tmp_path / "Val" / "urban")  # case-insensitive folder names
    assert len(LoveDA(tmp_path, "val", "urban")) == 1
    (tmp_path / "Val" / "Rural").rename(tmp_path / "Val" / "Elsewhere")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "Val" / "Rural"))):
        LoveDA(tmp_path, "val")


def test_loveda_ambiguous_layout_needs_a_choice(tmp_path: Path, rng: np.random.Generator) -> None:
    make_loveda_mmseg(tmp_path, rng, {"train": [1], "val": [2600]})
    make_loveda_official(tmp_path, rng, {("Train", "Urban"): 2})
    with pytest.raises(DataError, match="layout='mmseg' or layout='official'"):
        LoveDA(tmp_path)
    assert len(LoveDA(tmp_path, layout="mmseg")) == 1
    assert len(LoveDA(tmp_path, layout="official", domain="urban")) == 2


def test_loveda_domains_from_meta_json(tmp_path: Path, rng: np.random.Generator) -> None:
    for i, name in enumerate(["a", "b", "c"]):
        save(tmp_path / "img_dir" / "train" / f"{name}.png", rgb(rng))
        save(tmp_path / "ann_dir" / "train" / f"{name}.png", np.full((32, 32), i, np.uint8))
    with pytest.raises(DataError, match=r"a\.png: cannot tell its domain"):
        LoveDA(tmp_path, domain="urban")
    (tmp_path / "meta.json").write_text(
        json.dumps({"domains": {"train": {"a": "urban", "b": "rural", "c": "urban"}}})
    )
    assert stems(LoveDA(tmp_path, domain="urban")) == ["a", "c"]
    assert stems(LoveDA(tmp_path, domain="rural")) == ["b"]
    (tmp_path / "meta.json").write_text(json.dumps({"domains": {"train": {"a": "urban"}}}))
    with pytest.raises(DataError, match=r"b\.png: not listed in .*meta\.json"):
        LoveDA(tmp_path, domain="rural")


def test_label_reduction(tmp_path: Path, rng: np.random.Generator) -> None:
    raw = np.tile(np.array([0, 1, 2, 3, 4, 5, 6, 7, 255], np.uint8), (4, 1))
    save(tmp_path / "img_dir" / "train" / "1.png", rgb(rng, 4, 9))
    save(tmp_path / "ann_dir" / "train" / "1.png", raw)
    mask = LoveDA(tmp_path, "train")[0]["mask"]
    assert mask.dtype == torch.int64
    expected = np.array([255, 0, 1, 2, 3, 4, 5, 6, 255])  # 0 -> ignored, k -> k - 1, 255 stays ignored
    np.testing.assert_array_equal(mask.numpy(), np.tile(expected, (4, 1)))


def test_isprs_datasets(tmp_path: Path, rng: np.random.Generator) -> None:
    make_isprs(tmp_path, rng)
    for cls in (Potsdam, Vaihingen):
        ds = cls(tmp_path, "val")
        assert len(ds) == 3 and ds.num_classes == 6 and ds.splits == ("train", "val")
        img, ann = ds.files[0]
        raw = np.asarray(Image.open(ann))
        expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
        np.testing.assert_array_equal(ds[0]["mask"].numpy(), expected)
        np.testing.assert_array_equal(ds[0]["image"].numpy(), np.asarray(Image.open(img)).transpose(2, 0, 1))
    assert Potsdam.palette[1] == (0, 0, 255) and Potsdam.classes[0] == "impervious_surface"
    with pytest.raises(ValueError, match="split='test'"):
        Potsdam(tmp_path, "test")


def test_build_dataset_registry(tmp_path: Path, rng: np.random.Generator) -> None:
    make_isprs(tmp_path, rng)
    assert isinstance(build_dataset("potsdam", tmp_path, "train"), Potsdam)
    assert isinstance(build_dataset("Vaihingen", tmp_path, "train"), Vaihingen)
    with pytest.raises(
        ValueError, match=r"dataset='isaid' is not one of \['folder', 'loveda', 'potsdam', 'scenes', 'vaihingen'\]"
    ):
        build_dataset("isaid", tmp_path, "train")


# ----------------------------------------------------------------------------------------- folder
def test_segfolder_multiband_tiff(tmp_path: Path, rng: np.random.Generator) -> None:
    (tmp_path / "classes.json").write_text(
        json.dumps([{"name": "soil", "color": [120, 80, 20]}, {"name": "crop", "color": [0, 200, 0]}])
    )
    images = {}
    for split in ("train", "val"):
        for i in range(3):
            data = rng.integers(0, 10000, (4, 24, 20), dtype=np.uint16)  # band-sequential GeoTIFF style
            images[(split, i)] = data
            (tmp_path / "img_dir" / split).mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(
                tmp_path / "img_dir" / split / f"t{i}.tif",
                data,
                planarconfig="separate",
                photometric="minisblack",
            )
            save(tmp_path / "ann_dir" / split / f"t{i}.png", rng.integers(0, 2, (24, 20)).astype(np.uint8))
    ds = SegFolder(tmp_path, "train", img_suffix=".tif", bands=[3, 0, 2])
    assert ds.classes == ("soil", "crop") and ds.palette == [(120, 80, 20), (0, 200, 0)]
    assert ds.splits == ("train", "val")
    item = ds[1]
    assert item["image"].dtype == torch.float32
    np.testing.assert_array_equal(item["image"].numpy(), images[("train", 1)][[3, 0, 2]].astype(np.float32))
    assert SegFolder(tmp_path, "val", img_suffix=".tif")[0]["image"].shape == (4, 24, 20)
    with pytest.raises(DataError, match=r"t0\.tif.*bands \[9\] out of range"):
        SegFolder(tmp_path, "train", img_suffix=".tif", bands=[9])[0]
    bad = rng.integers(0, 2, (24, 20)).astype(np.uint8)
    bad[0, 0] = 2
    save(tmp_path / "ann_dir" / "val" / "t2.png", bad)
    with pytest.raises(DataError, match=r"t2\.png: label values 2 .*0\.\.1 and 255"):
        SegFolder(tmp_path, "val", img_suffix=".tif")[2]


def test_class_file_forms(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("classes: [a, b, c]\nreduce_zero_label: true\n")
    meta = read_class_file(path)
    assert meta["classes"] == ("a", "b", "c") and meta["reduce_zero_label"] is True
    assert len(set(meta["palette"])) == 3
    path.write_text("- x\n- y\n")
    assert read_class_file(path)["classes"] == ("x", "y")


def test_segfolder_reduce_zero_label(tmp_path: Path, rng: np.random.Generator) -> None:
    (tmp_path / "classes.yaml").write_text("classes: [a, b]\nreduce_zero_label: true\n")
    save(tmp_path / "img_dir" / "train" / "k.png", rgb(rng, 2, 4))
    save(tmp_path / "ann_dir" / "train" / "k.png", np.array([[0, 1, 2, 255], [2, 1, 0, 255]], np.uint8))
    mask = SegFolder(tmp_path)[0]["mask"].numpy()
    np.testing.assert_array_equal(mask, [[255, 0, 1, 255], [1, 0, 255, 255]])


# -------------------------------------------------------------------------------------- plotting
def test_plot(tmp_path: Path, rng: np.random.Generator) -> None:
    make_loveda_mmseg(tmp_path, rng, {"train": [1], "test": [4200]})
    train, test = LoveDA(tmp_path, "train"), LoveDA(tmp_path, "test")
    fig = train.plot(train[0])
    assert isinstance(fig, Figure)
    assert sum(ax.has_data() for ax in fig.axes) == 3  # image, mask, overlay
    assert sum(ax.has_data() for ax in test.plot(test[0]).axes) == 1
    sample = train[0]
    sample["prediction"] = torch.zeros(16, 16, dtype=torch.long)  # other size: resized for display
    assert sum(ax.has_data() for ax in train.plot(sample).axes) == 5
    fig.savefig(tmp_path / "plot.png")


# --------------------------------------------------------------------------------- seeding, loaders
@pytest.fixture
def augmented(tmp_path: Path, rng: np.random.Generator) -> LoveDA:
    make_loveda_mmseg(tmp_path, rng, {"train": list(range(6))}, size=64)
    return LoveDA(tmp_path, "train", transforms=train_transforms((32, 32), (128, 32)), seed=3)


def test_items_are_functions_of_seed_epoch_index(augmented: LoveDA) -> None:
    a, b = augmented[(2, 4)], augmented[(2, 4)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["image"], augmented[(3, 4)]["image"])
    augmented.set_epoch(2)
    assert torch.equal(augmented[4]["image"], a["image"])
    augmented.seed = 4
    assert not torch.equal(augmented[(2, 4)]["image"], a["image"])


def test_foreign_transforms_are_seeded_without_touching_global_rng(augmented: LoveDA) -> None:
    def noisy(sample: dict) -> dict:
        return {**sample, "image": sample["image"] + torch.rand(sample["image"].shape)}

    augmented.transforms = noisy
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = augmented[(0, 1)]["image"]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(augmented[(0, 1)]["image"], first)
    assert not torch.equal(augmented[(1, 1)]["image"], first)


def batches(ds: LoveDA, workers: int, epochs: list[int], persistent: bool = False) -> list[dict]:
    sampler = EpochSampler(len(ds), seed=11)
    loader = DataLoader(
        ds,
        batch_size=2,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=persistent,
    )
    out = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        out += list(loader)
    return out


def test_determinism_across_workers_and_persistent_epochs(augmented: LoveDA) -> None:
    single = batches(augmented, 0, [0, 1])
    multi = batches(augmented, 2, [0, 1], persistent=True)
    assert len(single) == len(multi) == 6
    for a, b in zip(single, multi):
        assert a["path"] == b["path"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    # epoch 1 reshuffles and re-augments: same item, different crop / colours
    first = {p: img for batch in single[:3] for p, img in zip(batch["path"], batch["image"])}
    second = {p: img for batch in single[3:] for p, img in zip(batch["path"], batch["image"])}
    assert [b["path"] for b in single[:3]] != [b["path"] for b in single[3:]]
    assert all(not torch.equal(first[p], second[p]) for p in first)


def test_distributed_wrapper_forwards_epoch_and_shards_indices(augmented: LoveDA) -> None:
    shards = []
    for rank in range(2):
        inner = EpochSampler(len(augmented), seed=11)
        wrapper = DistributedSamplerWrapper(inner, num_replicas=2, rank=rank, shuffle=False)
        wrapper.set_epoch(5)  # what Lightning calls each epoch
        assert inner.epoch == 5
        shards.append(list(wrapper))
    keys = shards[0] + shards[1]
    assert {e for e, _ in keys} == {5}
    assert sorted(i for _, i in keys) == list(range(len(augmented)))  # disjoint, complete
    a, b = augmented[shards[0][0]], augmented[shards[1][0]]
    assert not torch.equal(a["image"], b["image"])


def test_collate_pads_mixed_sizes() -> None:
    samples = [
        {
            "image": torch.ones(3, 4, 6),
            "mask": torch.zeros(4, 6, dtype=torch.long),
            "path": "a",
            "ori_shape": (8, 12),
        },
        {
            "image": torch.ones(3, 5, 3),
            "mask": torch.ones(5, 3, dtype=torch.long),
            "path": "b",
            "ori_shape": (5, 3),
        },
    ]
    batch = collate(samples)
    assert batch["image"].shape == (2, 3, 5, 6) and batch["mask"].shape == (2, 5, 6)
    assert batch["img_shape"] == [(4, 6), (5, 3)] and batch["ori_shape"] == [(8, 12), (5, 3)]
    assert (batch["image"][0, :, 4:] == 0).all() and (batch["mask"][1, :, 3:] == 255).all()
    assert batch["path"] == ["a", "b"]
    with pytest.raises(ValueError, match="some samples have a mask"):
        collate([samples[0], {k: v for k, v in samples[1].items() if k != "mask"}])


def test_colorize_maps_ids_through_the_palette_and_blacks_out_the_rest():
    from seglstm.data.base import colorize

    rng = np.random.default_rng(3)
    palette = rng.integers(1, 256, (4, 3)).tolist()
    mask = rng.choice([0, 1, 2, 3, 7, 255], size=(5, 6))
    got = colorize(mask, palette)
    assert got.shape == (5, 6, 3) and got.dtype == np.uint8
    for (r, c), v in np.ndenumerate(mask):
        want = palette[v] if v < len(palette) else [0, 0, 0]  # 7: beyond the palette, 255: ignored
        assert got[r, c].tolist() == want
    assert colorize(np.full((2, 2), 1), palette, ignore_index=1).sum() == 0
    with pytest.raises(ValueError, match=r"0\.\.255.*-1\.\.3"):
        colorize(np.array([[-1, 3]]), palette)
