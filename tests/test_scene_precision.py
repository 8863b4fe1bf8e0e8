"""``--precision`` of scene inference: bf16 autocast on the CPU agrees with float32 per pixel, ``auto``
follows the CPU's native-bf16 detection, and a bad value is a one-line error naming the option."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import seglstm
from seglstm.inference.scene import SceneError, ScenePredictor
from seglstm.utils import device as device_module
from tests.scene_helpers import MEAN3, STD3, palette, read, run, write_tif

K = 5


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """A small ViL + UPerNet segmentor with seeded random weights and input/forget gates that vary per token
    (the default zero gate weights make them constants), so the mLSTM path is exercised."""
    torch.manual_seed(0)
    m = seglstm.create_model("seglstm_upernet_t", num_classes=K, depths=(1, 1, 1, 1), channels=32,
                             aux_cfg=dict(channels=16))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "gate.weight" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return m.eval()


def test_bf16_on_cpu_agrees_with_fp32_per_pixel(tmp_path, model):
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, (3, 96, 160), dtype=np.uint8)
    src = write_tif(tmp_path / "in.tif", raw)
    outs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.tif"
        run(model, src, out, MEAN3, STD3, K, tile=64, overlap=16, batch_size=4, device="cpu",
            precision=precision, probs_path=tmp_path / f"{precision}_p.tif")
        outs[precision] = read(out)[0][0], read(tmp_path / f"{precision}_p.tif")[0]
    (c32, p32), (c16, p16) = outs["fp32"], outs["bf16"]
    assert len(np.unique(c32)) > 1  # a constant map would agree trivially
    assert (c16 == c32).mean() >= 0.99
    assert np.abs(p16.astype(int) - p32.astype(int)).max() <= 8  # probabilities in 0..255


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_follows_native_bf16_detection(monkeypatch, native, expected):
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: native)
    pred = ScenePredictor(torch.nn.Conv2d(3, 2, 1), MEAN3, STD3, ["a", "b"], palette(2), tile=64, overlap=16,
                          device="cpu", precision="auto", progress=False)
    assert pred.amp_dtype is expected


def test_forward_runs_under_the_chosen_autocast(monkeypatch):
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            return torch.zeros(x.shape[0], 2, *x.shape[2:])

    for precision, expected in [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)]:
        pred = ScenePredictor(Probe(), MEAN3, STD3, ["a", "b"], palette(2), tile=64, overlap=16, device="cpu",
                              precision=precision, progress=False)
        pred._forward(torch.zeros(1, 3, 64, 64))
        assert seen[-1] is expected


def test_bad_precision_is_an_error_naming_the_option(tmp_path, monkeypatch, capsys):
    with pytest.raises(SceneError, match=r"--precision 'bf8'"):
        ScenePredictor(torch.nn.Conv2d(3, 2, 1), MEAN3, STD3, ["a", "b"], palette(2), device="cpu",
                       precision="bf8")
    from seglstm.cli import predict_scene as cli

    monkeypatch.setattr(cli, "_load", lambda args: (torch.nn.Conv2d(3, 2, 1), dict(
        mean=MEAN3, std=STD3, classes=["a", "b"], palette=palette(2), num_classes=2, test_cfg={})))
    src = write_tif(tmp_path / "in.tif", np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8))
    assert cli.main(["--ckpt", "m.pth", str(src), str(tmp_path / "o.tif"), "--tile", "64", "--device", "cpu",
                     "--precision", "bf8", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--precision 'bf8'" in err[0]


def test_help_states_the_precision_choice(capsys):
    from seglstm.cli import predict_scene as cli

    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--precision" in text and "AVX512-BF16" in text


def test_onnx_refuses_a_precision_it_cannot_apply(tmp_path, capsys):
    from seglstm.cli import predict_scene as cli

    assert cli.main(["--onnx", "m.onnx", "in.tif", str(tmp_path / "o.tif"), "--precision", "bf16"]) == 2
    assert "--precision bf16: an ONNX model" in capsys.readouterr().err
