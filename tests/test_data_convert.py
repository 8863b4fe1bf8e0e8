"""ISPRS converter on generated tiles: mmseg's window grid, names, splits and label values."""

from __future__ import annotations

import io
import math
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from seglstm.cli.convert import main as convert_cli
from seglstm.data import DataError, Potsdam, Vaihingen
from seglstm.data.convert import LABEL_COLOURS, POTSDAM_SPLITS, colour_to_label, convert_isprs, window_starts
from tests.reliability_helpers import tree_digest

COLOURS = list(LABEL_COLOURS)  # index = stored value
pytestmark = pytest.mark.filterwarnings("ignore:.*of mmseg's tiles are missing")


def mmseg_boxes(h: int, w: int, cs: int, ss: int) -> set[tuple[int, int, int, int]]:
    """mmseg's clip_big_image box arithmetic, restated: meshgrid of k * clip_size, overruns shifted back."""
    rows = (
        math.ceil((h - cs) / ss) if math.ceil((h - cs) / ss) * ss + cs >= h else math.ceil((h - cs) / ss) + 1
    )
    cols = (
        math.ceil((w - cs) / ss) if math.ceil((w - cs) / ss) * ss + cs >= w else math.ceil((w - cs) / ss) + 1
    )
    x, y = np.meshgrid(np.arange(cols + 1), np.arange(rows + 1))
    xmin, ymin = (x * cs).ravel(), (y * cs).ravel()
    xmin = xmin + np.where(xmin + cs > w, w - xmin - cs, 0)
    ymin = ymin + np.where(ymin + cs > h, h - ymin - cs, 0)
    return {(int(a), int(b), int(min(a + cs, w)), int(min(b + cs, h))) for a, b in zip(xmin, ymin)}


@pytest.mark.parametrize(("h", "w"), [(6000, 6000), (2557, 1887), (1100, 1000), (512, 700), (600, 513)])
def test_window_grid_matches_mmseg(h: int, w: int) -> None:
    ours = {(x, y, x + 512, y + 512) for y in window_starts(h, 512, 256) for x in window_starts(w, 512, 256)}
    assert ours == mmseg_boxes(h, w, 512, 256)
    assert len(window_starts(6000, 512, 256)) == 12  # 144 patches per Potsdam tile


def test_true_stride_windows() -> None:
    assert window_starts(1100, 512, 256, true_stride=True) == [0, 256, 512, 588]
    assert window_starts(512, 512, 256, true_stride=True) == [0]
    with pytest.raises(ValueError, match="smaller than the clip size"):
        window_starts(300, 512, 256)


def colour_tile(rng: np.random.Generator, h: int, w: int, black: bool) -> tuple[np.ndarray, np.ndarray]:
    """A colour-coded label tile in 8-pixel blocks and its expected stored values."""
    values = rng.integers(0 if black else 1, 7, (math.ceil(h / 8), math.ceil(w / 8)))
    values = values.repeat(8, 0).repeat(8, 1)[:h, :w].astype(np.uint8)
    return np.array(COLOURS, dtype=np.uint8)[values], values


def tif_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, photometric="rgb")
    return buf.getvalue()


@pytest.fixture
def potsdam_src(tmp_path: Path) -> tuple[Path, dict]:
    rng = np.random.default_rng(5)
    src = tmp_path / "src"
    src.mkdir()
    truth = {}
    sizes = {"2_10": (150, 130), "6_7": (128, 128), "5_15": (140, 200), "9_9": (100, 100)}
    with (
        zipfile.ZipFile(src / "2_Ortho_RGB.zip", "w") as rgb_zip,
        zipfile.ZipFile(src / "3_Ortho_IRRG.zip", "w") as irrg_zip,
        zipfile.ZipFile(src / "5_Labels_all_noBoundary.zip", "w") as eroded_zip,
    ):
        full_dir = src / "5_Labels_all"
        full_dir.mkdir()
        for tile, (h, w) in sizes.items():
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            eroded, eroded_values = colour_tile(rng, h, w, black=True)
            full, full_values = colour_tile(rng, h, w, black=False)
            full[3, 5] = (10, 20, 30)  # a colour outside the ISPRS code
            full_values[3, 5] = 0
            rgb_zip.writestr(f"2_Ortho_RGB/top_potsdam_{tile}_RGB.tif", tif_bytes(image))
            irrg_zip.writestr(f"3_Ortho_IRRG/top_potsdam_{tile}_IRRG.tif", tif_bytes(255 - image))
            eroded_zip.writestr(f"top_potsdam_{tile}_label_noBoundary.tif", tif_bytes(eroded))
            (full_dir / f"top_potsdam_{tile}_label.tif").write_bytes(tif_bytes(full))
            truth[tile] = {"image": image, "eroded": eroded_values, "full": full_values}
    return src, truth


@pytest.mark.parametrize("eroded", [True, False])
def test_potsdam_conversion(tmp_path: Path, potsdam_src: tuple[Path, dict], eroded: bool) -> None:
    src, truth = potsdam_src
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"potsdam: 35 of mmseg's tiles are missing: 2_11, "):
        report = convert_isprs("potsdam", [src], out, clip_size=64, stride=32, eroded=eroded, progress=False)
    assert report.tiles == {"train": ["2_10", "6_7"], "val": ["5_15"]}
    assert any("tile 9_9: in neither" in s for s in report.skipped)
    assert any("IRRG tile" in s for s in report.skipped)
    assert any(("full labels" if eroded else "eroded labels") in s for s in report.skipped)
    if eroded:
        assert report.unknown_colour_pixels == {}
    else:
        assert report.unknown_colour_pixels == {"2_10": 1, "6_7": 1, "5_15": 1}
    total = 0
    for tile, split in (("2_10", "train"), ("6_7", "train"), ("5_15", "val")):
        h, w = truth[tile]["image"].shape[:2]
        boxes = mmseg_boxes(h, w, 64, 32)
        names = sorted(p.name for p in (out / "img_dir" / split).glob(f"{tile}_*.png"))
        assert names == sorted(f"{tile}_{x0}_{y0}_{x1}_{y1}.png" for x0, y0, x1, y1 in boxes)
        for x0, y0, x1, y1 in boxes:
            name = f"{tile}_{x0}_{y0}_{x1}_{y1}.png"
            img = np.asarray(Image.open(out / "img_dir" / split / name))
            ann = np.asarray(Image.open(out / "ann_dir" / split / name))
            np.testing.assert_array_equal(img, truth[tile]["image"][y0:y1, x0:x1])
            np.testing.assert_array_equal(ann, truth[tile]["eroded" if eroded else "full"][y0:y1, x0:x1])
        total += len(boxes)
    assert report.patches["train"] + report.patches["val"] == total
    ds = Potsdam(out, "val")
    raw = np.asarray(Image.open(ds.files[0][1]))
    np.testing.assert_array_equal(ds[0]["mask"].numpy(), np.where(raw == 0, 255, raw.astype(np.int64) - 1))
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_isprs("potsdam", [src], out, clip_size=64, stride=32, eroded=eroded, progress=False)


def test_potsdam_irrg_and_missing_labels(tmp_path: Path, potsdam_src: tuple[Path, dict]) -> None:
    src, truth = potsdam_src
    out = tmp_path / "irrg"
    convert_isprs("potsdam", [src], out, clip_size=64, stride=32, eroded=True, bands="IRRG", progress=False)
    img = np.asarray(Image.open(out / "img_dir" / "val" / "5_15_0_0_64_64.png"))
    np.testing.assert_array_equal(img, 255 - truth["5_15"]["image"][:64, :64])
    with pytest.raises(DataError, match=r"no full label for tile\(s\) 2_10, 5_15, 6_7"):
        convert_isprs("potsdam", [src / "2_Ortho_RGB.zip"], tmp_path / "x", clip_size=64, progress=False)


def test_corrupt_tile_names_the_archive_member(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(tmp_path / "tiles.zip", "w") as zf:
        zf.writestr(
            "top_potsdam_2_10_RGB.tif", tif_bytes(rng.integers(0, 256, (70, 70, 3), dtype=np.uint8))[:500]
        )
        zf.writestr("top_potsdam_2_10_label_noBoundary.tif", tif_bytes(colour_tile(rng, 70, 70, True)[0]))
    with pytest.raises(
        DataError, match=re.escape(f"{tmp_path / 'tiles.zip'}:top_potsdam_2_10_RGB.tif") + ".*corrupt"
    ):
        convert_isprs(
            "potsdam", [tmp_path / "tiles.zip"], tmp_path / "out", clip_size=64, eroded=True, progress=False
        )


def test_vaihingen_full_and_eroded_ground_truth(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    src = tmp_path / "src"
    src.mkdir()
    truth = {}
    with (
        zipfile.ZipFile(src / "ISPRS_semantic_labeling_Vaihingen.zip", "w") as tiles,
        zipfile.ZipFile(src / "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip", "w") as full,
        zipfile.ZipFile(
            src / "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip", "w"
        ) as eroded,
    ):
        for area, (h, w) in {1: (90, 70), 2: (70, 100)}.items():
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            f_rgb, f_val = colour_tile(rng, h, w, black=False)
            e_rgb, e_val = colour_tile(rng, h, w, black=True)
            tiles.writestr(f"top/top_mosaic_09cm_area{area}.tif", tif_bytes(image))
            tiles.writestr(f"dsm/dsm_09cm_matching_area{area}.tif", tif_bytes(image))
            full.writestr(f"top_mosaic_09cm_area{area}.tif", tif_bytes(f_rgb))
            eroded.writestr(f"top_mosaic_09cm_area{area}_noBoundary.tif", tif_bytes(e_rgb))
            truth[area] = (image, f_val, e_val)
    for use_eroded in (False, True):
        out = tmp_path / f"out{use_eroded}"
        code = convert_cli(["vaihingen", str(src), "--out", str(out), "--clip-size", "64", "--stride", "32", "--quiet"]
                           + (["--eroded"] if use_eroded else []))  # fmt: skip
        assert code == 0
        image, f_val, e_val = truth[2]
        name = "area2_36_6_100_70.png"  # the last window of each axis is shifted back to fit
        assert (out / "img_dir" / "val" / name).is_file()
        np.testing.assert_array_equal(
            np.asarray(Image.open(out / "img_dir" / "val" / name)), image[6:70, 36:100]
        )
        labels = np.asarray(Image.open(out / "ann_dir" / "val" / name))
        np.testing.assert_array_equal(labels, (e_val if use_eroded else f_val)[6:70, 36:100])
        assert len(Vaihingen(out, "train")) == 4 and len(Vaihingen(out, "val")) == 4


def test_colour_to_label_reference() -> None:
    rng = np.random.default_rng(8)
    values = rng.integers(0, 7, (20, 30))
    rgb = np.array(COLOURS, dtype=np.uint8)[values]
    rgb[0, :4] = [(254, 255, 255), (0, 0, 1), (128, 128, 128), (255, 0, 255)]
    values[0, :4] = 0
    out, unknown = colour_to_label(rgb)
    np.testing.assert_array_equal(out, values)
    assert unknown == 4
    assert COLOURS[1] == (255, 255, 255) and COLOURS[2] == (0, 0, 255) and COLOURS[6] == (255, 0, 0)
    assert len(POTSDAM_SPLITS["train"]) == 24 and len(POTSDAM_SPLITS["val"]) == 14


def test_bad_later_tile_leaves_no_partial_dataset(tmp_path: Path, potsdam_src: tuple[Path, dict]) -> None:
    src, _ = potsdam_src
    out = tmp_path / "out"
    kwargs = dict(clip_size=64, stride=32, eroded=True, progress=False)
    with pytest.warns(UserWarning):
        convert_isprs("potsdam", [src], out, **kwargs)
    before = tree_digest(out)
    assert before
    # 5_15 sorts after 2_10: its label is cut short, so two tiles would already have been written
    bad_src = tmp_path / "bad"
    shutil.copytree(src, bad_src)
    label = bad_src / "5_Labels_all_noBoundary.zip"
    with zipfile.ZipFile(src / "5_Labels_all_noBoundary.zip") as good, zipfile.ZipFile(label, "w") as zf:
        for info in good.infolist():
            data = good.read(info)
            zf.writestr(info, data[:400] if "5_15" in info.filename else data)
    with pytest.raises(DataError, match=r"5_15"), pytest.warns(UserWarning):
        convert_isprs("potsdam", [bad_src], out, overwrite=True, **kwargs)
    assert tree_digest(out) == before  # the previous dataset, untouched, and no staging folder left
    fresh = tmp_path / "fresh"
    with pytest.raises(DataError), pytest.warns(UserWarning):
        convert_isprs("potsdam", [bad_src], fresh, **kwargs)
    assert tree_digest(fresh) == {}
