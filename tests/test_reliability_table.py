"""Bad input everywhere: each case runs through the public CLI or API, must fail with a message that names
the culprit, and must leave the outputs it could have touched byte-identical (or absent).

``SEGLSTM_WRITE_RELIABILITY_DOC=1 pytest tests/test_reliability_table.py`` rewrites ``docs/reliability.md``
from the run; without it the test checks that the document lists exactly the cases run here.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.transform import Affine

from seglstm.cli.main import main as seglstm
from seglstm.inference.loading import load_segmentor
from seglstm.models.checkpoint import load_pretrained
from seglstm.training.task import META_KEY
from seglstm.utils.io import torch_load
from tests.test_reliability import malicious_checkpoint
from tests.test_reliability_helpers import RelTinySeg, make_synth, tree_digest, write_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


@dataclass
class Case:
    area: str
    bad_input: str
    run: Callable[[], str]  # returns what the user sees
    expect: str  # a regex the message must contain (names the file, key or argument)
    watch: list[Path]  # outputs that must stay unchanged
    note: str = ""  # what the outputs column says instead, for a case checked otherwise


class Env:
    """Files the cases share: a synthetic dataset, a good checkpoint, a good GeoTIFF, a finished run."""

    def __init__(self, tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.tmp, self.capsys = tmp, capsys
        self.data = make_synth(tmp / "loveda")
        self.run_dir = tmp / "run"
        self.cfg = write_config(tmp / "c.yaml", self.data, self.run_dir, max_steps=2)
        assert seglstm(["fit", "--config", str(self.cfg)]) == 0
        self.capsys.readouterr()
        self.ckpt = self.run_dir / "checkpoints" / "last.ckpt"
        self.tif = self.geotiff(tmp / "scene.tif", np.random.default_rng(0).integers(0, 255, (3, 64, 80), np.uint8))
        self.out = tmp / "out"

    def geotiff(self, path: Path, data: np.ndarray, crs: str | None = "EPSG:32633") -> Path:
        profile = dict(driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                       dtype=data.dtype.name, transform=Affine(0.5, 0, 5e5, 0, -0.5, 4.2e6), crs=crs)  # fmt: skip
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
        return path

    def cli(self, *argv: str) -> str:
        """Run ``seglstm argv``; the outcome is the exit status and the error line the user reads."""
        try:
            rc = seglstm(list(argv))
        except SystemExit as stop:  # argparse / jsonargparse usage errors
            rc = stop.code
        err = self.capsys.readouterr().err
        lines = [ln.strip() for ln in err.splitlines() if re.search(r"error|unknown command", ln, re.I)]
        assert rc not in (0, None), f"seglstm {' '.join(argv)} succeeded; stderr: {err[-2000:]}"
        return f"exit {rc}: {lines[-1] if lines else err.strip().splitlines()[-1]}"

    @staticmethod
    def api(fn: Callable[[], object]) -> str:
        try:
            fn()
        except Exception as err:  # the case table records whatever the user would see
            return f"{type(err).__name__}: {err}"
        raise AssertionError("the call succeeded")

    def data_copy(self, name: str, damage: Callable[[Path], None]) -> Path:
        root = self.tmp / name
        shutil.copytree(self.data, root)
        damage(root)
        return root

    def fit_on(self, root: Path, *extra: str) -> str:
        run = self.tmp / f"run_{root.name}"
        cfg = write_config(self.tmp / f"{root.name}.yaml", root, run, max_steps=2)
        return self.cli("fit", "--config", str(cfg), *extra)

    def yaml(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text, encoding="utf-8")
        return path


def _first_image(root: Path, split: str = "train") -> Path:
    return sorted((root / "img_dir" / split).iterdir())[0]


def _first_mask(root: Path, split: str = "train") -> Path:
    return sorted((root / "ann_dir" / split).iterdir())[0]


def cases(e: Env) -> list[Case]:
    t = e.tmp
    evil = malicious_checkpoint(t / "evil.pth", t / "pwned")
    truncated = t / "truncated.ckpt"
    truncated.write_bytes(e.ckpt.read_bytes()[:4096])
    empty = t / "empty.ckpt"
    empty.write_bytes(b"")
    not_dict = t / "tensor.pth"
    torch.save(torch.zeros(3), not_dict)
    weights_only = t / "mmseg_weights.pth"
    torch.save({"state_dict": RelTinySeg(7).state_dict()}, weights_only)
    wrong_classes = t / "five_classes.pth"
    torch.save({"state_dict": RelTinySeg(5).state_dict()}, wrong_classes)
    meta_ckpt = t / "model.ckpt"
    meta = dict(model="rel_tiny_seg", model_kwargs={}, num_classes=7, classes=[f"c{i}" for i in range(7)],
                palette=[[i, i, i] for i in range(7)], mean=[0.0] * 3, std=[1.0] * 3, test_cfg={})  # fmt: skip
    torch.save({"state_dict": RelTinySeg(7).state_dict(), META_KEY: meta}, meta_ckpt)
    scene_out = t / "scene_out.tif"
    scene = lambda *a: e.cli("predict-scene", *a, "--quiet", "--device", "cpu")  # noqa: E731
    runs, out = e.run_dir, e.out
    base = e.cfg
    no_crs = e.geotiff(t / "no_crs.tif", np.zeros((3, 32, 32), np.uint8), crs=None)
    two_band = e.geotiff(t / "two_band.tif", np.zeros((2, 32, 32), np.uint8))
    not_tiff = t / "notes.tif"
    not_tiff.write_text("this is not a raster")
    (t / "blocker").write_text("a file where the run folder's parent should be")

    def bomb(root: Path) -> None:
        img = _first_image(root)
        Image.new("RGB", (400, 400)).save(img)
        Image.new("L", (400, 400)).save(_first_mask(root))

    return [
        # -- checkpoints
        Case("checkpoint", "pickle whose metadata runs code (`Path.touch`) given to `predict-scene --ckpt`",
             lambda: scene(str(e.tif), str(scene_out), "--ckpt", str(evil)), r"refusing to load .*evil\.pth.*--unsafe-load",
             [scene_out, t / "pwned"]),
        Case("checkpoint", "the same pickle as `fit --ckpt_path` (Lightning's resume path)",
             lambda: e.cli("fit", "--config", str(base), "--ckpt_path", str(evil)), r"refusing to load .*evil\.pth", [runs, t / "pwned"]),
        Case("checkpoint", "the same pickle as `predict --ckpt_path`",
             lambda: e.cli("predict", "--config", str(base), "--data.predict_root", str(e.data / "img_dir" / "val"),
                           "--ckpt_path", str(evil), "--out", str(out)), r"refusing to load .*evil\.pth", [out, t / "pwned"]),
        Case("checkpoint", "checkpoint truncated to 4 KiB (`predict-scene`)",
             lambda: scene(str(e.tif), str(scene_out), "--ckpt", str(truncated)), r"truncated\.ckpt \(4096 bytes\): truncated",
             [scene_out]),
        Case("checkpoint", "empty file as `test --ckpt_path`",
             lambda: e.cli("test", "--config", str(base), "--ckpt_path", str(empty)), r"empty\.ckpt \(0 bytes\)", [runs]),
        Case("checkpoint", "a bare tensor instead of a checkpoint (`load_segmentor`)",
             lambda: e.api(lambda: load_segmentor(not_dict)), r"tensor\.pth: expected a checkpoint dictionary", []),
        Case("checkpoint", "mmseg-style weights without a config (`predict-scene`)",
             lambda: scene(str(e.tif), str(scene_out), "--ckpt", str(weights_only)), r"mmseg_weights\.pth does not record its model",
             [scene_out]),
        Case("checkpoint", "5-class weights into a 7-class model (`load_pretrained`)",
             lambda: e.api(lambda: load_pretrained(RelTinySeg(7), wrong_classes)),
             r"five_classes\.pth .*decode_head\.weight: checkpoint \(5, 8, 1, 1\) vs model \(7, 8, 1, 1\)", []),
        Case("checkpoint", "checkpoint path that does not exist (`predict-scene`)",
             lambda: scene(str(e.tif), str(scene_out), "--ckpt", str(t / "missing.ckpt")), r"missing\.ckpt does not exist",
             [scene_out]),
        Case("checkpoint", "`test --ckpt_path last` in a run folder without checkpoints",
             lambda: e.cli("test", "--config", str(base), "--ckpt_path", "last", "--trainer.default_root_dir", str(t / "fresh")),
             r"--ckpt_path last: no such checkpoint in .*fresh/checkpoints", [t / "fresh"]),
        # -- configs
        Case("config", "`class_path: os.system` as a callback",
             lambda: e.cli("fit", "--config", str(e.yaml("os.yaml", base.read_text().replace(
                 "seglstm.training.callbacks.RunCheckpoint", "os.system")))),
             r"trainer\.callbacks\[0\]\.class_path='os\.system' is outside", [runs]),
        Case("config", "`--trainer.logger.class_path subprocess.Popen` on the command line",
             lambda: e.cli("fit", "--config", str(base), "--trainer.logger.class_path", "subprocess.Popen"),
             r"trainer\.logger\.class_path='subprocess\.Popen'", [runs]),
        Case("config", "YAML with a `!!python/object/apply:os.system` tag",
             lambda: e.cli("fit", "--config", str(e.yaml("tag.yaml", "trainer:\n  max_steps: !!python/object/apply:os.system ['true']\n"))),
             r"tag\.yaml is not valid YAML", []),
        Case("config", "YAML syntax error",
             lambda: e.cli("fit", "--config", str(e.yaml("broken.yaml", "model: [unclosed\n"))), r"broken\.yaml is not valid YAML", []),
        Case("config", "`_base_` files that include each other",
             lambda: (e.yaml("b.yaml", "_base_: [a.yaml]\n"), e.cli("fit", "--config", str(e.yaml("a.yaml", "_base_: [b.yaml]\n"))))[1],
             r"_base_ cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml", []),
        Case("config", "`_base_` naming a missing file",
             lambda: e.cli("fit", "--config", str(e.yaml("orphan.yaml", "_base_: [nowhere.yaml]\n"))), r"nowhere\.yaml does not exist", []),
        Case("config", "a list instead of a mapping at the top level",
             lambda: e.cli("fit", "--config", str(e.yaml("list.yaml", "- 1\n- 2\n"))), r"list\.yaml must hold a mapping", []),
        Case("config", "`model.num_classes: 5` for the 7-class LoveDA data",
             lambda: e.cli("fit", "--config", str(base), "--model.num_classes", "5"), r"model\.num_classes=5 conflicts with data\.dataset='loveda'", [runs]),
        Case("config", "unknown model preset",
             lambda: e.cli("fit", "--config", str(base), "--model.model", "seglstm_upernet_xl"), r"model\.model: unknown model 'seglstm_upernet_xl'", [runs]),
        Case("config", "`data.root` that does not exist",
             lambda: e.cli("fit", "--config", str(base), "--data.root", str(t / "no_data")), r"data\.root: .*no_data is not a directory", [runs]),
        Case("config", "config file that does not exist",
             lambda: e.cli("fit", "--config", str(t / "nope.yaml")), r"--config .*nope\.yaml: file does not exist", []),
        # -- command-line arguments
        Case("cli", "`--trainer.unsafe_load true` without the `--unsafe-load` flag",
             lambda: e.cli("fit", "--config", str(base), "--trainer.unsafe_load", "true"), r"needs the --unsafe-load flag", [runs]),
        Case("cli", "`--allow-class-path` without a module",
             lambda: e.cli("fit", "--config", str(base), "--allow-class-path"), r"--allow-class-path needs a module name", [runs]),
        Case("cli", "unknown sub-command `seglstm fitt`", lambda: e.cli("fitt"), r"unknown command 'fitt'", []),
        Case("cli", "`--data.batch_size 0`",
             lambda: e.cli("fit", "--config", str(base), "--data.batch_size", "0"), r"batch_size", [runs]),
        Case("cli", "`--trainer.max_nonfinite_steps -1`",
             lambda: e.cli("fit", "--config", str(base), "--trainer.max_nonfinite_steps", "-1"), r"max_consecutive must be >= 0", [runs]),
        Case("cli", "`predict-scene --overlap` as large as the tile",
             lambda: scene(str(e.tif), str(scene_out), "--ckpt", str(meta_ckpt), "--tile", "32", "--overlap", "32"),
             r"--overlap must be in \[0, tile=32\)", [scene_out]),
        # -- data
        Case("data", "training image whose pixels are cut off (header intact)",
             lambda: e.fit_on(e.data_copy("cut", lambda r: _first_image(r).write_bytes(_first_image(r).read_bytes()[:300]))),
             r"cut/img_dir/train/\S+\.png.*\(item 0\)|cut/img_dir/train/\S+\.png: not a readable image", []),
        Case("data", "mask with label value 9 (LoveDA has 0..7)",
             lambda: e.fit_on(e.data_copy("labels", lambda r: Image.fromarray(np.full((32, 32), 9, np.uint8)).save(_first_mask(r)))),
             r"labels/ann_dir/train/\S+\.png: label values 9 are outside", []),
        Case("data", "mask 16x16 for a 32x32 image",
             lambda: e.fit_on(e.data_copy("size", lambda r: Image.fromarray(np.ones((16, 16), np.uint8)).save(_first_mask(r)))),
             r"size/ann_dir/train/\S+\.png.*16x16.*32x32", []),
        Case("data", "image without its mask",
             lambda: e.fit_on(e.data_copy("orphan", lambda r: _first_mask(r).unlink())), r"orphan.*(no mask|missing|without)", []),
        Case("data", "400x400 image with `--data.max_pixels 100000` (decompression-bomb cap)",
             lambda: e.fit_on(e.data_copy("bomb", bomb), "--data.max_pixels", "100000"),
             r"bomb/\S+\.png: 400x400 = 160000 pixels exceeds max_pixels=100000", []),
        # -- GeoTIFFs
        Case("geotiff", "scene file that does not exist",
             lambda: scene(str(t / "nowhere.tif"), str(scene_out), "--ckpt", str(meta_ckpt)), r"input .*nowhere\.tif does not exist", [scene_out]),
        Case("geotiff", "text file named `.tif`",
             lambda: scene(str(not_tiff), str(scene_out), "--ckpt", str(meta_ckpt)), r"notes\.tif is not a readable raster", [scene_out]),
        Case("geotiff", "GeoTIFF without a CRS",
             lambda: scene(str(no_crs), str(scene_out), "--ckpt", str(meta_ckpt)), r"no_crs\.tif has no CRS.*--allow-no-crs", [scene_out]),
        Case("geotiff", "2-band raster for a 3-band model",
             lambda: scene(str(two_band), str(scene_out), "--ckpt", str(meta_ckpt)), r"two_band\.tif", [scene_out]),
        Case("geotiff", "`--bands 1,2,7` on a 3-band raster",
             lambda: scene(str(e.tif), str(scene_out), "--ckpt", str(meta_ckpt), "--bands", "1,2,7"), r"scene\.tif.*band", [scene_out]),
        Case("geotiff", "output path equal to the input",
             lambda: scene(str(e.tif), str(e.tif), "--ckpt", str(meta_ckpt)), r"would overwrite the input", [e.tif]),
        # -- faults
        Case("fault", "run folder below a regular file (unwritable)",
             lambda: e.cli("fit", "--config", str(base), "--trainer.default_root_dir", str(t / "blocker" / "run")),
             r"cannot write to .*blocker/run", [t / "blocker"]),
        Case("fault", "loss NaN on every step from the start, `--trainer.max_nonfinite_steps 2`",
             lambda: e.cli("fit", "--config", str(base), "--trainer.default_root_dir", str(t / "nan_run"),
                           "--model.model_kwargs", "{nan_input_steps: [1, 2, 3]}", "--trainer.max_nonfinite_steps", "2"),
             r"2 consecutive training steps had a NaN/Inf loss", [runs],
             "checkpoints written before the stop hold finite weights no bad step touched (checked)"),
    ]  # fmt: skip


def _cell(text: str, tmp: Path) -> str:
    text = text.replace(str(tmp), "<tmp>").replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 400 else text[:397] + "..."


def test_bad_inputs_fail_clearly_and_corrupt_nothing(tmp_path, capsys):
    env = Env(tmp_path, capsys)
    all_cases = cases(env)
    assert len(all_cases) >= 25
    rows, failures = [], []
    for i, case in enumerate(all_cases, 1):
        before = {p: tree_digest(p) if p.is_dir() else (p.read_bytes() if p.exists() else None) for p in case.watch}
        seen = case.run()
        after = {p: tree_digest(p) if p.is_dir() else (p.read_bytes() if p.exists() else None) for p in case.watch}
        intact = before == after
        if not re.search(case.expect, seen, re.S) or not intact:
            failures.append(f"case {i} ({case.bad_input}): intact={intact}, saw {seen!r}, expected /{case.expect}/")
        outputs = case.note or "unchanged: " + ", ".join(f"`{_cell(str(p), tmp_path)}`" for p in case.watch) if case.watch else "none written"
        rows.append(f"| {i} | {case.area} | {case.bad_input} | {_cell(seen, tmp_path)} | {outputs} |")
    # the NaN run stopped with checkpoints whose weights are all finite
    for ckpt in (tmp_path / "nan_run" / "checkpoints").glob("*.ckpt"):
        assert all(torch.isfinite(v).all() for v in torch_load(ckpt)["state_dict"].values() if v.is_floating_point())
    assert not failures, "\n".join(failures)
    text = render(rows)
    if os.environ.get("SEGLSTM_WRITE_RELIABILITY_DOC") == "1":
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(text, encoding="utf-8")
    else:
        assert DOC.is_file(), f"{DOC} is missing: run with SEGLSTM_WRITE_RELIABILITY_DOC=1"
        documented = [ln.split("|")[3].strip() for ln in DOC.read_text().splitlines() if re.match(r"\| \d+ \|", ln)]
        assert documented == [c.bad_input for c in all_cases], "docs/reliability.md is stale: regenerate it"


def render(rows: list[str]) -> str:
    header = [
        "# Reliability: what happens with bad input",
        "",
        "Generated by `SEGLSTM_WRITE_RELIABILITY_DOC=1 pytest tests/test_reliability_table.py`; do not edit by "
        "hand. Each row ran through the public CLI (`seglstm ...`, exit status shown) or API; the test checks the "
        "message names the culprit and that the outputs the command could have touched are byte-identical "
        "afterwards (or still absent). `<tmp>` is the test's temporary folder.",
        "",
        "Other guarantees, each with its own test (`tests/test_reliability*.py`):",
        "",
        "- checkpoints are read with `torch.load(weights_only=True)` everywhere (ours, Lightning's resume, "
        "inference, mmseg files, whose numpy metadata and mmengine `HistoryBuffer` are allow-listed as plain data); "
        "`--unsafe-load` is the only way to full unpickling, and it warns;",
        "- a NaN/Inf loss or gradient skips its step (no weight, optimizer or BatchNorm-statistics change) and is "
        "counted in `train/nonfinite_steps`; `trainer.max_nonfinite_steps` (default 10) bad steps in a row stop "
        "the run;",
        "- SIGKILL in the middle of a checkpoint write leaves the previous checkpoint loadable; `--ckpt_path last`, "
        "`--auto-resume`, `SEGLSTM_AUTO_RESUME=1` or a torchrun elastic restart continue from it;",
        "- every run folder is probed for writability and free space (one more checkpoint) before the first step;",
        "- a data item that fails in a DataLoader worker names its file and index;",
        "- DDP: a rank that exits makes the others fail with an error (tested on CPU with gloo); collectives "
        "are given `trainer.ddp_timeout` seconds (default 1800) before they fail;",
        "- torchrun `--max-restarts`: each restart builds its process group under its own keys in the elastic "
        "agent's store, which outlives the workers and still holds the previous attempt's addresses (tested "
        "with static and c10d rendezvous).",
        "",
        "| # | area | bad input | what the user sees | outputs |",
        "|---|------|-----------|--------------------|---------|",
    ]
    return "\n".join(header + rows) + "\n"
