"""SegDataModule on a tiny synthetic set, its argument checks, YAML (LightningCLI) use, and check-data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from jsonargparse import ArgumentParser

from seglstm.cli.check_data import main as check_data_cli
from seglstm.data import MEAN, STD, DatasetNotFoundError, LoveDA, SegDataModule
from seglstm.data.check import check_dataset
from seglstm.data.synthetic import generate
from tests.data_helpers import rgb, save


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("syn") / "d", 6, 3, 2, size=64, seed=1, progress=False)


def small(root: Path, **kw: object) -> SegDataModule:
    args = {"root": str(root), "batch_size": 2, "num_workers": 0, "crop_size": (32, 32), "train_scale": (128, 32),
            "test_scale": (96, 96)} | kw  # fmt: skip
    return SegDataModule(**args)


def test_loaders(synthetic: Path) -> None:
    dm = small(synthetic)
    assert dm.num_classes == 7 and dm.classes[0] == "background" and dm.ignore_index == 255
    assert dm.palette[1] == (255, 0, 0)
    train = list(dm.train_dataloader())
    assert len(train) == 3  # 6 items, batch 2, drop_last
    batch = train[0]
    assert batch["image"].shape == (2, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (2, 32, 32) and batch["mask"].dtype == torch.int64
    assert len(batch["path"]) == 2 and batch["ori_shape"] == [(64, 64), (64, 64)]
    assert set(batch["mask"].unique().tolist()) <= set(range(7)) | {255}
    assert abs(float(batch["image"].mean())) < 1.5  # normalized
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (1, 3, 96, 96) and val["mask"].shape == (1, 64, 64)  # mask at file size
    dm.setup("test")
    assert len(dm.datasets["test"]) == 3  # the seed tests on val
    test = next(iter(small(synthetic, test_split="test").test_dataloader()))
    assert "mask" not in test and test["ori_shape"] == [(64, 64)]
    # the eval pipeline is the normalization of the resized file
    raw = LoveDA(synthetic, "val")[0]["image"]
    resized = torch.nn.functional.interpolate(raw[None], (96, 96), mode="bilinear", align_corners=False)[0]
    ref = (resized - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    torch.testing.assert_close(val["image"][0], ref, atol=1e-4, rtol=1e-5)


def test_train_loader_is_seeded(synthetic: Path) -> None:
    a = next(iter(small(synthetic, seed=3).train_dataloader()))
    b = next(iter(small(synthetic, seed=3).train_dataloader()))
    c = next(iter(small(synthetic, seed=4).train_dataloader()))
    assert a["path"] == b["path"] and torch.equal(a["image"], b["image"])
    assert not torch.equal(a["image"], c["image"])
    loader = small(synthetic, seed=3, num_workers=2).train_dataloader()
    assert loader.persistent_workers and loader.drop_last
    assert torch.equal(next(iter(loader))["image"], a["image"])


def test_predict_loader(synthetic: Path) -> None:
    dm = small(synthetic, predict_root=str(synthetic / "img_dir" / "test"))
    batch = next(iter(dm.predict_dataloader()))
    assert batch["image"].shape == (1, 3, 96, 96) and batch["ori_shape"] == [(64, 64)] and "mask" not in batch


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"root": "/no/such/dir"}, DatasetNotFoundError, "root='/no/such/dir' is not a directory"),
        ({"dataset": "cityscapes"}, ValueError, "dataset='cityscapes' is not one of"),
        ({"test_split": "dev"}, ValueError, "test_split='dev'"),
        ({"domain": "suburban"}, ValueError, "domain='suburban'"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"crop_size": (32,)}, ValueError, "crop_size must be two numbers"),
        ({"ratio_range": (2.0, 0.5)}, ValueError, "ratio_range must be"),
        ({"cat_max_ratio": 1.5}, ValueError, "cat_max_ratio must be in"),
        ({"mean": [1.0, 2.0, 3.0]}, ValueError, "give both mean and std"),
        ({"mean": [1.0, 2.0], "std": [1.0, 2.0]}, ValueError, "mean/std have 2 values but the images have 3"),
        ({"bands": [0, 1, 2, 3]}, ValueError, "bands=.* only applies to dataset='folder'"),
        ({"classes_file": "c.yaml"}, ValueError, "classes_file='c.yaml' only applies"),
        ({"predict_root": "/nope"}, DatasetNotFoundError, "predict_root='/nope'"),
        ({"max_pixels": -5}, ValueError, "max_pixels must be positive"),
    ],
)
def test_argument_errors_name_the_argument(synthetic: Path, kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        small(kwargs.pop("root", synthetic), **kwargs)


@pytest.fixture
def four_band(tmp_path: Path) -> Path:
    rng = np.random.default_rng(4)
    (tmp_path / "classes.yaml").write_text("classes: [soil, crop, water]\n")
    for split in ("train", "val"):
        (tmp_path / "img_dir" / split).mkdir(parents=True)
        for i in range(4):
            tifffile.imwrite(
                tmp_path / "img_dir" / split / f"{i}.tif", rng.integers(0, 3000, (40, 40, 4), dtype=np.uint16)
            )
            save(tmp_path / "ann_dir" / split / f"{i}.png", rng.integers(0, 3, (40, 40)).astype(np.uint8))
    return tmp_path


def test_folder_bands_with_per_band_statistics(four_band: Path) -> None:
    with pytest.raises(ValueError, match=r"bands=\[3, 1\] needs a per-band mean and std"):
        small(four_band, dataset="folder", img_suffix=".tif", bands=[3, 1], photometric=False)
    with pytest.raises(ValueError, match="photometric=True needs 3 bands"):
        small(four_band, dataset="folder", img_suffix=".tif", bands=[3, 1], mean=[1, 1], std=[1, 1])
    mean, std = [1500.0, 1400.0], [800.0, 900.0]
    dm = small(four_band, dataset="folder", img_suffix=".tif", bands=[3, 1], mean=mean, std=std, photometric=False,
               test_scale=None)  # fmt: skip
    assert dm.classes == ("soil", "crop", "water")
    batch = next(iter(dm.val_dataloader()))
    raw = torch.from_numpy(
        tifffile.imread(four_band / "img_dir" / "val" / "0.tif")[:, :, [3, 1]].astype(np.float32)
    )
    ref = (raw.permute(2, 0, 1) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(batch["image"][0], ref)
    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 2, 32, 32)


def test_yaml_config_through_jsonargparse(synthetic: Path, tmp_path: Path) -> None:
    config = {"data": {"root": str(synthetic), "batch_size": 2, "crop_size": [32, 32], "test_scale": None,
                       "mean": [120.0, 110.0, 100.0], "std": [50.0, 50.0, 50.0], "num_workers": 0}}  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    parser = ArgumentParser()
    parser.add_argument("--config", action="config")
    parser.add_class_arguments(SegDataModule, "data")
    cfg = parser.parse_args(["--config", str(path)])
    dm = parser.instantiate(cfg).data
    assert dm.crop_size == (32, 32) and dm.test_scale is None and dm.mean == (120.0, 110.0, 100.0)
    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 3, 32, 32)


def test_check_dataset_report(synthetic: Path) -> None:
    report = check_dataset(LoveDA(synthetic, "train"), progress=False)
    assert report.ok and report.checked == 6 and report.has_masks
    masks = [LoveDA(synthetic, "train")[i]["mask"] for i in range(6)]
    counts = torch.bincount(torch.cat([m.reshape(-1) for m in masks]), minlength=256)
    np.testing.assert_array_equal(report.class_pixels, counts[:7].numpy())
    assert report.ignored_pixels == int(counts[255])
    images = torch.stack([LoveDA(synthetic, "train")[i]["image"] for i in range(6)]).double()
    np.testing.assert_allclose(report.band_mean, images.mean(dim=(0, 2, 3)).numpy(), rtol=1e-9)
    np.testing.assert_allclose(report.band_std, images.std(dim=(0, 2, 3), unbiased=False).numpy(), rtol=1e-6)
    assert "agricultural" in report.table() and "band mean" in report.table()


def write_config(path: Path, root: Path, **extra: object) -> Path:
    args = {"root": str(root), "num_workers": 0} | extra
    path.write_text(yaml.safe_dump({"data": {"class_path": "seglstm.data.SegDataModule", "init_args": args}}))
    return path


def test_check_data_cli(tmp_path: Path, synthetic: Path, capsys: pytest.CaptureFixture) -> None:
    assert check_data_cli([str(write_config(tmp_path / "ok.yaml", synthetic)), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert (
        "LoveDA train: 6/6 items readable" in out and "LoveDA val: 3/3" in out and "no problems found" in out
    )
    # a broken copy: a truncated image and a mask with an undefined value
    broken = tmp_path / "broken"
    for split in ("train", "val"):
        for kind in ("img_dir", "ann_dir"):
            (broken / kind / split).mkdir(parents=True)
            for p in (synthetic / kind / split).iterdir():
                (broken / kind / split / p.name).write_bytes(p.read_bytes())
    (broken / "meta.json").write_text((synthetic / "meta.json").read_text())
    img = broken / "img_dir" / "train" / "train_00001.png"
    img.write_bytes(img.read_bytes()[:300])
    mask = np.zeros((64, 64), np.uint8)
    mask[0, 0] = 42
    save(broken / "ann_dir" / "val" / "val_00002.png", mask)
    assert check_data_cli([str(write_config(tmp_path / "bad.yaml", broken)), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "2 problem(s)" in captured.err
    assert re.search(r"train_00001\.png: corrupt or truncated", captured.err)
    assert re.search(r"val_00002\.png: label values 42", captured.err)
    # --split limits the check; a config error is reported, not raised
    assert check_data_cli([str(tmp_path / "bad.yaml"), "--split", "val", "--quiet"]) == 1
    assert "train" not in capsys.readouterr().out
    assert check_data_cli([str(write_config(tmp_path / "x.yaml", tmp_path / "missing"))]) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_check_data_composes_base_configs(
    tmp_path: Path, synthetic: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "_base_").mkdir()
    (tmp_path / "_base_" / "data.yaml").write_text(
        yaml.safe_dump({"data": {"root": "/nowhere", "num_workers": 0}})
    )
    top = tmp_path / "top.yaml"
    top.write_text(yaml.safe_dump({"_base_": ["_base_/data.yaml"], "data": {"root": str(synthetic)}}))
    assert check_data_cli([str(top), "--split", "val", "--quiet"]) == 0
    assert "LoveDA val: 3/3 items readable" in capsys.readouterr().out


def test_check_data_predict_root(tmp_path: Path, synthetic: Path, capsys: pytest.CaptureFixture) -> None:
    images = tmp_path / "pred"
    save(images / "a.png", rgb(np.random.default_rng(0), 20, 30))
    (images / "b.png").write_bytes(b"not a png")
    config = write_config(tmp_path / "p.yaml", synthetic, predict_root=str(images))
    assert check_data_cli([str(config), "--split", "predict"]) == 1
    captured = capsys.readouterr()
    assert "1/2 images readable" in captured.out and "b.png" in captured.err
    assert json.loads((synthetic / "meta.json").read_text())["counts"]["train"] == 6


@pytest.mark.filterwarnings("ignore:.*(no `validation_step`|does not have many workers).*")
def test_lightning_sets_the_epoch_of_the_train_sampler(synthetic: Path) -> None:
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: dict[int, dict[str, torch.Tensor]] = {}

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            for path, image in zip(batch["path"], batch["image"]):
                self.seen.setdefault(self.current_epoch, {})[path] = image.clone()
            return (self.weight * batch["image"].mean()).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    probe = Probe()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(probe, datamodule=small(synthetic, seed=2))
    first, second = probe.seen[0], probe.seen[1]
    assert len(first) == len(second) == 6
    assert all(not torch.equal(first[p], second[p]) for p in first)  # new crops and colours each epoch
    # and epoch 1 is exactly what the dataset gives for key (1, index)
    ds = small(synthetic, seed=2).build_split("train", train=True)
    index = [str(f[0]) for f in ds.files].index(next(iter(second)))
    assert torch.equal(ds[(1, index)]["image"], second[next(iter(second))])


def test_check_data_takes_data_overrides(tmp_path: Path, synthetic: Path, capsys: pytest.CaptureFixture) -> None:
    """``--data.KEY VALUE`` replaces one data setting, as for ``seglstm fit``; other flags are refused."""
    config = write_config(tmp_path / "missing_root.yaml", tmp_path / "missing")
    assert check_data_cli([str(config), "--data.root", str(synthetic), "--quiet", "--split", "val"]) == 0
    assert "LoveDA val: 3/3" in capsys.readouterr().out
    assert check_data_cli([str(config), f"--data.root={synthetic}", "--data.val_batch_size", "0", "--quiet"]) == 1
    assert "val_batch_size must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        check_data_cli([str(config), "--model.lr", "1"])
    assert "only --data.KEY VALUE overrides" in capsys.readouterr().err
