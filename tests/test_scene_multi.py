"""Mapping a region: many scenes into one folder, shared out over ranks (2 CPU processes on gloo), a failing
scene recorded while the others go on, the manifest, the VRT mosaic, the merged polygons, and a rank killed
in the middle of a scene whose rerun finishes only what is missing."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyogrio.raw
import pytest
import rasterio
import rasterio.merge
import rasterio.warp
from affine import Affine

from seglstm.inference.scene import NODATA as NODATA_CLASS
from seglstm.inference.scene import InputOptions, SceneError, open_input
from seglstm.inference.scene.region import Launch, Scene, expand_inputs
from tests.scene_helpers import CRS, T4, U3, palette, read, rule_reference, rule_segmentor, write_tif

ROOT = Path(__file__).resolve().parents[1]
NAMES = [f"s{i}" for i in range(5)]
CORRUPT = "s2"
BASE = ["predict-scene", "--ckpt", "m.pth", "--tile", "64", "--overlap", "16", "--batch-size", "4", "--device", "cpu",
        "--precision", "fp32", "--quiet"]  # fmt: skip
PRODUCTS = ["--vector", "polygons.gpkg", "--probs", "probs.tif"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _scenes(folder: Path, rng: np.random.Generator, height: int, width: int = 130) -> dict[str, np.ndarray]:
    """Five scenes side by side on one 0.5 m grid (blocky classes, a nodata corner in one), the third one
    not a raster at all. Returns the valid scenes' raw pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    raws = {}
    for i, name in enumerate(NAMES):
        if name == CORRUPT:
            (folder / f"{name}.tif").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
            continue
        coarse = rng.integers(1, 256, (3, -(-height // 8), -(-width // 8)), dtype=np.uint8)
        raw = np.kron(coarse, np.ones((1, 8, 8), np.uint8))[:, :height, :width].copy()
        if i == 3:
            raw[:, :40, :50] = 0
        transform = Affine(0.5, 0.0, 500_000.0 + i * width * 0.5, 0.0, -0.5, 4_200_000.0 - 8.0 * i)
        write_tif(folder / f"{name}.tif", raw, nodata=0, transform=transform)
        raws[name] = raw
    return raws


def _expected(raw: np.ndarray) -> np.ndarray:
    classes = rule_reference(raw, U3, T4)
    classes[(raw == 0).all(axis=0)] = NODATA_CLASS
    return classes


@pytest.fixture
def fake_loader(monkeypatch):
    from seglstm.inference import loading
    state = {"models": []}

    def load_segmentor(ckpt_path, config_path=None, map_location="cpu", unsafe=False):
        model, meta = rule_segmentor()
        state["models"].append(model)
        return model, meta

    monkeypatch.setattr(loading, "load_segmentor", load_segmentor)
    return state


def _features(path: Path) -> dict:
    meta, _, geoms, values = pyogrio.raw.read(path)
    return {
        "fields": list(meta["fields"]),
        "crs": meta["crs"],
        "rows": sorted(zip(*[list(v) for v in values], geoms)),
    }


def _reference_runs(seglstm, src: Path, ref: Path) -> None:
    for name in NAMES:
        if name != CORRUPT:
            out = ref / name
            assert seglstm([*BASE, str(src / f"{name}.tif"), str(out / "classes.tif"), "--vector",
                            str(out / "polygons.gpkg"), "--probs", str(out / "probs.tif")]) == 0  # fmt: skip


def _check_region(out: Path, ref: Path, raws: dict[str, np.ndarray], ranks: set[int]) -> None:
    """Per-scene products equal the single-scene runs; the manifest, VRT and merged layer agree with them."""
    manifest = json.loads((out / "manifest.json").read_text())
    records = {r["name"]: r for r in manifest["scenes"]}
    assert sorted(records) == NAMES and {r["rank"] for r in records.values()} == ranks
    bad = records[CORRUPT]
    assert bad["status"] == "failed" and str(Path(bad["input"]).name) == "s2.tif"
    assert "not a readable raster" in bad["error"] and "\n" not in bad["error"] and "s2.tif" in bad["error"]
    assert manifest["summary"]["failed"] == 1 and manifest["summary"]["ok"] == len(raws)
    for name, raw in raws.items():
        record = records[name]
        assert record["status"] == "ok" and record["error"] is None
        classes = read(out / name / "classes.tif")[0][0]
        np.testing.assert_array_equal(classes, _expected(raw))
        np.testing.assert_array_equal(classes, read(ref / name / "classes.tif")[0][0])
        np.testing.assert_array_equal(read(out / name / "probs.tif")[0], read(ref / name / "probs.tif")[0])
        assert _features(out / name / "polygons.gpkg") == _features(ref / name / "polygons.gpkg")
        counts = np.bincount(classes.ravel(), minlength=256)
        assert record["class_pixels"] == {c: int(counts[i]) for i, c in enumerate("abcd")}
        assert record["pixels"] == int((classes != NODATA_CLASS).sum())
        assert record["class_area"] == pytest.approx({c: counts[i] * 0.25 for i, c in enumerate("abcd")})
        assert record["outputs"] == {"classes": f"{name}/classes.tif", "probs": f"{name}/probs.tif",
                                     "vector": f"{name}/polygons.gpkg"}  # fmt: skip
    with (out / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["scene"], r["status"]) for r in rows] == [
        (n, "failed" if n == CORRUPT else "ok") for n in NAMES
    ]
    assert [int(r["pixels_c"] or 0) for r in rows] == [records[n]["class_pixels"].get("c", 0) for n in NAMES]

    # the VRT mosaic against rasterio's own merge of the same rasters
    rasters = [out / n / "classes.tif" for n in NAMES if n != CORRUPT]
    merged, transform = rasterio.merge.merge(rasters, nodata=NODATA_CLASS)
    with rasterio.open(out / "mosaic.vrt") as vrt:
        assert vrt.crs == rasterio.crs.CRS.from_user_input(CRS) and vrt.transform == transform
        assert vrt.nodata == NODATA_CLASS and vrt.dtypes == ("uint8",)
        mosaic = vrt.read(1)
        assert [vrt.colormap(1)[i][:3] for i in range(4)] == palette(4)
    np.testing.assert_array_equal(mosaic, merged[0])
    for name in raws:  # and each scene's pixels where it lies
        with rasterio.open(out / name / "classes.tif") as src:
            window = (
                rasterio.windows.from_bounds(*src.bounds, transform=transform).round_offsets().round_lengths()
            )
            np.testing.assert_array_equal(mosaic[window.toslices()], src.read(1))

    # one layer with every scene's polygons and a scene column
    layer = _features(out / "polygons.gpkg")
    assert layer["fields"] == ["class_id", "class_name", "scene"]
    for name in raws:
        own = _features(out / name / "polygons.gpkg")
        assert layer["crs"] == own["crs"]
        mine = [(*row[:2], row[-1]) for row in layer["rows"] if row[2] == name]
        assert mine == sorted(own["rows"])
    assert len(layer["rows"]) == sum(len(_features(out / n / "polygons.gpkg")["rows"]) for n in raws)


# --------------------------------------------------------------------------------------- fast tests
def test_inputs_from_files_globs_lists_and_stac_collections(tmp_path, rng):
    data = tmp_path / "data"
    raws = _scenes(data, rng, 40, 30)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# scenes\n{data / 's0.tif'}\n\n  {data / 's1.tif'}  \n")
    out = tmp_path / "out"
    scenes = expand_inputs([f"@{listing}", str(data / "s[34].tif"), str(data / "s0.tif")], out)
    assert scenes == [Scene(n, str(data / f"{n}.tif")) for n in ("s0", "s1", "s3", "s4")]
    with pytest.raises(SceneError, match=r"pattern .*nothing\*\.tif.* matches no file"):
        expand_inputs([str(data / "nothing*.tif")], out)
    with pytest.raises(SceneError, match=r"input list @.*missing\.txt: cannot read"):
        expand_inputs([f"@{tmp_path / 'missing.txt'}"], out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "s0.tif").write_bytes(b"")
    with pytest.raises(SceneError, match=r"would both write .*s0; rename one"):
        expand_inputs([str(data / "s0.tif"), str(tmp_path / "other" / "s0.tif")], out)

    # an ItemCollection: an item with a relative asset (copied with the asset made absolute) and one with
    # an absolute self link (read where it is)
    item = {"type": "Feature", "stac_version": "1.0.0", "geometry": None, "properties": {"datetime": "2024-01-01T00:00:00Z"},
            "links": []}  # fmt: skip
    (data / "item4.json").write_text(
        json.dumps({**item, "id": "tile/4", "assets": {"rgb": {"href": "s4.tif"}}})
    )
    fc = {"type": "FeatureCollection", "features": [
        {**item, "id": "tile/1", "assets": {"rgb": {"href": "s1.tif"}}},
        {**item, "id": "tile/4", "assets": {"rgb": {"href": "s4.tif"}},
         "links": [{"rel": "self", "href": str(data / "item4.json")}]}]}  # fmt: skip
    (data / "items.json").write_text(json.dumps(fc))
    scenes = expand_inputs([str(data / "items.json")], out)
    assert [s.name for s in scenes] == ["tile_1", "tile_4"]
    assert scenes[0].href == str(out / ".stac" / "tile_1.json") and scenes[1].href == str(data / "item4.json")
    for scene, name in zip(scenes, ("s1", "s4")):
        with open_input(scene.href, InputOptions(assets=("rgb",))) as src:
            np.testing.assert_array_equal(src.read([1, 2, 3])[0], raws[name])
    (data / "bad.json").write_text(json.dumps({"type": "FeatureCollection", "features": [{"id": "x"}]}))
    with pytest.raises(SceneError, match="feature 0 is not a STAC item"):
        expand_inputs([str(data / "bad.json")], out)


def test_launch_is_read_from_torchrun_and_slurm_environments():
    assert Launch.from_env({}) == Launch(0, 1, 0, "none")
    assert Launch.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Launch(3, 4, 1, "torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NAME": "map"}
    assert Launch.from_env(slurm) == Launch(5, 8, 1, "slurm")
    assert Launch.from_env({**slurm, "SLURM_JOB_NAME": "interactive"}) == Launch()
    with pytest.raises(SceneError, match="rank 4 is outside world size 4"):
        Launch.from_env({"RANK": "4", "WORLD_SIZE": "4"})
    assert Launch(1, 2, 1).device("cpu") == "cpu"


def test_each_rank_takes_its_local_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [Launch(r, 4, r % 2).device("auto") for r in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert Launch(3, 4, 3).device("cuda") == "cuda:1"  # one GPU per task (CUDA_VISIBLE_DEVICES): modulo
    assert Launch(1, 2, 1).device("cpu") == "cpu" and Launch(1, 2, 1).device("cuda:0") == "cuda:0"


def test_region_in_one_process_records_failures_and_reruns_only_what_is_left(
    tmp_path, rng, fake_loader, capsys
):
    from seglstm.cli.main import main as seglstm

    src, out, ref = tmp_path / "src", tmp_path / "out", tmp_path / "ref"
    raws = _scenes(src, rng, 300)
    _reference_runs(seglstm, src, ref)
    capsys.readouterr()
    assert seglstm([*BASE, str(src / "s*.tif"), "--out-dir", str(out), *PRODUCTS]) == 1
    err = capsys.readouterr().err
    assert "5 scene(s): 4 done, 1 failed" in err and "failed: s2" in err and "not a readable raster" in err
    _check_region(out, ref, raws, ranks={0})

    # a rerun with other settings is refused; the same command redoes only the failed scene
    assert seglstm([*BASE, str(src / "s*.tif"), "--out-dir", str(out), "--overlap", "8", *PRODUCTS]) == 2
    assert "holds a run made with different overlap" in capsys.readouterr().err
    stamps = {n: (out / n / "scene.json").stat().st_mtime_ns for n in raws}
    raws[CORRUPT] = _scenes(tmp_path / "fixed", np.random.default_rng(7), 300)["s1"]
    write_tif(
        src / "s2.tif", raws[CORRUPT], nodata=0, transform=Affine(0.5, 0, 500_130.0, 0, -0.5, 4_199_984.0)
    )
    fake_loader["models"].clear()
    assert seglstm([*BASE, str(src / "s*.tif"), "--out-dir", str(out), *PRODUCTS]) == 0
    assert "5 scene(s): 5 done, 0 failed, 1 run now" in capsys.readouterr().err
    assert {n: (out / n / "scene.json").stat().st_mtime_ns for n in stamps} == stamps
    np.testing.assert_array_equal(read(out / "s2" / "classes.tif")[0][0], _expected(raws[CORRUPT]))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"]["ok"] == 5 and manifest["summary"]["failed"] == 0
    counts = sum(np.bincount(_expected(r).ravel(), minlength=256) for r in raws.values())
    assert manifest["summary"]["class_pixels"] == {c: int(counts[i]) for i, c in enumerate("abcd")}
    assert manifest["summary"]["class_area"] == pytest.approx(
        {c: counts[i] * 0.25 for i, c in enumerate("abcd")}
    )
    with rasterio.open(out / "mosaic.vrt") as vrt:
        assert vrt.width == 5 * 130  # s2 now fills the gap


def test_region_arguments_are_checked(tmp_path, fake_loader, capsys):
    from seglstm.cli.main import main as seglstm

    with pytest.raises(SystemExit):
        seglstm([*BASE, "a.tif", "b.tif", "c.tif"])
    assert "several inputs with --out-dir" in capsys.readouterr().err
    assert (
        seglstm([*BASE, "a.tif", "--out-dir", str(tmp_path / "o"), "--vector", str(tmp_path / "v.gpkg")]) == 2
    )
    assert "file names inside each scene's folder" in capsys.readouterr().err
    assert seglstm([*BASE, "a.tif", "--out-dir", str(tmp_path / "o"), "--probs", "classes.tif"]) == 2
    assert "need different names" in capsys.readouterr().err
    assert seglstm([*BASE, str(tmp_path / "none*.tif"), "--out-dir", str(tmp_path / "o")]) == 2
    assert "matches no file" in capsys.readouterr().err
    assert not (tmp_path / "o" / "run.json").exists()  # nothing recorded for a run that never started


# --------------------------------------------------------------------------------- several processes
CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from seglstm.inference import loading
    from tests.scene_helpers import rule_segmentor
    from seglstm.cli.main import main

    hang, marker = int(sys.argv[1]), Path(sys.argv[2])
    loading.load_segmentor = lambda *a, **k: rule_segmentor(hang or None, marker)
    sys.exit(main(sys.argv[3:]))
    """
)


def _free_port(lo: int = 0) -> int:
    """A free port (at or above ``lo`` when given: SLURM's port is 15000 + the job id's last 4 digits)."""
    for port in [0] if not lo else range(lo, lo + 10_000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def _launch(tmp_path: Path, args: list[str], hang: dict[int, int] | None = None, launcher: str = "env"):
    """Two ranks as a launcher starts them: ``env`` as torchrun sets each worker's environment, ``torchrun``
    itself, or ``slurm`` as ``srun --ntasks 2`` does (SLURM_PROCID etc., no MASTER_ADDR). Returns the
    processes and their log files (a full pipe would stall a rank, so logs go to files)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TORCHELASTIC", "LOCAL_RANK", "RANK", "WORLD_SIZE", "SLURM", "MASTER_"))}  # fmt: skip
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    child = [sys.executable, "-c", CHILD]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), "--no-python", *child, "0", str(tmp_path / "hang"), *args]  # fmt: skip
        log = tmp_path / "torchrun.log"
        with log.open("w") as fh:
            return [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=fh)], [log]
    if launcher == "slurm":
        port = _free_port(15000)
        env.update(SLURM_JOB_ID=str(900_000 + port - 15000), SLURM_JOB_NAME="map", SLURM_NTASKS="2",
                   SLURM_NODELIST="localhost", SLURM_NNODES="1")  # fmt: skip
        keys = ("SLURM_PROCID", "SLURM_LOCALID")
    else:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
        keys = ("RANK", "LOCAL_RANK")
    procs, logs = [], []
    for rank in (0, 1):
        logs.append(tmp_path / f"rank{rank}.log")
        with logs[-1].open("w") as fh:
            procs.append(subprocess.Popen(
                [*child, str((hang or {}).get(rank, 0)), str(tmp_path / f"hang{rank}"), *args],
                cwd=ROOT, env={**env, **dict.fromkeys(keys, str(rank))}, stdout=fh, stderr=fh,
            ))  # fmt: skip
    return procs, logs


def _tails(logs: list[Path]) -> str:
    return "\n".join(log.read_text()[-3000:] for log in logs)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["env", "torchrun", "slurm"])
def test_two_ranks_on_gloo_share_the_scenes(tmp_path, rng, fake_loader, launcher):
    from seglstm.cli.main import main as seglstm

    src, out, ref = tmp_path / "src", tmp_path / "out", tmp_path / "ref"
    raws = _scenes(src, rng, 300)
    _reference_runs(seglstm, src, ref)
    procs, logs = _launch(
        tmp_path, [*BASE, str(src / "s*.tif"), "--out-dir", str(out), *PRODUCTS], launcher=launcher
    )
    for proc in procs:
        proc.wait(timeout=600)
    # every rank reports the failed scene (torchrun then reports its workers' failure)
    assert all(p.returncode not in (0, None) for p in procs) and procs[0].returncode != 2, _tails(logs)
    _check_region(out, ref, raws, ranks={0, 1})
    records = {r["name"]: r["rank"] for r in json.loads((out / "manifest.json").read_text())["scenes"]}
    assert records == {"s0": 0, "s1": 1, "s2": 0, "s3": 1, "s4": 0}  # round-robin over the sorted names
    assert "5 scene(s): 4 done, 1 failed" in logs[0].read_text()


@pytest.mark.slow
def test_a_rank_killed_mid_scene_and_the_rerun_finishes_only_what_is_missing(tmp_path, rng, fake_loader):
    from seglstm.cli.main import main as seglstm

    src, out, ref = tmp_path / "src", tmp_path / "out", tmp_path / "ref"
    raws = _scenes(src, rng, 600)
    _reference_runs(seglstm, src, ref)
    # 600x130 at tile 64, overlap 16: 13 x 3 windows, 10 batches of 4 per scene; rank 1 runs s1 then s3 and
    # hangs at its 16th batch, the 6th of s3, after s3's first block row is flushed
    procs, logs = _launch(
        tmp_path, [*BASE, str(src / "s*.tif"), "--out-dir", str(out), *PRODUCTS], hang={1: 16}
    )
    try:
        deadline = time.monotonic() + 400
        while not (tmp_path / "hang1").exists():
            assert procs[1].poll() is None, _tails(logs)
            assert time.monotonic() < deadline, "rank 1 never reached the hanging batch"
            time.sleep(0.2)
        assert (out / "s3" / ".classes.tif.partial" / "progress.json").is_file()
        os.kill(procs[1].pid, signal.SIGKILL)
        procs[1].wait(30)
        procs[0].wait(timeout=300)  # it finishes its scenes, then loses its peer at the final meeting
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert procs[1].returncode == -signal.SIGKILL and procs[0].returncode == 2, _tails(logs)
    assert "another rank stopped before the end" in logs[0].read_text()
    assert not (out / "manifest.json").exists() and not (out / "s3" / "classes.tif").exists()
    done = {n: (out / n / "scene.json").stat().st_mtime_ns for n in ("s0", "s1", "s4")}

    # the rerun (here one process) skips the finished scenes, retries the failed one, resumes s3
    fake_loader["models"].clear()
    assert seglstm([*BASE, str(src / "s*.tif"), "--out-dir", str(out), *PRODUCTS]) == 1
    assert {n: (out / n / "scene.json").stat().st_mtime_ns for n in done} == done
    record = json.loads((out / "s3" / "scene.json").read_text())
    assert record["status"] == "ok" and 0 < record["resumed_from_tile"] < record["tiles"]
    assert fake_loader["models"][0].calls < 10  # only the rest of s3 ran (s2 fails before any window)
    _check_region(out, ref, raws, ranks={0, 1})


def test_scenes_in_two_crss_get_no_mosaic_until_warped_to_one(tmp_path, rng, fake_loader, caplog):
    from seglstm.cli.main import main as seglstm

    raw = [
        np.kron(rng.integers(1, 256, (3, 7, 9), dtype=np.uint8), np.ones((1, 10, 10), np.uint8))
        for _ in range(2)
    ]
    write_tif(tmp_path / "a.tif", raw[0])
    # b lies just east of a, in the next UTM zone
    (x,), (y,) = rasterio.warp.transform(CRS, "EPSG:32634", [500_045.0], [4_200_000.0])
    write_tif(tmp_path / "b.tif", raw[1], crs="EPSG:32634", transform=Affine(0.5, 0, x, 0, -0.5, y))
    args = [*BASE, str(tmp_path / "a.tif"), str(tmp_path / "b.tif"), "--vector", "p.gpkg"]
    # a first run with a alone has a mosaic; adding b (another CRS) removes it rather than leave it stale
    assert (
        seglstm([*BASE, str(tmp_path / "a.tif"), "--vector", "p.gpkg", "--out-dir", str(tmp_path / "mixed")])
        == 0
    )
    assert (tmp_path / "mixed" / "mosaic.vrt").is_file() and (tmp_path / "mixed" / "p.gpkg").is_file()
    with caplog.at_level("WARNING"):
        assert seglstm([*args, "--out-dir", str(tmp_path / "mixed")]) == 0
    summary = json.loads((tmp_path / "mixed" / "manifest.json").read_text())["summary"]
    assert summary["ok"] == 2 and summary["mosaic"] is None and summary["vector"] is None
    assert "2 CRSs" in summary["mosaic_note"] and "--dst-crs" in summary["mosaic_note"]
    assert "2 CRSs" in summary["vector_note"] and summary["class_area"] is None
    assert not (tmp_path / "mixed" / "mosaic.vrt").exists() and not (tmp_path / "mixed" / "p.gpkg").exists()
    assert "no mosaic: the scenes are in 2 CRSs (EPSG:32633, EPSG:32634)" in caplog.text

    assert seglstm([*args, "--out-dir", str(tmp_path / "one"), "--dst-crs", "EPSG:32633"]) == 0
    out = tmp_path / "one"
    rasters = [out / n / "classes.tif" for n in ("a", "b")]
    with rasterio.open(rasters[0]) as a, rasterio.open(rasters[1]) as b:
        union = (min(a.bounds[0], b.bounds[0]), min(a.bounds[1], b.bounds[1]),
                 max(a.bounds[2], b.bounds[2]), max(a.bounds[3], b.bounds[3]))  # fmt: skip
        finest = min(a.res[0], b.res[0])
    with rasterio.open(out / "mosaic.vrt") as vrt:
        assert vrt.crs == rasterio.crs.CRS.from_user_input(CRS) and vrt.res == pytest.approx((finest, finest))
        assert vrt.bounds == pytest.approx(union, abs=finest)
        mosaic = vrt.read(1)
        # the scenes' grids are not aligned (b was warped, its origin falls between a's rows), so the mosaic
        # resamples (nearest) onto its grid: GDAL's warper, putting each raster on that grid, agrees but for
        # the pixels on a rounding edge (one row)
        expected = np.full(mosaic.shape, NODATA_CLASS, np.uint8)
        for raster in rasters:
            with rasterio.open(raster) as src:
                one = np.full(mosaic.shape, NODATA_CLASS, np.uint8)
                rasterio.warp.reproject(src.read(1), one, src_transform=src.transform, src_crs=src.crs,
                                        dst_transform=vrt.transform, dst_crs=vrt.crs, src_nodata=NODATA_CLASS,
                                        dst_nodata=NODATA_CLASS, resampling=rasterio.warp.Resampling.nearest)  # fmt: skip
                expected = np.where(one != NODATA_CLASS, one, expected)
    assert (mosaic != NODATA_CLASS).sum() > 0.9 * 2 * 70 * 90
    assert (mosaic != expected).sum() <= mosaic.shape[1] * 1.5
    assert {row[2] for row in _features(out / "p.gpkg")["rows"]} == {"a", "b"}


def test_vrt_mosaics_rasters_of_two_pixel_sizes_at_the_finer_one(tmp_path, rng):
    from seglstm.inference.scene.region import write_vrt

    fine = rng.integers(0, 4, (1, 40, 60), dtype=np.uint8)
    coarse = rng.integers(0, 4, (1, 30, 20), dtype=np.uint8)
    coarse[0, :5, :5] = NODATA_CLASS
    a = write_tif(tmp_path / "a.tif", fine, nodata=NODATA_CLASS)
    b = write_tif(tmp_path / "b.tif", coarse, nodata=NODATA_CLASS,
                  transform=Affine(1.0, 0, 500_000.0 + 25.0, 0, -1.0, 4_200_000.0 + 4.0))  # fmt: skip
    vrt_path = tmp_path / "sub" / "m.vrt"
    write_vrt(vrt_path, [a, b], ["w", "x", "y", "z"], palette(4))
    merged, transform = rasterio.merge.merge([b, a], res=0.5, nodata=NODATA_CLASS)  # b drawn over a
    with rasterio.open(vrt_path) as vrt:
        assert vrt.res == (0.5, 0.5) and vrt.transform == transform
        np.testing.assert_array_equal(vrt.read(1), merged[0])
    assert (merged[0] == NODATA_CLASS).any() and (merged[0] != NODATA_CLASS).sum() > 40 * 60


def test_a_remote_item_collection_resolves_assets_against_its_url_and_refuses_local_ones(tmp_path):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    item = {"type": "Feature", "stac_version": "1.0.0", "geometry": None, "links": [],
            "properties": {"datetime": "2024-01-01T00:00:00Z"}}  # fmt: skip
    fc = {
        "type": "FeatureCollection",
        "features": [{**item, "id": "t1", "assets": {"rgb": {"href": "img/t1.tif"}}}],
    }
    (tmp_path / "stac").mkdir()
    (tmp_path / "stac" / "items.json").write_text(json.dumps(fc))
    fc["features"].append({**item, "id": "t2", "assets": {"rgb": {"href": str(tmp_path / "t2.tif")}}})
    (tmp_path / "stac" / "mixed.json").write_text(json.dumps(fc))
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/stac/"
    try:
        (scene,) = expand_inputs([base + "items.json"], tmp_path / "out")
        copy = json.loads(Path(scene.href).read_text())
        assert scene.name == "t1" and copy["assets"]["rgb"]["href"] == base + "img/t1.tif"
        with pytest.raises(SceneError, match=r"item t2 asset rgb points at the local file .*t2\.tif"):
            expand_inputs([base + "mixed.json"], tmp_path / "out")
    finally:
        server.shutdown()
        server.server_close()
