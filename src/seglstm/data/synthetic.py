"""Procedural LoveDA-like aerial scenes: the built-in dataset that lets every command run without a download.

Each scene is painted layer by layer with numpy and Pillow's drawing primitives, keeping a label map in
LoveDA's stored values (0 no-data, 1 background, 2 building, 3 road, 4 water, 5 barren, 6 forest,
7 agriculture) in step with the pixels. Classes are told apart by texture and shape rather than colour:
row-striped parcels, self-shaded canopy, smooth water with depth shading, long thin roads, rectangular
roofs with ridge shading and cast shadows, speckled soil; class colours overlap and every scene gets its
own lighting, white balance, haze, blur and sensor noise. Urban scenes are road grids filled with blocks of
buildings; rural scenes are field patchworks with forest, rivers, ponds, tracks and villages.

Every scene is a pure function of ``(seed, split, index)`` through ``numpy.random.SeedSequence``, so the
files are byte-identical across runs and independent of the number of worker processes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFilter

from seglstm.data.io import write_png
from seglstm.utils.io import atomic_path, atomic_write_text

GENERATOR_VERSION = 1
PIXEL_SCALE = 1.25
"""Object size in pixels relative to the 512-pixel design (about 0.6 m per pixel). It does not change with
the image size: ``size`` sets the extent of a scene, so smaller images show fewer, not smaller, objects."""
NODATA, BACKGROUND, BUILDING, ROAD, WATER, BARREN, FOREST, AGRICULTURE = range(8)
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_PNG_LEVEL = 1  # fast; noisy aerial pixels barely compress at higher levels


def _rot(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]], dtype=np.float64)


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Monotone-chain hull of a few 2-D points (shadow of a roof = hull of roof and displaced roof)."""
    pts = sorted(map(tuple, points.tolist()))

    def half(seq: list[tuple[float, float]]) -> list[tuple[float, float]]:
        out: list[tuple[float, float]] = []
        for p in seq:
            while len(out) >= 2:
                (ax, ay), (bx, by) = out[-2], out[-1]
                if (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax) > 0:
                    break
                out.pop()
            out.append(p)
        return out

    lower, upper = half(pts), half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1])


Rect = tuple[float, float, float, float, float, float]
"""A building footprint: centre x, centre y, width, height, angle (radians), shadow length (pixels)."""


class _Scene:
    """One scene under construction: RGB floats in 0..255 plus the LoveDA label map.

    Full-frame work dominates the cost, so layers of one kind are collected first and painted in one pass
    (all roads of a material, all shadows, all roofs), and texture fields are reused within a scene.
    """

    def __init__(self, size: int, rng: np.random.Generator, urban: bool) -> None:
        self.n = size
        self.s = PIXEL_SCALE  # length factor of objects
        self.e = size / 512.0  # extent factor: counts of features across the image
        self.rng = rng
        self.urban = urban
        self.img = np.zeros((size, size, 3), dtype=np.float32)
        self.lab = np.full((size, size), BACKGROUND, dtype=np.uint8)
        self.yy, self.xx = np.mgrid[0:size, 0:size].astype(np.float32)
        angle = rng.uniform(0, 2 * math.pi)
        self.sun = np.array([math.cos(angle), math.sin(angle)])  # direction shadows fall (image x, y)
        self.shadow_strength = rng.uniform(0.42, 0.62)
        self.shadow_im, self.shadow_draw = self.canvas()
        # scene-wide drift of vegetation and soil colours, so that no class has a fixed colour
        self.veg_tint = rng.normal(0, 0.07, 3)
        self.soil_tint = rng.normal(0, 0.035, 3)
        self._white = rng.standard_normal((size, size), dtype=np.float32)
        self._mottle: dict[float, np.ndarray] = {}
        self.field_theta = rng.uniform(0, math.pi)

    # ---------------------------------------------------------------- primitives
    def noise(self, cells: float, res: int | None = None) -> np.ndarray:
        """Smooth value noise in about [0, 1] with ``cells`` features across the image, at ``res`` pixels."""
        res = self.n if res is None else res
        c = int(min(max(cells, 1), res // 2))
        grid = self.rng.random((c + 1, c + 1), dtype=np.float32)
        return np.asarray(Image.fromarray(grid, "F").resize((res, res), Image.BICUBIC))

    def fbm(self, cells: float, octaves: int = 4, gain: float = 0.5) -> np.ndarray:
        """Fresh fractal noise with zero mean and unit standard deviation (for shapes).

        Octaves are summed at the lowest resolution that still resolves the finest one (4 pixels per
        feature), then upsampled once.
        """
        res = int(min(self.n, max(32, 4 * cells * 2 ** (octaves - 1))))
        acc = np.zeros((res, res), dtype=np.float32)
        amp = 1.0
        for o in range(octaves):
            acc += amp * (self.noise(cells * 2**o, res) - 0.5)
            amp *= gain
        acc = (acc - acc.mean()) / (acc.std() + 1e-6)
        if res == self.n:
            return acc
        return np.asarray(Image.fromarray(acc, "F").resize((self.n, self.n), Image.BILINEAR))

    @staticmethod
    def top(field: np.ndarray, amount: float) -> np.ndarray:
        """Mask of the ``amount`` fraction of highest values (quantile estimated on a subsample)."""
        return field > np.quantile(field[::4, ::4], 1 - amount)

    def mottle(self, cells: float) -> np.ndarray:
        """Fractal noise for textures, shared by the layers of a scene."""
        if cells not in self._mottle:
            self._mottle[cells] = self.fbm(cells, 3)
        return self._mottle[cells]

    def grain(self, sigma: float) -> np.ndarray:
        """Per-pixel Gaussian grain, a shifted view of one scene-wide field."""
        shift = (int(self.rng.integers(self.n)), int(self.rng.integers(self.n)))
        return sigma * np.roll(self._white, shift, axis=(0, 1))

    def canvas(self, mode: str = "L") -> tuple[Image.Image, ImageDraw.ImageDraw]:
        im = Image.new(mode, (self.n, self.n), 0)
        return im, ImageDraw.Draw(im)

    def soften(self, im: Image.Image, radius: float) -> np.ndarray:
        """Gaussian blur of an 8-bit layer at half resolution (4x cheaper, same look at these radii)."""
        small = im.reduce(2).filter(ImageFilter.GaussianBlur(radius / 2))
        return np.asarray(small.resize((self.n, self.n), Image.BILINEAR))

    @staticmethod
    def grow(mask: np.ndarray) -> np.ndarray:
        """``mask`` dilated by one pixel (4-neighbourhood)."""
        out = mask.copy()
        out[1:] |= mask[:-1]
        out[:-1] |= mask[1:]
        out[:, 1:] |= mask[:, :-1]
        out[:, :-1] |= mask[:, 1:]
        return out

    def polygons_mask(self, polys: list[np.ndarray]) -> np.ndarray:
        im, d = self.canvas()
        for poly in polys:
            d.polygon([tuple(p) for p in poly], fill=255)
        return np.asarray(im) > 127

    def colour(
        self, base: tuple[float, float, float], jitter: float, tint: np.ndarray | None = None
    ) -> np.ndarray:
        rgb = np.asarray(base, dtype=np.float64) * (1 + self.rng.normal(0, jitter, 3))
        return rgb * (1 + tint) if tint is not None else rgb

    def texture(self, mask: np.ndarray, mottle: float, cells: float, grain: float) -> np.ndarray:
        """Brightness factors at ``mask``'s pixels: mottling with ``cells`` features per 512 pixels, plus
        per-pixel grain."""
        return 1 + mottle * self.mottle(cells * self.e)[mask] + grain * self.grain(1.0)[mask]

    def paint(self, mask: np.ndarray, rgb: np.ndarray, shade: np.ndarray | float, label: int) -> None:
        """Set ``mask``'s pixels to colour ``rgb`` (3,) times ``shade`` (per masked pixel) and its label."""
        self.img[mask] = np.asarray(shade, dtype=np.float32).reshape(-1, 1) * rgb.astype(np.float32)
        self.lab[mask] = label

    def rect(self, cx: float, cy: float, w: float, h: float, theta: float) -> np.ndarray:
        half = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
        return half @ _rot(theta).T + np.array([cx, cy])

    def cast_shadow(self, poly: np.ndarray, length: float) -> None:
        hull = _convex_hull(np.vstack([poly, poly + self.sun * length]))
        self.shadow_draw.polygon([tuple(p) for p in hull], fill=255)

    def apply_shadows(self, protect: np.ndarray) -> None:
        """Darken (with a blue cast) everything under the collected shadows except ``protect``; labels stay."""
        sh = (np.asarray(self.shadow_im) > 127) & ~protect
        self.img[sh] *= np.array([0.92, 0.97, 1.12], dtype=np.float32) * self.shadow_strength
        self.shadow_im, self.shadow_draw = self.canvas()

    # ---------------------------------------------------------------- ground covers
    def background(self) -> None:
        rng = self.rng
        if self.urban:
            # patchwork of lawns, paving and bare ground: Voronoi cells with their own material
            k = max(3, int(rng.integers(10, 20) * self.e**2))
            half = self.n // 2
            seeds = rng.uniform(0, half, (k, 2)).astype(np.float32)
            yy, xx = np.mgrid[0:half, 0:half].astype(np.float32)
            warp = 6 * self.noise(8, half)
            cell = np.argmin(
                (xx[..., None] + warp[..., None] - seeds[:, 0]) ** 2 + (yy[..., None] - seeds[:, 1]) ** 2, -1
            )
            cell = np.asarray(Image.fromarray(cell.astype(np.uint8)).resize((self.n, self.n), Image.NEAREST))
            materials = np.array(
                [
                    (104, 118, 84),
                    (92, 110, 72),
                    (150, 148, 140),
                    (128, 126, 118),
                    (140, 128, 106),
                    (118, 122, 100),
                ]
            )
            cols = materials[rng.integers(0, len(materials), k)] * (1 + rng.normal(0, 0.08, (k, 3)))
            base = cols.astype(np.float32)[cell]
        else:
            a = self.colour((100, 112, 74), 0.06, self.veg_tint)
            b = self.colour((122, 116, 84), 0.06, self.soil_tint)
            t = np.clip(0.5 + 0.35 * self.fbm(6 * self.e, 4), 0, 1)[..., None]
            base = (a * (1 - t) + b * t).astype(np.float32)
        mod = 1 + 0.08 * self.mottle(24 * self.e) + 0.04 * self._white
        self.img[:] = base * mod[..., None]
        shrubs = (self.noise(self.n / (5 * self.s + 1)) > 0.8) & (self.noise(6 * self.e) > 0.55)
        self.img[shrubs] *= 0.8  # scattered shrubs stay background
        self.lab[:] = BACKGROUND

    def barren(self, mask: np.ndarray) -> None:
        """Bare soil or rubble: light, speckled, with faint vehicle tracks."""
        rgb = self.colour((178, 164, 136), 0.04, self.soil_tint)
        if self.rng.random() < 0.35:
            rgb = self.colour((162, 158, 146), 0.03)
        shade = self.texture(mask, 0.09, 10, 0.03)
        shade[self.grain(1.0)[mask] > 1.5] *= self.rng.uniform(0.75, 1.15)
        angle = self.rng.uniform(0, math.pi)
        along = self.xx[mask] * math.cos(angle) + self.yy[mask] * math.sin(angle)
        shade[(np.sin(along / (9 * self.s + 1)) > 0.97) & (self.mottle(5 * self.e)[mask] > 0.3)] *= 0.9
        self.paint(mask, rgb, shade, BARREN)

    def barren_patches(self, amount: float) -> None:
        self.barren(self.top(self.fbm((3 + 3 * self.rng.random()) * self.e, 4), amount))

    def forest(self, mask: np.ndarray) -> None:
        """Canopy: crown-sized bumps lit from the side opposite the shadows, dark gaps between crowns."""
        rng = self.rng
        crown = rng.uniform(5, 9) * self.s + 1
        height = self.noise(self.n / crown) + 0.5 * self.noise(self.n / (crown * 0.5))
        dy, dx = round(self.sun[1] * (2 * self.s + 1)), round(self.sun[0] * (2 * self.s + 1))
        here = height[mask]
        relief = np.clip(1 + 1.6 * (here - np.roll(height, (dy, dx), (0, 1))[mask]), 0.45, 1.5)
        shade = self.texture(mask, 0.12, 6, 0.03) * relief
        shade[here < rng.uniform(0.55, 0.65)] *= 0.55  # gaps between crowns
        self.paint(mask, self.colour((52, 74, 40), 0.12, self.veg_tint), shade, FOREST)

    def forest_patches(self, amount: float) -> None:
        self.forest(self.top(self.fbm((2.5 + 2 * self.rng.random()) * self.e, 5, 0.55), amount))

    def water(self, mask: np.ndarray) -> None:
        """Still water: darker with depth (distance from the shore), faint ripples, a dark wet bank."""
        rng = self.rng
        palette = [(44, 66, 78), (58, 80, 72), (70, 84, 80), (36, 52, 70), (82, 96, 84)]
        rgb = np.asarray(palette[int(rng.integers(len(palette)))], dtype=np.float32) * (
            1 + rng.normal(0, 0.08, 3)
        ).astype(np.float32)
        depth = self.soften(Image.fromarray((mask * 255).astype(np.uint8)), 6 * self.s + 1) / np.float32(255)
        wave = (self.xx[mask] * 0.7 + self.yy[mask] * 0.3) / (2.5 * self.s + 0.6) + 3 * self.mottle(
            8 * self.e
        )[mask]
        shade = (1.15 - 0.3 * depth[mask]) * self.texture(mask, 0.05, 3, 0.012) * (1 + 0.025 * np.sin(wave))
        self.paint(mask, rgb, shade, WATER)
        bank = self.grow(mask) & ~mask & (self.lab != BUILDING)
        self.img[bank] *= 0.85

    def wander(self, step: float, curl: float) -> np.ndarray:
        """A smooth random path entering at one edge and leaving the image."""
        rng, n = self.rng, self.n
        t = rng.uniform(0.15, 0.85) * n
        starts = [
            (t, -10.0, math.pi / 2),
            (n + 10.0, t, math.pi),
            (t, n + 10.0, -math.pi / 2),
            (-10.0, t, 0.0),
        ]
        x, y, base = starts[int(rng.integers(4))]
        angle = base + rng.uniform(-0.5, 0.5)
        turn = 0.0
        pts = [(x, y)]
        for _ in range(int(4 * n / step)):
            turn = 0.85 * turn + rng.normal(0, curl)
            angle = base + float(np.clip(angle + turn - base, -1.2, 1.2))
            x += step * math.cos(angle)
            y += step * math.sin(angle)
            pts.append((x, y))
            if not (-40 <= x <= n + 40 and -40 <= y <= n + 40):
                break
        return np.array(pts)

    def river(self) -> None:
        width = self.rng.uniform(12, 36) * self.s + 2
        pts = self.wander(step=8 * self.s + 1, curl=self.rng.uniform(0.05, 0.16))
        im, d = self.canvas()
        d.line([tuple(p) for p in pts], fill=255, width=int(width), joint="curve")
        self.water(self.soften(im, 3 * self.s + 1) > 127)

    def lake(self) -> None:
        cx, cy = self.rng.uniform(0.1, 0.9, 2) * self.n
        radius = self.rng.uniform(40, 110) * self.s
        dist = np.sqrt((self.xx - cx) ** 2 + (self.yy - cy) ** 2) / radius
        self.water(dist - 0.45 * self.fbm(3 * self.e, 3) < 1.0)

    # ---------------------------------------------------------------- roads and vehicles
    def roads(
        self, lines: list[tuple[np.ndarray, float]], rgb: np.ndarray, marked_width: float | None
    ) -> None:
        """Polylines ``(points, width)`` of one material, with dashed centre lines on roads wider than
        ``marked_width``."""
        if not lines:
            return
        im, d = self.canvas()
        marks, dm = self.canvas()
        for pts, width in lines:
            xy = [tuple(p) for p in pts]
            d.line(xy, fill=255, width=max(2, round(width)), joint="curve")
            if marked_width is not None and width > marked_width:
                dm.line(xy, fill=255, width=max(1, round(0.1 * width)))
        mask = np.asarray(im) > 127
        self.paint(mask, rgb, self.texture(mask, 0.05, 12, 0.025), ROAD)
        dash = np.sin((self.xx + self.yy) / (3 * self.s + 0.5)) > 0.2
        line = (np.asarray(marks) > 127) & mask & dash
        self.img[line] = 200 + 8 * self.grain(1.0)[line][:, None]

    def cars(self, segments: list[tuple[np.ndarray, np.ndarray, float]], density: float) -> None:
        """Small vehicles along road segments (labelled road, as in LoveDA)."""
        rng = self.rng
        palette = [
            (220, 220, 220),
            (30, 30, 34),
            (160, 30, 30),
            (40, 60, 120),
            (150, 150, 155),
            (200, 190, 170),
        ]
        im, d = self.canvas("RGB")
        for a, b, width in segments:
            length = float(np.hypot(*(b - a)))
            direction = (b - a) / max(length, 1e-6)
            normal = np.array([-direction[1], direction[0]])
            theta = math.atan2(direction[1], direction[0])
            for _ in range(int(rng.poisson(density * length / (40 * self.s + 1)))):
                p = a + direction * rng.uniform(0, length) + normal * rng.choice([-1, 1]) * width * 0.25
                poly = self.rect(p[0], p[1], 9 * self.s + 1.5, 4.2 * self.s + 1, theta)
                d.polygon([tuple(q) for q in poly], fill=palette[int(rng.integers(len(palette)))])
        pix = np.asarray(im, dtype=np.float32)
        mask = (pix.sum(axis=2) > 0) & (self.lab == ROAD)
        self.img[mask] = pix[mask]

    # ---------------------------------------------------------------- buildings and trees
    def fits(self, rect: Rect) -> bool:
        """Footprint corners and centre off water and roads (buildings stand on land)."""
        poly = self.rect(*rect[:5])
        pts = np.vstack([poly, rect[:2]]).round().astype(int)
        inside = (pts >= 0).all(axis=1) & (pts < self.n).all(axis=1)
        labels = self.lab[pts[inside, 1], pts[inside, 0]]
        return not np.isin(labels, (WATER, ROAD)).any()

    def buildings(self, rects: list[Rect]) -> None:
        """Cast shadows, then roofs: gabled ones lit on the sunny slope, flat ones with a parapet and units."""
        rng = self.rng
        rects = [r for r in rects if self.fits(r)]
        if not rects:
            return
        ids, d = self.canvas("I")
        units, du = self.canvas("I")
        m = len(rects) + 1
        gable = np.zeros(m, dtype=bool)
        gable[1:] = rng.random(m - 1) < 0.55
        for k, (cx, cy, w, h, theta, length) in enumerate(rects, start=1):
            poly = self.rect(cx, cy, w, h, theta)
            self.cast_shadow(poly, length)
            d.polygon([tuple(p) for p in poly], fill=k)
            if not gable[k] and min(w, h) > 18 * self.s and rng.random() < 0.6:
                for _ in range(int(rng.integers(1, 4))):
                    off = (rng.uniform(-0.3, 0.3, 2) * np.array([w, h])) @ _rot(theta).T
                    unit = self.rect(cx + off[0], cy + off[1], 4 * self.s + 1, 4 * self.s + 1, theta)
                    du.polygon([tuple(p) for p in unit], fill=k)
        idmap = np.asarray(ids, dtype=np.int32)
        inside = idmap > 0
        self.apply_shadows(protect=inside)
        roofs = np.array(
            [
                (168, 166, 160),
                (190, 188, 182),
                (120, 118, 116),
                (142, 84, 68),
                (160, 104, 82),
                (104, 118, 134),
                (74, 76, 80),
                (204, 200, 192),
                (136, 130, 120),
            ],
            dtype=np.float32,
        )
        cols = np.zeros((m, 3), dtype=np.float32)
        cols[1:] = roofs[rng.integers(0, len(roofs), m - 1)] * (1 + rng.normal(0, 0.05, (m - 1, 3))).astype(
            np.float32
        )
        arr = np.zeros((m, 6))
        arr[1:] = np.array(rects)
        arr[0, 2:4] = 1.0
        long_is_w = arr[:, 2] >= arr[:, 3]
        half_short = (np.minimum(arr[:, 2], arr[:, 3]) / 2).astype(np.float32)
        # unit normal across the ridge (along the short side)
        nx = np.where(long_is_w, -np.sin(arr[:, 4]), np.cos(arr[:, 4])).astype(np.float32)
        ny = np.where(long_is_w, np.cos(arr[:, 4]), np.sin(arr[:, 4])).astype(np.float32)
        sunny = np.sign(-(nx * self.sun[0] + ny * self.sun[1])).astype(np.float32)
        k = idmap[inside]
        across = ((self.xx[inside] - arr[k, 0]) * nx[k] + (self.yy[inside] - arr[k, 1]) * ny[k]) / half_short[
            k
        ]
        shade = np.where(
            gable[k], 1 + 0.2 * np.sign(across) * sunny[k], np.where(np.abs(across) > 0.82, 0.84, 1.0)
        )
        self.img[inside] = cols[k] * (shade * (1 + self.grain(0.03)[inside]))[:, None]
        self.lab[inside] = BUILDING
        unit_mask = (np.asarray(units, dtype=np.int32) == idmap) & inside
        self.img[unit_mask] *= 0.7

    def trees(self, centres: list[tuple[float, float]], radii: list[float]) -> None:
        """Isolated crowns (street and garden trees), labelled forest, with their shadows."""
        if not centres:
            return
        im, d = self.canvas()
        for (x, y), r in zip(centres, radii):
            d.ellipse([x - r, y - r, x + r, y + r], fill=255)
            ox, oy = self.sun * 1.6 * r
            self.shadow_draw.ellipse([x - r + ox, y - r + oy, x + r + ox, y + r + oy], fill=255)
        crowns = np.asarray(im) > 127
        self.apply_shadows(protect=crowns | (self.lab == BUILDING))
        self.forest(crowns)

    # ---------------------------------------------------------------- layouts
    def fields(self, region: np.ndarray) -> None:
        """A patchwork of parcels on a rotated, irregular grid; each parcel has its own crop and row angle.

        Some parcels are fallow (background), bare (barren), ponds (water) or plantations (forest); the
        gaps between parcels stay background, like field margins.
        """
        rng, n, s = self.rng, self.n, self.s
        theta = self.field_theta
        rot = _rot(theta)
        centre = np.array([n / 2, n / 2])
        ids, d = self.canvas("I")
        kinds, angles = [0], [0.0]
        u = -0.75 * n
        while u < 0.75 * n:
            du = rng.uniform(40, 130) * s + 8
            narrow = rng.random() < 0.35
            v = -0.75 * n
            while v < 0.75 * n:
                dv = (rng.uniform(10, 28) if narrow else rng.uniform(30, 110)) * s + 4
                m = rng.uniform(1.2, 3.0) * s + 0.5
                corners = np.array(
                    [(u + m, v + m), (u + du - m, v + m), (u + du - m, v + dv - m), (u + m, v + dv - m)]
                )
                corners += rng.normal(0, 1.0 * s, (4, 2))
                d.polygon([tuple(p) for p in corners @ rot.T + centre], fill=len(kinds))
                kinds.append(
                    int(
                        rng.choice(
                            [AGRICULTURE, BACKGROUND, BARREN, WATER, FOREST], p=[0.74, 0.1, 0.08, 0.05, 0.03]
                        )
                    )
                )
                angles.append(theta + (0.0 if rng.random() < 0.5 else math.pi / 2) + rng.normal(0, 0.05))
                v += dv
            u += du
        idmap = np.where(region, np.asarray(ids, dtype=np.int32), 0)
        kind_of = np.asarray(kinds, dtype=np.int32)
        angle_of = np.asarray(angles, dtype=np.float32)
        m = len(kinds)
        crops = np.array(
            [
                (84, 114, 62),
                (106, 126, 80),
                (122, 134, 90),
                (168, 158, 116),
                (126, 108, 86),
                (94, 110, 86),
                (148, 140, 106),
            ],
            dtype=np.float32,
        )
        cols = crops[rng.integers(0, len(crops), m)] * (1 + rng.normal(0, 0.06, (m, 3))).astype(np.float32)
        cols *= (1 + self.veg_tint).astype(np.float32)
        period = (rng.uniform(3.0, 7.5, m) * s + 1.2).astype(np.float32)
        amp = rng.uniform(0.06, 0.2, m).astype(np.float32)
        agri = (idmap > 0) & (kind_of[idmap] == AGRICULTURE)
        k = idmap[agri]
        wave = np.sin(
            2
            * math.pi
            * (self.xx[agri] * np.cos(angle_of[k]) + self.yy[agri] * np.sin(angle_of[k]))
            / period[k]
        )
        rows = 1 + amp[k] * np.sign(wave) * np.sqrt(np.abs(wave))
        within = 1 + 0.06 * self.mottle(10 * self.e)[agri] + self.grain(0.02)[agri]
        self.img[agri] = cols[k] * (rows * within)[:, None]
        self.lab[agri] = AGRICULTURE
        for kind, paint in ((BARREN, self.barren), (FOREST, self.forest), (WATER, self.water)):
            mask = (idmap > 0) & (kind_of[idmap] == kind)
            if mask.any():
                paint(mask)

    def urban_layout(self) -> None:
        """A rotated street grid (some segments missing, a few arterials, maybe a curved road) whose blocks
        hold houses, apartment slabs, warehouses, parks, yards or building sites."""
        rng, n, s = self.rng, self.n, self.s
        if rng.random() < 0.4:
            self.barren_patches(rng.uniform(0.03, 0.1))
        if rng.random() < 0.2:
            self.fields(region=self.fbm(2 * self.e, 3) > 0.8)
        if rng.random() < 0.35:
            self.river()
        elif rng.random() < 0.2:
            self.lake()
        theta = 0.0 if rng.random() < 0.35 else rng.uniform(-0.6, 0.6)
        rot = _rot(theta)
        centre = np.array([n / 2, n / 2])

        def to_img(u: float, v: float) -> np.ndarray:
            return np.array([u, v]) @ rot.T + centre

        def cuts(gap: tuple[float, float]) -> list[float]:
            reach = 0.75 * n + gap[1]  # past the image corners by a whole block
            out = [-reach + rng.uniform(0, gap[1])]
            while out[-1] < reach:
                out.append(out[-1] + rng.uniform(*gap))
            return out

        us, vs = cuts((80 * s + 20, 170 * s + 30)), cuts((70 * s + 20, 150 * s + 30))
        main_u = set(rng.choice(len(us), size=min(len(us), int(rng.integers(0, 3))), replace=False).tolist())
        main_v = set(rng.choice(len(vs), size=min(len(vs), int(rng.integers(0, 3))), replace=False).tolist())
        wu = [(rng.uniform(14, 22) if i in main_u else rng.uniform(7, 12)) * s + 1 for i in range(len(us))]
        wv = [(rng.uniform(14, 22) if j in main_v else rng.uniform(7, 12)) * s + 1 for j in range(len(vs))]
        segments = [
            (to_img(u, vs[j]), to_img(u, vs[j + 1]), wu[i])
            for i, u in enumerate(us)
            for j in range(len(vs) - 1)
            if i in main_u or rng.random() < 0.85
        ] + [
            (to_img(us[i], v), to_img(us[i + 1], v), wv[j])
            for j, v in enumerate(vs)
            for i in range(len(us) - 1)
            if j in main_v or rng.random() < 0.85
        ]
        rects: list[Rect] = []
        trees: tuple[list[tuple[float, float]], list[float]] = ([], [])
        parks: list[np.ndarray] = []
        sites: list[np.ndarray] = []
        for i in range(len(us) - 1):
            for j in range(len(vs) - 1):
                u0, u1 = us[i] + wu[i] / 2 + 3 * s, us[i + 1] - wu[i + 1] / 2 - 3 * s
                v0, v1 = vs[j] + wv[j] / 2 + 3 * s, vs[j + 1] - wv[j + 1] / 2 - 3 * s
                corners = np.array([to_img(u, v) for u, v in ((u0, v0), (u1, v0), (u1, v1), (u0, v1))])
                outside = (corners.max(axis=0) < 0).any() or (corners.min(axis=0) > n).any()
                if u1 - u0 < 12 * s or v1 - v0 < 12 * s or outside:
                    continue
                kind = str(
                    rng.choice(
                        ["houses", "slabs", "industrial", "park", "yard", "site"],
                        p=[0.37, 0.22, 0.12, 0.12, 0.08, 0.09],
                    )
                )
                if kind == "park":
                    parks.append(corners)
                elif kind == "site":
                    sites.append(corners)
                elif kind != "yard":
                    self.block_buildings(kind, (u0, u1, v0, v1), theta, to_img, rects, trees)
        if parks:
            lawn = self.polygons_mask(parks)
            self.paint(
                lawn,
                self.colour((96, 124, 76), 0.05, self.veg_tint),
                self.texture(lawn, 0.08, 20, 0.03),
                BACKGROUND,
            )
            self.forest(lawn & (self.fbm(6 * self.e, 3) > rng.uniform(-0.6, 0.4)))
        if sites:
            self.barren(self.polygons_mask(sites))
        lines = [(np.array([a, b]), w) for a, b, w in segments]
        if rng.random() < 0.35:  # a curved arterial
            pts = self.wander(step=10 * s + 1, curl=0.05)
            w = rng.uniform(12, 20) * s + 1
            lines.append((pts, w))
            segments += [(pts[k], pts[k + 1], w) for k in range(len(pts) - 1)]
        self.roads(lines, self.colour((100, 101, 103), 0.04), marked_width=13 * s + 1)
        self.cars(segments, density=rng.uniform(0.3, 1.5))
        self.buildings(rects)
        self.trees(*trees)

    def block_buildings(
        self,
        kind: str,
        box: tuple[float, float, float, float],
        theta: float,
        to_img: Callable[[float, float], np.ndarray],
        rects: list[Rect],
        trees: tuple[list[tuple[float, float]], list[float]],
    ) -> None:
        """Fill a block ``(u0, u1, v0, v1)`` (grid coordinates) with buildings on a jittered lattice."""
        rng, s = self.rng, self.s
        u0, u1, v0, v1 = box
        du, dv = u1 - u0, v1 - v0
        cell, fill, height = {
            "houses": (rng.uniform(18, 32) * s + 4, (0.5, 0.85), (4, 9)),
            "slabs": (rng.uniform(34, 50) * s + 6, (0.55, 0.8), (12, 26)),
            "industrial": (rng.uniform(50, 110) * s + 8, (0.65, 0.92), (6, 12)),
        }[kind]
        nu, nv = max(1, int(du // cell)), max(1, int(dv // cell))
        slab_along_u = rng.random() < 0.5
        for a in range(nu):
            for b in range(nv):
                if rng.random() < 0.12:
                    continue
                cu = u0 + (a + 0.5 + rng.normal(0, 0.05)) * du / nu
                cv = v0 + (b + 0.5 + rng.normal(0, 0.05)) * dv / nv
                w, h = du / nu * rng.uniform(*fill), dv / nv * rng.uniform(*fill)
                if kind == "slabs":
                    h, w = (h * 0.5, w) if slab_along_u else (h, w * 0.5)
                c = to_img(cu, cv)
                jitter = rng.normal(0, 0.04) if kind == "houses" else 0.0
                rects.append((c[0], c[1], w, h, theta + jitter, rng.uniform(*height) * s + 1))
        if kind == "houses" and rng.random() < 0.6:  # garden trees
            for _ in range(int(rng.integers(1, 6))):
                c = to_img(rng.uniform(u0, u1), rng.uniform(v0, v1))
                trees[0].append((c[0], c[1]))
                trees[1].append(rng.uniform(3, 7) * s + 1)

    def rural_layout(self) -> None:
        """Farmland patchwork with woods, water, a paved road or two, dirt tracks and villages."""
        rng, n, s = self.rng, self.n, self.s
        self.fields(region=self.fbm(1.5 * self.e, 3) > rng.uniform(-1.2, 0.2))
        if rng.random() < 0.7:
            self.barren_patches(rng.uniform(0.03, 0.1))
        self.forest_patches(rng.uniform(0.05, 0.3))
        if rng.random() < 0.5:
            self.river()
        if rng.random() < 0.25:
            self.lake()
        paved: list[tuple[np.ndarray, float]] = []
        for _ in range(int(rng.binomial(2, min(1.0, 0.75 * self.e)))):  # roads crossing: ~ the extent
            paved.append(
                (self.wander(step=10 * s + 1, curl=rng.uniform(0.01, 0.06)), rng.uniform(8, 14) * s + 1)
            )
        rot = _rot(self.field_theta)
        tracks = []
        for _ in range(int(rng.binomial(3, min(1.0, 0.6 * self.e)))):  # dirt tracks along the field grid
            off = rng.uniform(-0.4, 0.4) * n
            tracks.append((np.array([[off, -n], [off, n]]) @ rot.T + n / 2, rng.uniform(4, 7) * s + 1))
        self.roads(tracks, self.colour((164, 150, 118), 0.06, self.soil_tint), marked_width=None)
        self.roads(paved, self.colour((112, 112, 112), 0.06), marked_width=11 * s + 1)
        self.cars(
            [(p[k], p[k + 1], w) for p, w in paved for k in range(len(p) - 1)], density=rng.uniform(0, 0.4)
        )
        rects: list[Rect] = []
        trees: tuple[list[tuple[float, float]], list[float]] = ([], [])
        for _ in range(int(rng.poisson(1.5 * self.e**2))):  # villages: clusters of houses along a local axis
            cx, cy = rng.uniform(0.1, 0.9, 2) * n
            theta = self.field_theta + rng.normal(0, 0.1)
            for _ in range(int(rng.integers(4, 22))):
                ox, oy = rng.normal(0, 30 * s + 5, 2)
                w, h = rng.uniform(10, 26, 2) * s + 2
                rects.append((cx + ox, cy + oy, w, h, theta + rng.normal(0, 0.04), rng.uniform(3, 8) * s + 1))
                if rng.random() < 0.4:
                    trees[0].append((cx + ox + rng.normal(0, 12 * s), cy + oy + rng.normal(0, 12 * s)))
                    trees[1].append(rng.uniform(3, 7) * s + 1)
        self.buildings(_drop_overlaps(rects))
        self.trees(*trees)

    # ---------------------------------------------------------------- camera
    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Exposure, white balance, illumination gradient, gamma, haze, saturation, blur, sensor noise; then
        sometimes a black no-data wedge at an edge, as LoveDA tiles have."""
        rng, n = self.rng, self.n
        gain = (rng.uniform(0.82, 1.18) * (1 + rng.normal(0, 0.035, 3))).astype(np.float32)
        ramp_angle = rng.uniform(0, 2 * math.pi)
        ramp = 1 + rng.uniform(0, 0.12) * (
            (self.xx * math.cos(ramp_angle) + self.yy * math.sin(ramp_angle)) / n - 0.5
        )
        img = np.clip(self.img * gain * ramp[..., None], 0, 255)
        gamma = (255.0 * (np.arange(256, dtype=np.float32) / 255.0) ** rng.uniform(0.85, 1.15)).astype(
            np.float32
        )
        img = gamma[img.astype(np.uint8)]
        haze = rng.uniform(0.0, 0.18)
        img = img * (1 - haze) + haze * np.array([176, 184, 196], dtype=np.float32)
        grey = img.mean(axis=2, keepdims=True)
        img = grey + rng.uniform(0.7, 1.1) * (img - grey)
        out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
        sigma = rng.uniform(1.0, 3.5)
        noise = np.stack([self.grain(sigma) for _ in range(3)], axis=-1)
        rgb = np.clip(np.asarray(out, dtype=np.float32) + noise + 0.5, 0, 255).astype(np.uint8)
        lab = self.lab.copy()
        if rng.random() < 0.12:
            depth = rng.uniform(0.05, 0.3) * n
            slope = rng.uniform(-0.3, 0.3)
            edge = int(rng.integers(4))
            coord = (self.xx, self.yy, n - 1 - self.xx, n - 1 - self.yy)[edge]
            other = (self.yy, self.xx, self.yy, self.xx)[edge]
            nodata = coord < depth + slope * (other - n / 2)
            rgb[nodata] = 0
            lab[nodata] = NODATA
        return rgb, lab


def _drop_overlaps(rects: list[Rect]) -> list[Rect]:
    """Greedy removal of houses too close to an earlier one (village houses are sampled freely)."""
    kept: list[Rect] = []
    for r in rects:
        if all(
            math.hypot(r[0] - k[0], r[1] - k[1]) > 0.5 * (max(r[2], r[3]) + max(k[2], k[3])) for k in kept
        ):
            kept.append(r)
    return kept


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([GENERATOR_VERSION, seed, SPLIT_IDS[split], index]))


def render_scene(seed: int, split: str, index: int, size: int = 512) -> tuple[np.ndarray, np.ndarray, str]:
    """One scene: ``(rgb uint8 H x W x 3, LoveDA mask uint8 H x W, "urban" | "rural")``."""
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    rng = scene_rng(seed, split, index)
    urban = bool(rng.random() < 0.5)
    scene = _Scene(size, rng, urban)
    scene.background()
    if urban:
        scene.urban_layout()
    else:
        scene.rural_layout()
    rgb, lab = scene.finish()
    return rgb, lab, "urban" if urban else "rural"


def _stem(split: str, index: int) -> str:
    return f"{split}_{index:05d}"


# Mean near-infrared reflectance (0..255) per LoveDA value: vegetation bright, water dark (as in RGBIR
# imagery), so a 4th band carries information the RGB bands blur.
_NIR_LEVEL = np.array([0, 110, 90, 70, 20, 120, 220, 190], np.float64)
CLASSES = ("no-data", "background", "building", "road", "water", "barren", "forest", "agricultural")


def near_infrared(rgb: np.ndarray, lab: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A near-infrared band for a rendered scene: a per-class level, the scene's brightness texture and
    noise (uint8 H x W)."""
    brightness = rgb.astype(np.float64).mean(axis=2)
    nir = 0.7 * _NIR_LEVEL[lab] + 0.3 * brightness + rng.normal(0, 6, lab.shape)
    return np.clip(np.rint(nir), 0, 255).astype(np.uint8)


def _write_one(args: tuple[Path, int, str, int, int, int]) -> tuple[str, str, str]:
    out, seed, split, index, size, bands = args
    rgb, lab, domain = render_scene(seed, split, index, size)
    stem = _stem(split, index)
    if bands == 3:
        write_png(out / "img_dir" / split / f"{stem}.png", rgb, compress_level=_PNG_LEVEL)
    else:  # RGB + NIR as a 4-band TIFF (PNG would make the 4th band alpha)
        import tifffile

        nir = near_infrared(rgb, lab, np.random.default_rng([seed, SPLIT_IDS[split], index, 4]))
        path = out / "img_dir" / split / f"{stem}.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tifffile.imwrite(tmp, np.dstack([rgb, nir]), photometric="minisblack", planarconfig="contig", compression="zlib")
    if split != "test":
        write_png(out / "ann_dir" / split / f"{stem}.png", lab, compress_level=_PNG_LEVEL)
    return split, stem, domain


def _jobs(
    out: Path, counts: dict[str, int], seed: int, size: int, bands: int
) -> Iterator[tuple[Path, int, str, int, int, int]]:
    for split, count in counts.items():
        for i in range(count):
            yield out, seed, split, i, size, bands


def generate(
    out: str | Path,
    n_train: int,
    n_val: int,
    n_test: int = 0,
    size: int = 512,
    seed: int = 0,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    bands: int = 3,
) -> Path:
    """Write a synthetic LoveDA-like dataset in mmseg's layout and return its root.

    ``bands=4`` adds a near-infrared band (:func:`near_infrared`): images become 4-band TIFFs and a
    ``classes.yaml`` makes the root a ``folder`` dataset (``img_suffix: .tif``), for multispectral runs.

    Layout: ``img_dir/{train,val,test}`` (RGB PNG), ``ann_dir/{train,val}`` (LoveDA values 0-7) and
    ``meta.json`` (seed, counts, size, generator version, per-file urban/rural domain), written last.
    If ``out`` already holds the same dataset (same meta.json and every file present) nothing is redone.
    Otherwise a non-empty ``out`` is refused unless ``overwrite``, which first removes our own layout
    folders and meta.json there.
    """
    from tqdm.auto import tqdm

    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if n_train + n_val + n_test == 0:
        raise ValueError("nothing to generate: n_train, n_val and n_test are all 0")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if bands not in (3, 4):
        raise ValueError(f"bands must be 3 (RGB) or 4 (RGB + near-infrared), got {bands}")
    out = Path(out)
    counts = {k: v for k, v in (("train", n_train), ("val", n_val), ("test", n_test)) if v > 0}
    settings = {
        "generator": "seglstm.data.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "size": size,
        "counts": counts,
        **({"bands": bands} if bands != 3 else {}),
    }
    meta_path = out / "meta.json"
    if _up_to_date(out, meta_path, settings, counts):
        return out
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it"
            )
        _remove_layout(out)
    jobs = list(_jobs(out, counts, seed, size, bands))
    domains: dict[str, dict[str, str]] = {split: {} for split in counts}
    bar = tqdm(total=len(jobs), desc=f"synth {out.name}", unit="img", disable=not progress)
    if workers == 1:
        for job in jobs:
            split, stem, domain = _write_one(job)
            domains[split][stem] = domain
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for split, stem, domain in pool.map(_write_one, jobs, chunksize=4):
                domains[split][stem] = domain
                bar.update()
    bar.close()
    meta = {**settings, "classes": list(CLASSES), "domains": domains}
    if bands != 3:
        from seglstm.data.loveda import LoveDA

        spec = {"classes": list(CLASSES[1:]), "palette": [list(c) for c in LoveDA.palette], "reduce_zero_label": True}
        atomic_write_text(out / "classes.yaml", yaml.safe_dump(spec, sort_keys=False))
    atomic_write_text(meta_path, json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return out


def _up_to_date(out: Path, meta_path: Path, settings: dict, counts: dict[str, int]) -> bool:
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError:
        return False
    if any(meta.get(k) != v for k, v in settings.items()):
        return False
    for split, count in counts.items():
        for i in range(count):
            stem = _stem(split, i)
            suffix = ".png" if settings.get("bands", 3) == 3 else ".tif"
            if not (out / "img_dir" / split / f"{stem}{suffix}").is_file():
                return False
            if split != "test" and not (out / "ann_dir" / split / f"{stem}.png").is_file():
                return False
    return True


def _remove_layout(out: Path) -> None:
    """Delete only what this generator writes (img_dir, ann_dir, meta.json); refuse anything else."""
    import shutil

    ours = ("img_dir", "ann_dir", "meta.json", "classes.yaml")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
    if foreign:
        raise FileExistsError(
            f"{out} holds files this generator did not write ({', '.join(foreign[:5])}); refusing "
            "to overwrite it"
        )
    for name in ("img_dir", "ann_dir"):
        if (out / name).exists():
            shutil.rmtree(out / name)
    for name in ("meta.json", "classes.yaml"):
        if (out / name).exists():
            os.remove(out / name)


def sample_scenes(
    seed: int = 0, size: int = 512, per_domain: int = 3
) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """The first ``per_domain`` urban and rural training scenes of a dataset seed, interleaved."""
    found: dict[str, list[tuple[np.ndarray, np.ndarray, str]]] = {"urban": [], "rural": []}
    index = 0
    while min(len(v) for v in found.values()) < per_domain:
        scene = render_scene(seed, "train", index, size)
        if len(found[scene[2]]) < per_domain:
            found[scene[2]].append(scene)
        index += 1
    return [scene for pair in zip(found["urban"], found["rural"]) for scene in pair]


def sample_grid(
    scenes: list[tuple[np.ndarray, np.ndarray, str]], path: str | Path, alpha: float = 0.45
) -> None:
    """Save a grid of scenes: each as image | image with the mask overlaid (LoveDA palette)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from seglstm.data.base import colorize
    from seglstm.data.loveda import LoveDA
    from seglstm.utils.io import atomic_path

    cols = 2
    rows = math.ceil(len(scenes) / cols)
    fig = Figure(figsize=(4.2 * 2 * cols, 4.2 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, 2 * cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for i, (rgb, lab, domain) in enumerate(scenes):
        r, c = divmod(i, cols)
        train_ids = np.where(lab == 0, 255, lab.astype(np.int64) - 1)
        colours = colorize(train_ids, LoveDA.palette).astype(np.float32) / 255
        img = rgb.astype(np.float32) / 255
        overlay = np.where((train_ids != 255)[..., None], (1 - alpha) * img + alpha * colours, img)
        axes[r, 2 * c].imshow(rgb)
        axes[r, 2 * c].set_title(f"{domain} scene", fontsize=10)
        axes[r, 2 * c + 1].imshow(overlay)
        axes[r, 2 * c + 1].set_title("mask overlay", fontsize=10)
    handles = [
        Patch(color=np.asarray(col) / 255, label=name) for name, col in zip(LoveDA.classes, LoveDA.palette)
    ]
    handles.append(Patch(color=(0, 0, 0), label="no-data (ignored)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=10)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=60, format=path.suffix.lstrip(".") or "png")
