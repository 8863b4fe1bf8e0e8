"""Bad input: every problem raises an error that names the file (or argument) and says what is wrong."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from seglstm.data import LoveDA, Potsdam, SegFolder
from seglstm.data.io import DataError, DatasetNotFoundError, image_size, read_image, read_mask
from tests.data_helpers import loveda_mask, make_loveda_mmseg, rgb, save


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def loveda(tmp_path: Path, rng: np.random.Generator) -> Path:
    make_loveda_mmseg(tmp_path, rng, {"train": [0, 1, 2], "val": [3, 4]})
    return tmp_path


def test_missing_root_and_folders(tmp_path: Path, loveda: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        LoveDA(tmp_path / "nope")
    with pytest.raises(DatasetNotFoundError, match="img_dir"):
        LoveDA(tmp_path / "img_dir" / "train")  # a folder that is no dataset root
    (loveda / "ann_dir" / "val").rename(loveda / "ann_dir" / "val_moved")
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(loveda / "ann_dir" / "val"))):
        LoveDA(loveda, "val")
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(loveda / "img_dir" / "test"))):
        LoveDA(loveda, "test")
    with pytest.raises(ValueError, match="split='tran'"):
        LoveDA(loveda, "tran")
    with pytest.raises(ValueError, match="domain='city'"):
        LoveDA(loveda, domain="city")


def test_image_without_mask_and_mask_without_image(loveda: Path, rng: np.random.Generator) -> None:
    save(loveda / "img_dir" / "train" / "77.png", rgb(rng))
    with pytest.raises(DataError, match=r"image\(s\) .* have no mask.*77\.png"):
        LoveDA(loveda, "train")
    (loveda / "img_dir" / "train" / "77.png").unlink()
    save(loveda / "ann_dir" / "train" / "88.png", loveda_mask(rng))
    with pytest.raises(DataError, match=r"mask\(s\) .* have no image.*88\.png"):
        LoveDA(loveda, "train")


def test_mask_size_differs(loveda: Path, rng: np.random.Generator) -> None:
    bad = save(loveda / "ann_dir" / "train" / "1.png", loveda_mask(rng, 32, 30))
    with pytest.raises(DataError, match=re.escape(str(bad)) + ".*30x32.*32x32"):
        LoveDA(loveda, "train")
    ds = LoveDA(loveda, "train", verify_sizes=False)  # the item itself checks again
    with pytest.raises(DataError, match=re.escape(str(bad))):
        ds[1]


def test_mask_values_out_of_range(loveda: Path, rng: np.random.Generator) -> None:
    m = loveda_mask(rng)
    m[5, 5], m[6, 6] = 9, 200
    bad = save(loveda / "ann_dir" / "train" / "2.png", m)
    ds = LoveDA(loveda, "train")
    ds[0]
    with pytest.raises(DataError, match=re.escape(str(bad)) + r".*label values 9, 200 .*0\.\.7 and 255"):
        ds[2]


def test_corrupt_and_truncated_png(loveda: Path) -> None:
    path = loveda / "img_dir" / "train" / "0.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ds = LoveDA(loveda, "train")  # the header is intact: the error comes when the pixels are decoded
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*corrupt or truncated"):
        ds[0]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*not a readable image"):
        LoveDA(loveda, "train")


def test_corrupt_and_truncated_tiff(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, rgb(rng, 64, 64), photometric="rgb")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*corrupt or truncated TIFF"):
        read_image(path)
    tifffile.imwrite(path, rgb(rng, 64, 64), photometric="rgb", compression="zlib")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*corrupt or truncated TIFF"):
        read_image(path)
    path.write_bytes(b"II*\x00" + b"\xff" * 20)
    with pytest.raises(DataError, match=re.escape(str(path))):
        read_image(path)


@pytest.mark.parametrize(
    ("mode", "words"), [("L", "1-channel grey"), ("RGBA", "4-channel RGBA"), ("LA", "2-channel grey\\+alpha")]
)
def test_grey_or_rgba_where_rgb_expected(
    tmp_path: Path, rng: np.random.Generator, mode: str, words: str
) -> None:
    path = tmp_path / "img.png"
    Image.fromarray(rgb(rng)).convert(mode).save(path)
    with pytest.raises(DataError, match=re.escape(str(path)) + f".*expected 3 channel.*{words}"):
        read_image(path, channels=3)
    assert read_image(path, channels=None).shape[2] == len(mode)


def test_palette_image_and_colour_mask(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "p.png"
    Image.fromarray(rgb(rng)).convert("P").save(path)
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*palette image"):
        read_image(path)
    # a palette PNG is a fine mask: its pixels are the indices
    indices = rng.integers(0, 7, (16, 16)).astype(np.uint8)
    im = Image.fromarray(indices, mode="L").convert("P")
    im.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    im.save(path)
    np.testing.assert_array_equal(read_mask(path), indices)
    save(path, rgb(rng))
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*one channel of class indices.*3 channels"):
        read_mask(path)


def test_decompression_bomb_over_max_pixels(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    Image.new("RGB", (3000, 2000)).save(path)  # 6 Mpx of zeros: a few kB on disk
    assert path.stat().st_size < 100_000
    with pytest.raises(
        DataError, match=re.escape(str(path)) + r".*3000x2000 = 6000000 pixels exceeds max_pixels=1000000"
    ):
        read_image(path, max_pixels=1_000_000)
    with pytest.raises(DataError, match="max_pixels"):
        image_size(path, max_pixels=1_000_000)
    assert read_image(path, max_pixels=6_000_000).shape == (2000, 3000, 3)
    tif = tmp_path / "bomb.tif"
    tifffile.imwrite(tif, np.zeros((2000, 3000, 3), np.uint8), photometric="rgb", compression="zlib")
    with pytest.raises(DataError, match=re.escape(str(tif)) + ".*exceeds max_pixels"):
        read_image(tif, max_pixels=1_000_000)
    # Pillow's own process-wide limit does not get in the way of a larger cap we chose
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 1_000_000
        assert read_image(path, max_pixels=10_000_000).shape == (2000, 3000, 3)
        assert Image.MAX_IMAGE_PIXELS == 1_000_000
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def test_dataset_max_pixels(loveda: Path) -> None:
    with pytest.raises(DataError, match=r"0\.png.*exceeds max_pixels=100"):
        LoveDA(loveda, "train", max_pixels=100)
    with pytest.raises(ValueError, match="max_pixels must be positive"):
        LoveDA(loveda, "train", max_pixels=0)


def test_other_image_files_are_reported_not_dropped(tmp_path: Path, rng: np.random.Generator) -> None:
    root = tmp_path
    for split in ("train", "val"):
        save(root / "img_dir" / split / "a.png", rgb(rng))
        save(root / "ann_dir" / split / "a.png", rng.integers(0, 7, (32, 32)).astype(np.uint8))
    save(root / "img_dir" / "train" / "b.jpg", rgb(rng))
    with pytest.warns(UserWarning, match=r"b\.jpg"):
        assert len(Potsdam(root, "train")) == 1


def test_tiff_layouts_and_band_selection(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.integers(0, 4000, (20, 24, 5), dtype=np.uint16)
    contig, planar, grey = tmp_path / "c.tif", tmp_path / "p.tif", tmp_path / "g.tif"
    tifffile.imwrite(contig, data, photometric="minisblack", planarconfig="contig")
    tifffile.imwrite(planar, np.moveaxis(data, -1, 0), photometric="minisblack", planarconfig="separate")
    tifffile.imwrite(grey, data[:, :, 0])
    for path in (contig, planar):
        out = read_image(path, channels=None)
        assert out.dtype == np.uint16
        np.testing.assert_array_equal(out, data)
        np.testing.assert_array_equal(read_image(path, channels=2, bands=[4, 1]), data[:, :, [4, 1]])
        assert image_size(path) == (20, 24)
    np.testing.assert_array_equal(read_image(grey, channels=1), data[:, :, :1])
    with pytest.raises(DataError, match=re.escape(str(contig)) + r".*bands \[7\] out of range.*5 band"):
        read_image(contig, channels=None, bands=[0, 7])
    with pytest.raises(DataError, match=re.escape(str(contig)) + ".*expected 3 channel.*5-channel"):
        read_image(contig)


def test_folder_class_file_errors(tmp_path: Path, rng: np.random.Generator) -> None:
    save(tmp_path / "img_dir" / "train" / "a.png", rgb(rng))
    save(tmp_path / "ann_dir" / "train" / "a.png", np.zeros((32, 32), np.uint8))
    with pytest.raises(DataError, match="no classes_file given"):
        SegFolder(tmp_path)
    cases = {
        "classes: [a, a]": "duplicate class names",
        "classes: [a, b]\npalette: [[1, 2, 3]]": "palette has 1 colours for 2 classes",
        "classes: [a]\npalette: [[1, 2, 300]]": "three integers 0..255",
        "[]": "non-empty list",
        "classes: [a]\nextra: 1": "unknown keys",
        "- {name: a, color: [1, 2, 3]}\n- {name: b}": "only 1 of 2 classes have a colour",
    }
    for text, message in cases.items():
        (tmp_path / "classes.yaml").write_text(text)
        with pytest.raises(DataError, match=re.escape(str(tmp_path / "classes.yaml")) + ".*" + message):
            SegFolder(tmp_path)
