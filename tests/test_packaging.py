"""``pip install seglstm`` without extras: a fresh venv holding only the mandatory dependencies imports the
package, fits the quick demo, runs predict-scene on a GeoTIFF, and every extra's absence gives its one line.

The venv is a plain one (no system site-packages). Installing torch and its CUDA libraries from the registry
takes minutes and about 6 GB, and tests reach no network, so the venv gets the mandatory closure's files
(resolved from pyproject.toml through the installed distributions' metadata, benchmarks/install_size.py) as
links to this environment's copies; seglstm itself is pip-installed into it, and ``pip check`` confirms that
its declared requirements are all met there. benchmarks/NOTES.md has the timing of a real registry install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from seglstm.utils.optional import EXTRAS, missing_extra_message

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from install_size import closure, pyproject_requirements  # noqa: E402

pytestmark = pytest.mark.slow


def _link(dists, site: Path) -> None:
    """Symlink every file ``dists`` installed into the venv's ``site`` (console scripts outside it skipped)."""
    for dist in dists.values():
        root = Path(dist.locate_file(""))
        for file in dist.files or []:
            if file.parts[0] == ".." or not (root / file).is_file():
                continue
            dst = site / file
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                dst.symlink_to(root / file)


def _run(args: list, cwd: Path, env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if ok:
        assert out.returncode == 0, f"{args}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> tuple[Path, dict]:
    """A fresh venv with seglstm and only its mandatory dependencies; returns (bin dir, environment)."""
    tmp = tmp_path_factory.mktemp("venv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env |= {"OMP_NUM_THREADS": "1", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    _run([sys.executable, "-m", "venv", tmp / "venv"], tmp, env)
    bin_dir = tmp / "venv" / "bin"
    site = Path(_run([bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     tmp, env).stdout.strip())
    mandatory = closure(pyproject_requirements((ROOT / "pyproject.toml").read_text(encoding="utf-8")))
    assert not set(mandatory) & {n.replace("_", "-") for n in EXTRAS}, "an optional package became mandatory"
    # the venv's bundled setuptools (Python < 3.12) makes way for the locked one, which torch requires
    _run([bin_dir / "python", "-m", "pip", "uninstall", "-q", "-y", "setuptools"], tmp, env, ok=False)
    _link(mandatory, site)
    if _run([bin_dir / "python", "-c", "import setuptools"], tmp, env, ok=False).returncode:
        from packaging.requirements import Requirement

        _link(closure([Requirement("setuptools")]), site)  # the build backend, where no dependency brings it
    src = tmp / "seglstm-src"  # a clean copy: the build writes its egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    _run(["cp", "-r", ROOT / "src", src / "src"], tmp, env)
    _run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", src], tmp, env)
    check = _run([bin_dir / "python", "-m", "pip", "check"], tmp, env, ok=False)
    assert check.returncode == 0, f"the venv lacks a declared dependency:\n{check.stdout}"
    return bin_dir, env


def test_the_package_imports_with_no_extra_present(venv, tmp_path):
    bin_dir, env = venv
    code = textwrap.dedent(f"""
        import importlib.util, sys
        import seglstm, seglstm.models
        assert seglstm.__file__.startswith(sys.prefix), seglstm.__file__
        seglstm.create_model("seglstm_upernet_t", num_classes=3, img_size=64)
        print([m for m in {sorted(EXTRAS)!r} if importlib.util.find_spec(m) is not None])
    """)
    assert _run([bin_dir / "python", "-c", code], tmp_path, env).stdout.strip() == "[]"


@pytest.fixture(scope="module")
def demo_run(venv, tmp_path_factory) -> tuple[Path, str]:
    bin_dir, env = venv
    tmp = tmp_path_factory.mktemp("demo")
    out = _run([bin_dir / "seglstm", "demo", "--quick", "--out", tmp / "run", "--data", tmp / "data",
                "--config", ROOT / "configs" / "demo.yaml"], tmp, env)
    return tmp / "run", out.stdout + out.stderr


def test_the_quick_demo_fits_without_extras_and_logs_csv(demo_run):
    run, output = demo_run
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert 0.0 <= metrics["mIoU"] <= 100.0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "logs" / "version_0" / "metrics.csv").is_file()
    assert not list(run.glob("logs/*/tb")), "no TensorBoard folder without the tensorboard extra"
    line = missing_extra_message("tensorboard", "Writing TensorBoard logs beside metrics.csv")
    assert output.count(line) == 1, output[-3000:]
    assert "(metrics.csv)" in (run / "report" / "report.md").read_text()


def test_predict_scene_on_a_geotiff_matches_the_full_install(venv, demo_run, tmp_path):
    """The same checkpoint and scene through the venv's seglstm and this environment's (every extra): the
    same class raster, georeferenced like the input."""
    bin_dir, env = venv
    run, _ = demo_run
    rng = np.random.default_rng()
    transform = from_origin(500000.0, 4100000.0, 0.5, 0.5)
    with rasterio.open(tmp_path / "scene.tif", "w", driver="GTiff", width=80, height=96, count=3,
                       dtype="uint8", crs="EPSG:32633", transform=transform) as ds:
        ds.write(rng.integers(0, 256, (3, 96, 80), dtype=np.uint8))
    args = ["predict-scene", "--threads", "1", "--ckpt", run / "checkpoints" / "last.ckpt", tmp_path / "scene.tif"]
    _run([bin_dir / "seglstm", *args, tmp_path / "venv.tif"], tmp_path, env)
    full_env = env | {"PYTHONPATH": str(ROOT / "src")}
    _run([sys.executable, "-m", "seglstm.cli.main", *args, tmp_path / "full.tif"], tmp_path, full_env)
    with rasterio.open(tmp_path / "venv.tif") as a, rasterio.open(tmp_path / "full.tif") as b:
        assert a.crs == b.crs and a.crs.to_epsg() == 32633 and a.transform == transform == b.transform
        got, ref = a.read(1), b.read(1)
    assert got.shape == (96, 80) and np.array_equal(got, ref)
    assert got.max() < 7 or got.max() == 255  # LoveDA's 7 classes (255: nodata)


def test_each_missing_extra_names_its_pip_install(venv, demo_run, tmp_path):
    bin_dir, env = venv
    ckpt = demo_run[0] / "checkpoints" / "last.ckpt"
    with rasterio.open(tmp_path / "red.tif", "w", driver="GTiff", width=32, height=32, count=1, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 4100000, 1, 1)) as ds:
        ds.write(np.zeros((1, 32, 32), np.uint8))
    item = {"type": "Feature", "stac_version": "1.0.0", "id": "x", "geometry": None, "properties": {},
            "links": [], "assets": {"red": {"href": "red.tif"}}}
    (tmp_path / "item.json").write_text(json.dumps(item))
    cli = {
        "onnx": (["predict-scene", "--onnx", "m.onnx", "red.tif", "o.tif"], "predict-scene"),
        "onnx-export": (["export", "--ckpt", ckpt, "--format", "onnx", "--tile", "64", "--out", "m.onnx"], "export"),
        "stac": (["predict-scene", "--ckpt", ckpt, "item.json", "o.tif", "--assets", "red"], "predict-scene"),
    }
    for name, (argv, cmd) in cli.items():
        out = _run([bin_dir / "seglstm", *argv], tmp_path, env, ok=False)
        last = out.stderr.strip().splitlines()[-1]
        extra = name.split("-")[0]
        assert out.returncode == 2 and last.startswith(f"seglstm {cmd}: error: "), (name, out.stderr[-2000:])
        assert last.endswith(f"pip install 'seglstm[{extra}]'"), (name, last)
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT / "benchmarks")!r})
        from seglstm.models import mamba
        from seglstm.utils.optional import MissingExtraError
        mamba._parallel_in_chunk = lambda device: True  # the GPU path of the chunked scan
        x = torch.randn(1, 4, 8)
        calls = [lambda: mamba.selective_scan(x, x, -torch.rand(4, 2), torch.randn(1, 2, 8), torch.randn(1, 2, 8)),
                 lambda: __import__("precision_accuracy").torchao_int8(torch.nn.Linear(2, 2))]
        for call in calls:
            try:
                call()
            except MissingExtraError as err:
                print(err)
    """)
    lines = _run([bin_dir / "python", "-c", code], tmp_path, env).stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].endswith("pip install 'seglstm[mamba]'"), lines
    assert lines[1].endswith("pip install 'seglstm[bench]'"), lines
