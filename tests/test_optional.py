"""Optional dependencies (the extras): each missing one gives the one line naming its ``pip install``, and the
core (import, models, training, scene inference on local files) imports none of them.

A package counts as missing here when ``sys.modules[name] = None`` (Python then refuses to import it);
tests/test_packaging.py checks the same in a venv that really lacks them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser as the tomli package
    import tomli as tomllib
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from seglstm.utils.optional import EXTRAS, MissingExtraError, available, missing_extra_message, require

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = (*EXTRAS, "radon", "hypothesis", "tensorboardX")  # radon and hypothesis: bench and dev tools


def _pyproject_extras() -> dict[str, list[Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {k: [Requirement(r) for r in v] for k, v in project["optional-dependencies"].items()}


def _block(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make ``names`` (and their submodules already loaded) unimportable for this test."""
    for name in names:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setitem(sys.modules, name, None)


def _is_install_line(text: str, extra: str) -> bool:
    return "\n" not in text.strip() and text.strip().endswith(f"pip install 'seglstm[{extra}]'")


def test_every_optional_module_belongs_to_its_extra_in_pyproject():
    extras = _pyproject_extras()
    for module, extra in EXTRAS.items():
        names = {canonicalize_name(r.name) for r in extras[extra]}
        assert canonicalize_name(module) in names, (module, extra, names)
    for req in extras["all"]:
        assert canonicalize_name(req.name) == "seglstm", req
    in_all = {e for req in extras["all"] for e in req.extras}
    assert in_all == set(extras) - {"all", "dev", "mamba-cuda"}, in_all  # mamba-cuda needs a CUDA toolkit
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    mandatory = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    optional = {canonicalize_name(r.name) for reqs in extras.values() for r in reqs}
    assert not mandatory & optional, mandatory & optional
    assert all(Requirement(r).specifier for r in project["dependencies"]), "every dependency has a lower bound"


def test_constraints_pin_every_requirement_within_its_range():
    """constraints.txt (what make test installs) pins each requirement of [dev,all], inside pyproject's range,
    and the torch CI runs."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [r for name, rs in _pyproject_extras().items() if name != "mamba-cuda" for r in rs]
    for req in reqs:
        name = canonicalize_name(req.name)
        if name == "seglstm" or (req.marker is not None and not req.marker.evaluate()):
            continue  # the extras' self-reference, or a requirement of another Python
        assert name in pins, f"constraints.txt does not pin {req.name}"
        assert pins[name] in req.specifier, f"constraints.txt pins {req.name}=={pins[name]}, outside {req}"


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_require_names_the_pip_install_of_a_missing_extra(module, monkeypatch):
    _block(monkeypatch, module)
    assert not available(module)
    with pytest.raises(MissingExtraError) as err:
        require(module, "some feature")
    assert str(err.value) == f"some feature needs {module}, which is not installed: pip install 'seglstm[{EXTRAS[module]}]'"
    assert isinstance(err.value, ImportError)


def test_require_returns_the_module_and_refuses_unknown_names():
    assert require("onnx", "x") is sys.modules["onnx"]
    assert require("pystac", "x") is sys.modules["pystac"]
    with pytest.raises(KeyError, match="not an optional dependency"):
        require("numpy", "x")


def test_an_installed_extra_that_does_not_import_says_so(tmp_path, monkeypatch):
    fake = tmp_path / "torchao"
    fake.mkdir()
    (fake / "__init__.py").write_text("import a_dependency_that_is_gone\n")
    _block(monkeypatch, "torchao")
    monkeypatch.delitem(sys.modules, "torchao")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtraError) as err:
        require("torchao", "int8")
    text = str(err.value)
    assert "which does not import" in text and "a_dependency_that_is_gone" in text
    assert _is_install_line(text, "bench")


def test_onnx_features_without_the_onnx_extra(monkeypatch, tmp_path):
    from seglstm.inference.export import export_segmentor
    from seglstm.inference.scene.onnx import OnnxSegmentor

    _block(monkeypatch, "onnxruntime")
    with pytest.raises(MissingExtraError) as err:
        OnnxSegmentor(tmp_path / "m.onnx")
    assert _is_install_line(str(err.value), "onnx") and "onnxruntime" in str(err.value)
    _block(monkeypatch, "onnxscript")
    with pytest.raises(MissingExtraError) as err:
        export_segmentor(torch.nn.Identity(), {"mean": [0.0] * 3}, tmp_path / "m.onnx", tile=32)
    assert _is_install_line(str(err.value), "onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_the_cli_prints_the_one_line_and_exits_2(monkeypatch, tmp_path, capsys):
    from seglstm.cli.main import main

    _block(monkeypatch, "onnxruntime")
    threads = str(torch.get_num_threads())  # the dispatcher applies --threads to this process
    argv = ["predict-scene", "--threads", threads, "--omp-wait-policy", "inherit", "--onnx", str(tmp_path / "m.onnx"),
            str(tmp_path / "in.tif"), str(tmp_path / "out.tif")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("seglstm predict-scene: error: --onnx (running an ONNX model) needs onnxruntime, which is not "
                   "installed: pip install 'seglstm[onnx]'")


def test_stac_inputs_without_the_stac_extra(monkeypatch, tmp_path):
    from seglstm.inference.scene import region, source

    item = tmp_path / "item.json"
    item.write_text(json.dumps({"type": "Feature", "assets": {}}))
    _block(monkeypatch, "pystac")
    for call in (lambda: source._stac_assets(str(item), ["red"]), lambda: region._read_json(str(item), "input")):
        with pytest.raises(MissingExtraError) as err:
            call()
        assert _is_install_line(str(err.value), "stac")


def test_mamba_parallel_scan_without_the_mamba_extra(monkeypatch):
    from seglstm.models import mamba

    gen = torch.Generator().manual_seed(5)
    b, d, n, length = 1, 4, 3, 12
    kw = dict(u=torch.randn(b, d, length, generator=gen), delta=torch.randn(b, d, length, generator=gen),
              A=-torch.rand(d, n, generator=gen), B=torch.randn(b, n, length, generator=gen),
              C=torch.randn(b, n, length, generator=gen))
    sequential = mamba.selective_scan(**kw, backend="pscan")  # the CPU path needs no mambapy
    _block(monkeypatch, "mambapy")
    assert torch.equal(mamba.selective_scan(**kw, backend="pscan"), sequential)
    monkeypatch.setattr(mamba, "_parallel_in_chunk", lambda device: True)  # the GPU path
    with pytest.raises(MissingExtraError) as err:
        mamba.selective_scan(**kw, backend="pscan")
    assert _is_install_line(str(err.value), "mamba") and "mambapy" in str(err.value)
    _block(monkeypatch, "mamba_ssm")
    mamba._mamba_ssm_scan_fn.cache_clear()
    try:
        assert mamba.MAMBA_SSM_AVAILABLE is False
        with pytest.raises(RuntimeError, match=r"pip install 'seglstm\[mamba-cuda\]'"):
            mamba.selective_scan(**kw, backend="mamba_ssm")
    finally:
        mamba._mamba_ssm_scan_fn.cache_clear()


def test_default_loggers_without_tensorboard_write_csv_and_say_so(monkeypatch, tmp_path, caplog):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from seglstm.training import trainer

    assert [type(x) for x in trainer.default_loggers(str(tmp_path / "a"))] == [CSVLogger, TensorBoardLogger]
    _block(monkeypatch, "tensorboard")
    trainer._note_no_tensorboard.cache_clear()
    with caplog.at_level("INFO"):
        loggers = trainer.default_loggers(str(tmp_path / "b"))
        trainer.default_loggers(str(tmp_path / "c"))
    assert [type(x) for x in loggers] == [CSVLogger]
    said = [r.getMessage() for r in caplog.records if "tensorboard" in r.getMessage()]
    assert said == [missing_extra_message("tensorboard", "Writing TensorBoard logs beside metrics.csv")]
    trainer._note_no_tensorboard.cache_clear()


def test_the_core_imports_no_optional_package():
    """``import seglstm``, the models (a Seg-LSTM and the Mamba comparison model built), training and the
    scene-inference path, in a fresh interpreter: none of the extras' packages is loaded."""
    code = textwrap.dedent(f"""
        import sys
        import seglstm
        import seglstm.models
        seglstm.create_model("seglstm_upernet_t", num_classes=3, img_size=64)
        seglstm.create_model("mamba_upernet", num_classes=3)
        import seglstm.cli.main, seglstm.cli.predict_scene, seglstm.cli.export, seglstm.cli.lightning
        import seglstm.inference.loading, seglstm.inference.export, seglstm.training.trainer
        from seglstm.inference.scene import onnx, region, source
        from seglstm.models import mamba
        optional = {list(OPTIONAL)!r}
        print([m for m in sys.modules if m.split(".")[0] in optional])
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout
