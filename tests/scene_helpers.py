"""Scene-inference test helpers: GeoTIFFs written here and toy segmentors whose answer is known per pixel."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from affine import Affine
from torch import nn

from seglstm.inference.scene import predict_scene

CRS = "EPSG:32633"
TRANSFORM = Affine(0.5, 0.0, 500_000.0, 0.0, -0.5, 4_200_000.0)


def write_tif(path: Path, data: np.ndarray, *, crs=CRS, nodata=None, mask=None, transform=TRANSFORM) -> Path:
    count, height, width = data.shape
    profile = dict(driver="GTiff", height=height, width=width, count=count, dtype=data.dtype.name)
    # MINISBLACK: GDAL would otherwise declare the 4th of 4 byte bands an alpha band, i.e. a mask
    profile.update(transform=transform, nodata=nodata, tiled=True, blockxsize=128, blockysize=128,
                   photometric="MINISBLACK")
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", crs=crs, **profile) as dst:
        dst.write(data)
        if mask is not None:
            dst.write_mask(np.where(mask, 255, 0).astype(np.uint8))
    return path


def read(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as src:
        info = {"crs": src.crs, "transform": src.transform, "shape": (src.height, src.width),
                "nodata": src.nodata, "profile": src.profile}
        if src.count == 1:
            info["colormap"] = src.colormap(1)
        return src.read(), info


class RuleModel(nn.Module):
    """Class = number of ``thresholds`` below ``s = sum_b u_b * raw_b``, as two 1x1 convolutions.

    ``raw`` is recovered from the normalised input with ``mean``/``std``, and the logits
    ``k * s - sum_{j<=k} t_j`` peak at that class (their steps are ``s - t_k``).
    """

    def __init__(self, u, mean, std, thresholds, interrupt_after: int | None = None) -> None:
        super().__init__()
        u, mean, std = (torch.tensor(v, dtype=torch.float64) for v in (u, mean, std))
        self.score = nn.Conv2d(len(u), 1, 1)
        self.head = nn.Conv2d(1, len(thresholds) + 1, 1)
        with torch.no_grad():
            self.score.weight.copy_((u * std).view(1, -1, 1, 1))
            self.score.bias.copy_((u * mean).sum().view(1))
            self.head.weight.copy_(torch.arange(len(thresholds) + 1.0).view(-1, 1, 1, 1))
            self.head.bias.copy_(-torch.cat([torch.zeros(1), torch.tensor(thresholds).cumsum(0)]))
        self.calls, self.interrupt_after = 0, interrupt_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interrupt_after is not None and self.calls >= self.interrupt_after:
            raise KeyboardInterrupt
        self.calls += 1
        return self.head(self.score(x))


def rule_reference(raw: np.ndarray, u, thresholds) -> np.ndarray:
    s = np.tensordot(np.asarray(u, np.float64), raw.astype(np.float64), axes=1)
    return np.digitize(s, thresholds).astype(np.uint8)


class ConstModel(nn.Module):
    def __init__(self, logits) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        return self.logits.view(1, -1, 1, 1).expand(b, -1, h, w)


class TileMeanModel(nn.Module):
    """Logits ``a_k * m + b_k`` with ``m`` the window's mean input: every window disagrees with its
    neighbours, so the output is exactly the blend of the windows, which a reference can recompute."""

    def __init__(self, a, b) -> None:
        super().__init__()
        self.register_buffer("a", torch.tensor(a, dtype=torch.float32))
        self.register_buffer("b", torch.tensor(b, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        logits = m[:, None] * self.a + self.b
        return logits[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])


def palette(k: int) -> list[tuple[int, int, int]]:
    return [((37 * i) % 256, (91 * i + 40) % 256, (53 * i + 200) % 256) for i in range(k)]


MEAN3, STD3 = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
U3, T4 = [1, 2, 1], [255.5, 510.5, 765.5]  # s in 0..1020, 4 classes


def run(model, src, out, mean, std, k, classes=None, **kw):
    """``predict_scene`` in float32 unless told otherwise: the toy models' answers are exact, and bf16 (the
    ``auto`` choice on a CPU with native bf16) would move pixels near a class boundary."""
    kw.setdefault("precision", "fp32")
    return predict_scene(model, src, out, mean=mean, std=std, classes=classes or [f"c{i}" for i in range(k)],
                         palette=palette(k), progress=False, **kw)


def rule_segmentor(hang_at_call: int | None = None, marker: Path | None = None):
    """What a fake ``load_segmentor`` returns for the CLI tests: the 4-class :class:`RuleModel` on 3 bands and
    its metadata. With ``hang_at_call`` the model writes ``marker`` and sleeps at that forward call, so that
    a test can kill the process in the middle of a scene."""

    class Hanging(RuleModel):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if hang_at_call is not None and self.calls + 1 == hang_at_call:
                marker.write_text(str(self.calls))
                time.sleep(600)
            return super().forward(x)

    meta = dict(classes=["a", "b", "c", "d"], palette=palette(4), mean=MEAN3, std=STD3, num_classes=4,
                test_cfg={"mode": "whole"})
    return Hanging(U3, MEAN3, STD3, T4), meta
