"""The synthetic LoveDA-like generator: determinism, class coverage, urban/rural mixes, layout, CLI."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seglstm.cli.synth import main as synth_cli
from seglstm.data import LoveDA
from seglstm.data.synthetic import (
    AGRICULTURE,
    BARREN,
    BUILDING,
    FOREST,
    GENERATOR_VERSION,
    ROAD,
    WATER,
    generate,
    render_scene,
)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_bytes_twice_and_across_worker_counts(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", 3, 2, 1, size=96, seed=5, progress=False)
    b = generate(tmp_path / "b", 3, 2, 1, size=96, seed=5, workers=2, progress=False)
    files_a, files_b = tree_bytes(a), tree_bytes(b)
    assert files_a == files_b
    assert len(files_a) == 3 * 2 + 2 * 2 + 1 + 1  # images + masks, test image, meta.json
    c = generate(tmp_path / "c", 3, 2, 1, size=96, seed=6, progress=False)
    assert tree_bytes(c)["img_dir/train/train_00000.png"] != files_a["img_dir/train/train_00000.png"]


def test_scenes_are_pure_functions_of_seed_split_index() -> None:
    rgb1, lab1, dom1 = render_scene(1, "val", 3, 64)
    rgb2, lab2, dom2 = render_scene(1, "val", 3, 64)
    assert np.array_equal(rgb1, rgb2) and np.array_equal(lab1, lab2) and dom1 == dom2
    assert not np.array_equal(render_scene(1, "train", 3, 64)[0], rgb1)
    assert rgb1.dtype == np.uint8 and rgb1.shape == (64, 64, 3) and lab1.shape == (64, 64)


@pytest.fixture(scope="module")
def scenes() -> list[tuple[np.ndarray, np.ndarray, str]]:
    return [render_scene(0, "train", i, 256) for i in range(40)]


def test_every_class_present(scenes: list) -> None:
    labels = np.stack([lab for _, lab, _ in scenes])
    assert set(np.unique(labels[:12]).tolist()) >= set(range(1, 8))  # every class in a dozen scenes
    assert (labels == 0).any()  # a little no-data, as LoveDA has
    assert 0.0 < (labels == 0).mean() < 0.06
    nodata = labels == 0
    images = np.stack([rgb for rgb, _, _ in scenes])
    assert (images[nodata] == 0).all()  # no-data is black


def test_urban_and_rural_mixes_differ(scenes: list) -> None:
    def share(domain: str, classes: tuple[int, ...]) -> float:
        labs = [lab for _, lab, d in scenes if d == domain]
        return float(np.mean([np.isin(lab, classes).mean() for lab in labs]))

    assert {d for _, _, d in scenes} == {"urban", "rural"}
    assert share("urban", (BUILDING, ROAD)) > 2 * share("rural", (BUILDING, ROAD))
    assert share("rural", (AGRICULTURE, FOREST, WATER)) > 2 * share("urban", (AGRICULTURE, FOREST, WATER))
    assert share("rural", (AGRICULTURE,)) > 0.15 and share("urban", (BUILDING,)) > 0.08


def test_classes_are_not_separable_by_colour_alone(scenes: list) -> None:
    """Mean colours of a class vary across scenes about as much as they differ between classes."""
    means = {c: [] for c in (BUILDING, ROAD, BARREN, FOREST, AGRICULTURE)}
    for rgb, lab, _ in scenes:
        for c in means:
            if (lab == c).sum() > 50:
                means[c].append(rgb[lab == c].mean(axis=0))
    spread = np.mean([np.std(v, axis=0).mean() for v in means.values()])
    assert spread > 8  # scene-to-scene colour drift in grey levels


def test_layout_meta_and_loading(tmp_path: Path) -> None:
    root = generate(tmp_path / "syn", 4, 3, 2, size=64, seed=2, progress=False)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["version"] == GENERATOR_VERSION and meta["seed"] == 2 and meta["size"] == 64
    assert meta["counts"] == {"train": 4, "val": 3, "test": 2}
    assert not (root / "ann_dir" / "test").exists()
    train = LoveDA(root, "train")
    assert len(train) == 4 and train[0]["image"].shape == (3, 64, 64)
    assert int(train[0]["mask"].max()) <= 6 or int(train[0]["mask"].max()) == 255
    urban = LoveDA(root, "train", "urban")
    rural = LoveDA(root, "train", "rural")
    assert len(urban) + len(rural) == 4
    assert all(meta["domains"]["train"][Path(p).stem] == "urban" for p, _ in urban.files)
    assert "mask" not in LoveDA(root, "test")[0]
    raw = np.asarray(Image.open(root / "ann_dir" / "val" / "val_00000.png"))
    assert raw.dtype == np.uint8 and raw.max() <= 7


def test_rerun_is_a_no_op_and_other_settings_are_refused(tmp_path: Path) -> None:
    root = generate(tmp_path / "syn", 2, 1, size=64, progress=False)
    stamp = os.stat(root / "img_dir" / "train" / "train_00000.png").st_mtime_ns
    generate(tmp_path / "syn", 2, 1, size=64, progress=False)
    assert os.stat(root / "img_dir" / "train" / "train_00000.png").st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="overwrite"):
        generate(tmp_path / "syn", 1, 1, size=64, progress=False)
    generate(tmp_path / "syn", 1, 1, size=64, overwrite=True, progress=False)
    assert sorted(p.name for p in (root / "img_dir" / "train").iterdir()) == ["train_00000.png"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        generate(tmp_path / "mine", 1, 1, size=64, overwrite=True, progress=False)
    with pytest.raises(ValueError, match="n_val must be >= 0"):
        generate(tmp_path / "x", 1, -1, progress=False)


def test_cli_writes_dataset_and_grid(tmp_path: Path) -> None:
    grid = tmp_path / "grid.png"
    code = synth_cli(
        [
            "--out",
            str(tmp_path / "d"),
            "--train",
            "2",
            "--val",
            "1",
            "--size",
            "64",
            "--grid",
            str(grid),
            "--quiet",
        ]
    )
    assert code == 0
    assert len(LoveDA(tmp_path / "d", "val")) == 1
    assert Image.open(grid).size[0] > 400
    assert (
        synth_cli(["--out", str(tmp_path / "d"), "--train", "3", "--val", "1", "--size", "64", "--quiet"])
        == 1
    )


@pytest.mark.slow
def test_two_hundred_images_in_under_a_minute(tmp_path: Path) -> None:
    start = time.process_time()
    generate(tmp_path / "big", 200, 0, size=512, progress=False)
    assert time.process_time() - start < 60  # CPU time of this process: one core
