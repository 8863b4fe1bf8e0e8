"""Property-based fuzzing (hypothesis): image sizes, band counts, label values and augmentation parameters
through the dataset + training pipeline, and image/crop/stride shapes through slide inference."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from seglstm.data.folder import SegFolder
from seglstm.data.io import DataError
from seglstm.data.transforms import train_transforms
from seglstm.models.segmentor import slide_inference

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def items(draw: st.DrawFn) -> dict:
    h, w = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    bands = draw(st.sampled_from([1, 3, 4, 6]))
    k = draw(st.integers(2, 6))
    valid = [*range(k), 255]
    labels = draw(st.lists(st.sampled_from(valid), min_size=1, max_size=4))
    bad = draw(st.one_of(st.none(), st.integers(k, 254)))
    lo = draw(st.floats(0.25, 2.0))
    return {
        "h": h, "w": w, "bands": bands, "k": k, "labels": labels, "bad": bad, "seed": draw(st.integers(0, 2**16)),
        "crop": (draw(st.integers(2, 48)), draw(st.integers(2, 48))),
        "scale": (draw(st.integers(8, 96)), draw(st.integers(8, 96))),
        "ratio": (lo, lo + draw(st.floats(0.0, 1.5))),
        "cat_max_ratio": draw(st.floats(0.3, 1.0)), "flip": draw(st.floats(0.0, 1.0)),
        "photometric": draw(st.booleans()),
    }  # fmt: skip


@FUZZ
@given(items())
def test_data_pipeline_keeps_shapes_and_labels_or_names_the_file(item):
    rng = np.random.default_rng(item["seed"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "img_dir" / "train").mkdir(parents=True)
        (root / "ann_dir" / "train").mkdir(parents=True)
        image = rng.integers(0, 256, (item["h"], item["w"], item["bands"]), dtype=np.uint8)
        layout = {"planarconfig": "contig"} if item["bands"] > 1 else {}  # explicit: 1x1x6 is ambiguous
        tifffile.imwrite(root / "img_dir" / "train" / "a.tif", image.squeeze(-1) if item["bands"] == 1 else image,
                         photometric="minisblack", **layout)  # fmt: skip
        mask = rng.choice(np.array(item["labels"], dtype=np.uint8), (item["h"], item["w"]))
        if item["bad"] is not None:
            mask[rng.integers(item["h"]), rng.integers(item["w"])] = item["bad"]
        Image.fromarray(mask).save(root / "ann_dir" / "train" / "a.png")
        (root / "classes.yaml").write_text(yaml.safe_dump([f"c{i}" for i in range(item["k"])]))
        pipeline = train_transforms(
            crop_size=item["crop"], scale=item["scale"], ratio_range=item["ratio"],
            cat_max_ratio=item["cat_max_ratio"], flip_prob=item["flip"], mean=[100.0] * item["bands"],
            std=[50.0] * item["bands"], photometric=item["photometric"],
        )  # fmt: skip
        ds = SegFolder(root, "train", img_suffix=".tif", transforms=pipeline, seed=item["seed"])
        if item["bad"] is not None:
            with pytest.raises(DataError, match=rf"a\.png: label values {item['bad']} are outside.*\(item 0\)"):
                ds[0]
            return
        if item["photometric"] and item["bands"] < 3:  # distortion needs 3 RGB bands (more pass through)
            with pytest.raises(DataError, match=r"a\.tif.*\(item 0\)"):
                ds[0]
            return
        sample = ds[0]
    ch, cw = item["crop"]
    assert sample["image"].dtype == torch.float32 and torch.isfinite(sample["image"]).all()
    assert sample["image"].shape[0] == item["bands"]
    # cropped to at most the crop size, then padded up to it
    assert tuple(sample["image"].shape[1:]) == (ch, cw) == tuple(sample["mask"].shape)
    # nearest-neighbour resizing, cropping, flipping and padding (with 255) invent no label
    assert set(sample["mask"].unique().tolist()) <= set(item["labels"]) | {255}


class Pointwise(torch.nn.Module):
    """A per-pixel model: its logits at a pixel do not depend on the window, so slide == whole exactly."""

    def __init__(self, bands: int, k: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(bands, 8, 1), torch.nn.Tanh(), torch.nn.Conv2d(8, k, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@FUZZ
@given(
    h=st.integers(1, 70), w=st.integers(1, 70), bands=st.integers(1, 5), k=st.integers(1, 6),
    crop=st.tuples(st.integers(1, 40), st.integers(1, 40)), frac=st.tuples(st.floats(0.05, 1.0), st.floats(0.05, 1.0)),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_slide_inference_equals_whole_image_for_any_shape(h, w, bands, k, crop, frac, seed):
    torch.manual_seed(seed)
    model = Pointwise(bands, k).double().eval()
    img = torch.randn(2, bands, h, w, dtype=torch.float64)
    stride = (max(1, int(crop[0] * frac[0])), max(1, int(crop[1] * frac[1])))
    with torch.no_grad():
        logits, count = slide_inference(model, img, k, crop_size=crop, stride=stride)
        whole = model(img)
    assert logits.shape == (2, k, h, w) and count.min() >= 1
    torch.testing.assert_close(logits, whole.float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="larger than crop_size"):
        slide_inference(model, img, k, crop_size=crop, stride=(crop[0] + 1, crop[1]))
