"""N-band models: RGB weights adapted to N bands, per-band statistics, the synthetic 4-band dataset and a
4-band run end to end (fit, predict-scene on a 4-band GeoTIFF)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
import tifffile
import torch

import seglstm
from seglstm.data.synthetic import generate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = dict(depths=[1, 1, 1, 1], embed_dim=32, patch_size=8, img_size=64, channels=32, aux_cfg={"channels": 16})


def test_rgb_weights_start_an_n_band_model_by_the_smp_rule(tmp_path):
    torch.manual_seed(0)
    rgb = seglstm.create_model("seglstm_fcn_t", num_classes=3, **TINY)
    path = tmp_path / "rgb.pth"
    torch.save({"state_dict": rgb.state_dict()}, path)
    for bands in (1, 2, 4, 7):
        # the pretrained-weights path a config uses (model_kwargs.pretrained)
        model = seglstm.create_model("seglstm_fcn_t", num_classes=3, in_chans=bands, pretrained=str(path), **TINY)
        w3 = rgb.state_dict()["backbone.patch_embed.proj.weight"].double()
        got = model.state_dict()["backbone.patch_embed.proj.weight"].double()
        if bands == 1:  # timm sums the RGB kernels for one band
            expected = w3.sum(1, keepdim=True)
        else:
            expected = torch.stack([w3[:, b % 3] for b in range(bands)], 1) * 3.0 / bands
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
        same = {k for k in rgb.state_dict() if k != "backbone.patch_embed.proj.weight"}
        assert all(torch.equal(model.state_dict()[k], rgb.state_dict()[k]) for k in same)
    # the 3/N rescale: an RGB image given twice over (6 bands) gets the RGB model's first-layer response
    x3 = torch.rand(1, 3, 64, 64)
    six = seglstm.create_model("seglstm_fcn_t", num_classes=3, in_chans=6, pretrained=str(path), **TINY)
    with torch.no_grad():
        a, b = rgb.backbone.patch_embed.proj(x3), six.backbone.patch_embed.proj(torch.cat([x3, x3], 1))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def synth4(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synth4") / "rgbn", 4, 2, size=64, seed=3, progress=False, bands=4)


def test_synthetic_four_bands_and_check_data_stats(synth4, tmp_path, capsys):
    from seglstm.cli.main import main as cli

    images = sorted((synth4 / "img_dir" / "train").glob("*.tif"))
    assert len(images) == 4 and (synth4 / "classes.yaml").is_file()
    data = np.stack([tifffile.imread(p) for p in images]).astype(np.float64)  # N, H, W, 4
    assert data.shape == (4, 64, 64, 4)
    labels = np.stack([np.asarray(__import__("PIL.Image").Image.open(p)) for p in
                       sorted((synth4 / "ann_dir" / "train").glob("*.png"))])
    veg = np.isin(labels, [6, 7])
    assert data[..., 3][veg].mean() > data[..., 3][~veg & (labels > 0)].mean() + 30  # NIR tells vegetation
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  dataset: folder\n  root: {synth4}\n  img_suffix: .tif\n  bands: [0, 1, 2, 3]\n")
    assert cli(["check-data", str(cfg), "--stats", "--quiet"]) == 0
    out = capsys.readouterr().out
    mean = [float(v) for v in re.search(r"mean: \[(.*)\]", out.split("data:")[-1])[1].split(",")]
    std = [float(v) for v in re.search(r"std: \[(.*)\]", out.split("data:")[-1])[1].split(",")]
    flat = data.reshape(-1, 4)
    np.testing.assert_allclose(mean, flat.mean(0), atol=1e-3)
    np.testing.assert_allclose(std, flat.std(0), atol=1e-3)


def test_four_band_training_batches_keep_bands_aligned(synth4):
    from seglstm.data import SegDataModule

    dm = SegDataModule(dataset="folder", root=str(synth4), img_suffix=".tif", bands=[0, 1, 2, 3],
                       mean=[100.0, 100.0, 100.0, 120.0], std=[50.0, 50.0, 50.0, 60.0], batch_size=2,
                       num_workers=0, crop_size=(48, 48), train_scale=(64, 64), ratio_range=(1.0, 1.5),
                       photometric=True, test_scale=None)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 4, 48, 48)
    # the NIR band is only resized/cropped/flipped: de-normalised, it stays a plausible 0..255 band and
    # remains correlated with the labels' vegetation
    nir = batch["image"][:, 3] * 60 + 120
    assert nir.min() > -1 and nir.max() < 256


@pytest.mark.slow
def test_four_band_run_end_to_end(synth4, tmp_path):
    """fit a 4-band model from RGB weights on the synthetic 4-band data, then predict-scene a 4-band GeoTIFF."""
    from seglstm.cli.main import main as cli

    torch.manual_seed(0)
    rgb = seglstm.create_model("seglstm_upernet_t", num_classes=7, **TINY)
    weights = tmp_path / "rgb.pth"
    torch.save({"state_dict": rgb.state_dict()}, weights)
    kwargs = {**TINY, "in_chans": 4, "pretrained": str(weights)}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
_base_:
  - {CONFIGS / "_base_/schedules/15k.yaml"}
  - {CONFIGS / "_base_/default_runtime.yaml"}
model:
  model: seglstm_upernet_t
  model_kwargs: {kwargs}
  warmup_iters: 2
  max_iters: 6
data:
  dataset: folder
  root: {synth4}
  img_suffix: .tif
  bands: [0, 1, 2, 3]
  mean: [110.0, 110.0, 110.0, 120.0]
  std: [50.0, 50.0, 50.0, 60.0]
  batch_size: 2
  num_workers: 0
  crop_size: [64, 64]
  train_scale: [64, 64]
  test_scale: [64, 64]
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 4
  val_check_interval: 4
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {tmp_path / "run"}
""")
    assert cli(["fit", "--config", str(cfg)]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    rng = np.random.default_rng(0)
    scene = tmp_path / "scene.tif"
    with rasterio.open(scene, "w", driver="GTiff", height=96, width=130, count=4, dtype="uint8", crs="EPSG:32633",
                       transform=rasterio.Affine(0.5, 0, 5e5, 0, -0.5, 4.2e6), photometric="MINISBLACK") as dst:
        dst.write(rng.integers(0, 256, (4, 96, 130), dtype=np.uint8))
    out = tmp_path / "classes.tif"
    assert cli(["predict-scene", "--ckpt", str(ckpt), str(scene), str(out), "--device", "cpu", "--quiet"]) == 0
    with rasterio.open(out) as ds:
        assert ds.shape == (96, 130) and ds.read(1).max() < 7
