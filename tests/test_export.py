"""Export to ONNX / torch.export and scene inference through onnxruntime, against the PyTorch model."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from seglstm.inference.export import export_segmentor
from seglstm.inference.scene import SceneError
from seglstm.inference.scene.onnx import OnnxSegmentor
from tests.scene_helpers import MEAN3, STD3, palette, read, run, write_tif


class CumMax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.cummax(-1).values * 2.0


class Toy(nn.Module):
    """A 1x1-conv segmentor with a cummax over the width, the op the mLSTM stabiliser needs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y + 0.1 * y.double().cummax(-1).values.float()


META = dict(classes=["a", "b", "c", "d"], palette=palette(4), mean=MEAN3, std=STD3, num_classes=4)


def test_cummax_translation_matches_torch(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.float64)
    path = tmp_path / "cummax.onnx"
    from seglstm.inference.export import _cummax

    program = torch.onnx.export(CumMax(), (x,), dynamo=True, verbose=False,
                                custom_translation_table={torch.ops.aten.cummax.default: _cummax})
    program.save(path)
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    np.testing.assert_array_equal(got, 2.0 * np.maximum.accumulate(x.numpy(), axis=-1))


def test_onnx_scene_inference_matches_pytorch(tmp_path):
    torch.manual_seed(1)
    model = Toy().eval()
    path = export_segmentor(model, META, tmp_path / "toy.onnx", tile=64, batch=2)
    onnx_model = OnnxSegmentor(path)
    assert onnx_model.meta["tile"] == 64 and onnx_model.meta["classes"] == META["classes"]
    x = torch.randn(5, 3, 64, 64)  # not a multiple of the export's batch
    with torch.no_grad():
        assert (onnx_model(x) - model(x)).abs().max() < 1e-4

    rng = np.random.default_rng(5)
    src = write_tif(tmp_path / "in.tif", rng.integers(0, 256, (3, 150, 170), dtype=np.uint8))
    kw = dict(tile=64, overlap=16, batch_size=3)
    run(model, src, tmp_path / "torch.tif", MEAN3, STD3, 4, probs_path=tmp_path / "tp.tif", **kw)
    run(onnx_model, src, tmp_path / "onnx.tif", MEAN3, STD3, 4, probs_path=tmp_path / "op.tif", **kw)
    assert np.abs(read(tmp_path / "tp.tif")[0].astype(int) - read(tmp_path / "op.tif")[0]).max() <= 1
    assert (read(tmp_path / "torch.tif")[0] == read(tmp_path / "onnx.tif")[0]).mean() > 0.999

    small = write_tif(tmp_path / "small.tif", rng.integers(0, 256, (3, 40, 50), dtype=np.uint8))
    with pytest.raises(SceneError, match=r"exported for 64x64 tiles"):
        run(onnx_model, small, tmp_path / "s.tif", MEAN3, STD3, 4, tile=64, overlap=16)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(SceneError, match=r"--onnx .*bad\.onnx is not a readable ONNX model"):
        OnnxSegmentor(bad)


@pytest.mark.slow
def test_export_cli_vil_segmentor_onnx_within_1e4_and_pt2(tmp_path):
    """The real ViL segmentor (chunkwise mLSTM) through `seglstm export` and `predict-scene --onnx`."""
    import seglstm
    from seglstm.cli.main import main as cli
    from seglstm.config import META_KEY

    torch.manual_seed(2)
    kwargs = dict(depths=[1, 1, 1, 1], patch_size=8, img_size=64, channels=32, aux_cfg={"channels": 16})
    model = seglstm.create_model("seglstm_upernet_t", num_classes=4, **kwargs).eval()
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": model.state_dict(),
                META_KEY: dict(model="seglstm_upernet_t", model_kwargs=kwargs, test_cfg={}, **META)}, ckpt)
    onnx_path, pt2_path = tmp_path / "model.onnx", tmp_path / "model.pt2"
    assert cli(["export", "--ckpt", str(ckpt), "--format", "onnx", "--tile", "128", "--out", str(onnx_path)]) == 0
    assert cli(["export", "--ckpt", str(ckpt), "--format", "pt2", "--tile", "128", "--out", str(pt2_path)]) == 0

    x = torch.randn(3, 3, 128, 128)  # not the export's batch of 4
    with torch.no_grad():
        ref = model(x)
        assert (OnnxSegmentor(onnx_path)(x) - ref).abs().max() < 1e-4
        assert (torch.export.load(pt2_path).module()(x[:2].repeat(2, 1, 1, 1)[:4]) - torch.cat([ref[:2]] * 2)).abs().max() < 1e-4

    rng = np.random.default_rng(3)
    src = write_tif(tmp_path / "in.tif", rng.integers(0, 256, (3, 200, 230), dtype=np.uint8))
    common = [str(src), "--device", "cpu", "--quiet", "--batch-size", "2"]
    assert cli(["predict-scene", "--onnx", str(onnx_path), *common[:1], str(tmp_path / "o.tif"), *common[1:],
                "--probs", str(tmp_path / "op.tif")]) == 0
    assert cli(["predict-scene", "--ckpt", str(ckpt), *common[:1], str(tmp_path / "t.tif"), *common[1:],
                "--tile", "128", "--precision", "fp32", "--probs", str(tmp_path / "tp.tif")]) == 0
    assert np.abs(read(tmp_path / "op.tif")[0].astype(int) - read(tmp_path / "tp.tif")[0]).max() <= 1
    assert (read(tmp_path / "o.tif")[0] == read(tmp_path / "t.tif")[0]).mean() > 0.999
