"""Small file-tree builders for the data tests (random content, written with Pillow / tifffile)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def rgb(rng: np.random.Generator, h: int = 32, w: int = 32) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def loveda_mask(rng: np.random.Generator, h: int = 32, w: int = 32) -> np.ndarray:
    """Raw LoveDA values 0..7 with every value present."""
    m = rng.integers(0, 8, (h, w), dtype=np.uint8)
    m.flat[:8] = np.arange(8)
    return m


def make_loveda_mmseg(
    root: Path, rng: np.random.Generator, ids: dict[str, list[int]], size: int = 32
) -> None:
    """mmseg layout; ``ids`` maps split -> numeric file ids (test gets no masks)."""
    for split, numbers in ids.items():
        for i in numbers:
            save(root / "img_dir" / split / f"{i}.png", rgb(rng, size, size))
            if split != "test":
                save(root / "ann_dir" / split / f"{i}.png", loveda_mask(rng, size, size))


def make_loveda_official(root: Path, rng: np.random.Generator, counts: dict[tuple[str, str], int]) -> None:
    """Official layout; ``counts`` maps (Split, Domain) e.g. ("Train", "Urban") -> number of tiles."""
    next_id = 0
    for (split, domain), n in counts.items():
        for _ in range(n):
            save(root / split / domain / "images_png" / f"{next_id}.png", rgb(rng))
            if split != "Test":
                save(root / split / domain / "masks_png" / f"{next_id}.png", loveda_mask(rng))
            next_id += 1


def make_isprs(root: Path, rng: np.random.Generator, n: int = 3, size: int = 32) -> None:
    for split in ("train", "val"):
        for i in range(n):
            save(root / "img_dir" / split / f"2_10_{i}_0_{i + 512}_512.png", rgb(rng, size, size))
            save(
                root / "ann_dir" / split / f"2_10_{i}_0_{i + 512}_512.png",
                rng.integers(0, 7, (size, size)).astype(np.uint8),
            )
