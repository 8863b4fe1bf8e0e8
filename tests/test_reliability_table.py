"""Bad input everywhere: each case runs through the public CLI or API, must fail with a message that names
the culprit, and must leave the outputs it could have touched byte-identical (or absent).

``SEGLSTM_WRITE_RELIABILITY_DOC=1 pytest tests/test_reliability_table.py`` rewrites ``docs/reliability.md``
from the run; without it the test checks that the document lists exactly the cases run here.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio
import tifffile
import torch
from PIL import Image
from rasterio.transform import Affine

from seglstm.cli.main import main as seglstm
from seglstm.config import META_KEY
from seglstm.data.convert import LABEL_COLOURS
from seglstm.inference.loading import load_segmentor
from seglstm.models.checkpoint import load_pretrained
from seglstm.training.faults import LOCK_NAME, RunLock
from seglstm.utils.io import torch_load
from tests.reliability_helpers import (
    MOMENTS,
    RelTinySeg,
    damage,
    interval_config,
    make_synth,
    malicious_checkpoint,
    tree_digest,
    write_config,
)

pytestmark = pytest.mark.usefixtures("rel_tiny_seg")

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
MATRIX_START = "<!-- fault matrix: start -->"


@dataclass
class Case:
    area: str
    bad_input: str
    run: Callable[[Env], str]  # returns what the user sees
    expect: str  # a regex the message must contain (names the file, key or argument)
    watch: Callable[[Env], list[Path]]  # outputs that must stay unchanged
    note: str = ""  # what the outputs column says instead, for a case checked otherwise
    check: Callable[[Env], None] | None = None  # a further assertion on what the case left behind


class Env:
    """Files the cases share: a synthetic dataset, a good checkpoint, a good GeoTIFF, a finished run."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.capsys: pytest.CaptureFixture[str] | None = None  # each case's own (see test_case)
        self.last_err = ""  # the whole stderr of the last cli/ok call
        self.data = make_synth(tmp / "loveda")
        self.run_dir = tmp / "run"
        self.cfg = write_config(tmp / "c.yaml", self.data, self.run_dir, max_steps=2)
        assert seglstm(["fit", "--config", str(self.cfg)]) == 0
        self.ckpt = self.run_dir / "checkpoints" / "last.ckpt"
        self.tif = self.geotiff(tmp / "scene.tif", np.random.default_rng(0).integers(0, 255, (3, 64, 80), np.uint8))
        self.out = tmp / "out"
        t = tmp
        self.evil = malicious_checkpoint(t / "evil.pth", t / "pwned")
        self.truncated = t / "truncated.ckpt"
        self.truncated.write_bytes(self.ckpt.read_bytes()[:4096])
        self.empty = t / "empty.ckpt"
        self.empty.write_bytes(b"")
        self.not_dict = t / "tensor.pth"
        torch.save(torch.zeros(3), self.not_dict)
        self.weights_only = t / "mmseg_weights.pth"
        torch.save({"state_dict": RelTinySeg(7).state_dict()}, self.weights_only)
        self.wrong_classes = t / "five_classes.pth"
        torch.save({"state_dict": RelTinySeg(5).state_dict()}, self.wrong_classes)
        self.meta_ckpt = t / "model.ckpt"
        meta = dict(model="rel_tiny_seg", model_kwargs={}, num_classes=7, classes=[f"c{i}" for i in range(7)],
                    palette=[[i, i, i] for i in range(7)], mean=[0.0] * 3, std=[1.0] * 3, test_cfg={})  # fmt: skip
        torch.save({"state_dict": RelTinySeg(7).state_dict(), META_KEY: meta}, self.meta_ckpt)
        self.scene_out = t / "scene_out.tif"
        self.no_crs = self.geotiff(t / "no_crs.tif", np.zeros((3, 32, 32), np.uint8), crs=None)
        self.two_band = self.geotiff(t / "two_band.tif", np.zeros((2, 32, 32), np.uint8))
        self.not_tiff = t / "notes.tif"
        self.not_tiff.write_text("this is not a raster")
        (t / "blocker").write_text("a file where the run folder's parent should be")

        self.damaged = damage(self.ckpt, t / "damaged.ckpt")
        wide = torch_load(self.ckpt)
        wide["state_dict"] = {k: torch.randn(16, *v.shape[1:]) if k == "model.backbone.0.weight" else v
                              for k, v in wide["state_dict"].items()}  # fmt: skip
        self.wide = t / "wide.ckpt"
        torch.save(wide, self.wide)
        self.isprs = t / "isprs"
        rng = np.random.default_rng(3)
        self.isprs.mkdir()
        for tile in ("2_10", "5_15"):  # 2_10 is a train tile, 5_15 a val tile of mmseg's lists
            colours = np.array(list(LABEL_COLOURS), np.uint8)[rng.integers(0, 6, (40, 40))]
            tifffile.imwrite(self.isprs / f"top_potsdam_{tile}_RGB.tif", rng.integers(0, 255, (40, 40, 3), np.uint8))
            tifffile.imwrite(self.isprs / f"top_potsdam_{tile}_label.tif", colours, photometric="rgb")
        cut = self.isprs / "top_potsdam_5_15_label.tif"
        cut.write_bytes(cut.read_bytes()[:400])
        self.converted = t / "potsdam"

    def scene(self, *argv: str) -> str:
        return self.cli("predict-scene", *argv, "--quiet", "--device", "cpu")

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
        assert self.capsys is not None
        err = self.last_err = self.capsys.readouterr().err
        lines = [ln.strip() for ln in err.splitlines() if re.search(r"error|unknown command|interrupted by", ln, re.I)]
        assert rc not in (0, None), f"seglstm {' '.join(argv)} succeeded; stderr: {err[-2000:]}"
        return f"exit {rc}: {lines[-1] if lines else err.strip().splitlines()[-1]}"

    def ok(self, *argv: str, show: str = r"\S.*") -> str:
        """Run ``seglstm argv`` where the case works: exit 0, and the stderr line matching ``show``."""
        rc = seglstm(list(argv))
        assert self.capsys is not None
        err = self.last_err = self.capsys.readouterr().err
        assert rc == 0, f"seglstm {' '.join(argv)} failed: {err[-2000:]}"
        shown = [ln.strip() for ln in err.splitlines() if re.search(show, ln)]
        return f"exit 0: {shown[-1] if shown else 'works'}"

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


def _finite_checkpoints(e: Env) -> None:
    """The NaN run stopped after writing checkpoints, and every one holds finite weights."""
    written = sorted((e.tmp / "nan_run" / "checkpoints").glob("*.ckpt"))
    assert written, "the NaN run wrote no checkpoint"
    for ckpt in written:
        state = torch_load(ckpt)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt


def _bomb(root: Path) -> None:
    img = _first_image(root)
    Image.new("RGB", (400, 400)).save(img)
    Image.new("L", (400, 400)).save(_first_mask(root))


def _real_cfg(e: Env) -> Path:
    """The test config with a real (tiny) ViL preset instead of the test segmentor."""
    text = e.cfg.read_text().replace("rel_tiny_seg", "seglstm_upernet_t").replace(
        "model_kwargs: null", "model_kwargs: {depths: [1, 1, 1, 1], patch_size: 8, img_size: 16, channels: 16, aux_cfg: {channels: 8}}"
    )
    return e.yaml("real.yaml", text)


def _vil(e: Env, kwargs: str, run: str) -> str:
    extra = "{depths: [1, 1, 1, 1], img_size: 16, channels: 16, aux_cfg: {channels: 8}, " + kwargs + "}"
    return e.cli("fit", "--config", str(_real_cfg(e)), "--model.model_kwargs", extra, "--trainer.default_root_dir", str(e.tmp / run))


def _with(e: Env, name: str, edit: Callable[[str], str]) -> Path:
    return e.yaml(name, edit(e.cfg.read_text()))


def _no_usage(e: Env) -> None:
    """The error came alone: no jsonargparse usage dump before it."""
    assert "usage:" not in e.last_err and len([ln for ln in e.last_err.splitlines() if ln.strip()]) <= 3, e.last_err


def _absent(*names: str) -> Callable[[Env], None]:
    def check(e: Env) -> None:
        for name in names:
            assert not (e.tmp / name).exists(), f"{name} was created"
    return check


def _staged_synth(e: Env) -> Path:
    """What a `synth --out half` killed mid-way leaves: only its staging folder (marker inside), no dataset."""
    from seglstm.data.io import mark_incomplete

    staging = e.tmp / ".half.staging"
    if not staging.exists():
        shutil.copytree(e.data / "img_dir", staging / "img_dir")
        mark_incomplete(staging, f"seglstm synth --out {e.tmp / 'half'} --train 4 --val 2 --size 32")
    return e.tmp / "half"


def _marked(e: Env) -> Path:
    """A converted dataset whose writer was killed while moving it into place (the marker is still there)."""
    from seglstm.data.io import mark_incomplete

    root = e.tmp / "swapping"
    if not root.exists():
        shutil.copytree(e.data, root)
        mark_incomplete(root, f"seglstm convert potsdam {e.isprs} --out {root}")
    return root


def _data_cfg(e: Env, root: Path, name: str) -> Path:
    return write_config(e.tmp / f"{name}.yaml", root, e.tmp / f"run_{name}", max_steps=2)


def _loop(root: Path) -> None:
    link = root / "img_dir" / "train" / "loop.png"
    link.symlink_to(link)


def _dangling(root: Path) -> None:
    (root / "img_dir" / "train" / "gone.png").symlink_to(root / "nowhere.png")


def _folder_png(root: Path) -> None:
    (root / "img_dir" / "train" / "folder.png").mkdir()


def _signal_cfg(e: Env, name: str, moment: str, signum: int) -> Path:
    """Validation and checkpoints every 2 steps; ``SignalWhen`` (or ``SignalingIO``) sends the signal."""
    step = {"before the first step": 0, "inside a step": 3, "between steps": 3}.get(moment, 4)
    if moment == "during a checkpoint write":
        extra = {"plugins": [{"class_path": "tests.reliability_helpers.SignalingIO", "init_args": {"step": step, "signum": signum}}]}
    else:
        extra = {"callbacks": [{"class_path": "tests.reliability_helpers.SignalWhen",
                                "init_args": {"moment": moment, "step": step, "signum": signum}}]}  # fmt: skip
    return interval_config(e.tmp / f"{name}.yaml", e.data, e.tmp / name, max_steps=6, **extra)


def _signal(e: Env, sig: str, moment: str) -> str:
    name = "sig_" + re.sub(r"\W+", "_", f"{sig}_{moment}")
    return e.cli("fit", "--config", str(_signal_cfg(e, name, moment, int(getattr(signal, sig)))), "--allow-class-path", "tests")


def _last_loads(sig: str, moment: str) -> Callable[[Env], None]:
    def check(e: Env) -> None:
        name = "sig_" + re.sub(r"\W+", "_", f"{sig}_{moment}")
        assert "global_step" in torch_load(e.tmp / name / "checkpoints" / "last.ckpt")
    return check


def _locked(e: Env, folder: Path, *extra: str) -> str:
    holder = RunLock(folder)  # stands for a live run in another process (a flock is per open file)
    holder.acquire()
    try:
        return e.cli("fit", "--config", str(e.cfg), "--trainer.default_root_dir", str(folder), *extra)
    finally:
        holder.release()


def _only_lock(folder: Path) -> None:
    """The refused run wrote nothing into the folder (the lock file is the holder's)."""
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]


def _part_left(e: Env) -> str:
    run = e.tmp / "partrun"
    cfg = write_config(e.tmp / "partrun.yaml", e.data, run, max_steps=2)
    assert seglstm(["fit", "--config", str(cfg)]) == 0
    (run / "checkpoints" / ".last.ckpt.k1ll3d.ckpt.part").write_bytes(b"half")
    return e.ok("fit", "--config", str(cfg), "--auto-resume", "--trainer.max_steps", "3", show="partial file")


def _no_flock(e: Env) -> str:
    import fcntl
    from unittest import mock

    def refuse(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    with mock.patch.object(fcntl, "flock", refuse):
        return e.ok("fit", "--config", str(write_config(e.tmp / "nfs.yaml", e.data, e.tmp / "nfs_run", max_steps=2)),
                    show="does not support file locks")  # fmt: skip


def _stale_lock(e: Env) -> str:
    run = e.tmp / "stale_run"
    run.mkdir(exist_ok=True)
    (run / LOCK_NAME).write_text("PID 4194301 on host gone\n")
    return e.ok("fit", "--config", str(write_config(e.tmp / "stale.yaml", e.data, run, max_steps=2)), show="run folder")


def _quiet_saves(e: Env) -> str:
    cfg = write_config(e.tmp / "quiet.yaml", e.data, e.tmp / "quiet_run", max_steps=3)
    cfg.write_text(cfg.read_text().replace("save_last: true", "save_last: true\n      last_every_minutes: 1.0e-09"))
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector")
    level, logger.level = logger.level, logging.INFO
    logger.addHandler(handler)
    try:
        seen = e.ok("fit", "--config", str(cfg), show="run folder")  # last.ckpt by the timer at every step, too
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert not [r for r in records if "weights_only" in r.getMessage()], [r.getMessage() for r in records]
    assert "weights_only" not in e.last_err, e.last_err
    return seen + "; no \"`weights_only` was not set\" line at the checkpoint saves"



def cases() -> list[Case]:
    """Every row of docs/reliability.md, in order; each runs against the shared :class:`Env`."""
    return [
        # -- checkpoints
        Case("checkpoint", "pickle whose metadata runs code (`Path.touch`) given to `predict-scene --ckpt`",
             lambda e: e.scene(str(e.tif), str(e.scene_out), "--ckpt", str(e.evil)), r"refusing to load .*evil\.pth.*--unsafe-load",
             lambda e: [e.scene_out, e.tmp / "pwned"]),
        Case("checkpoint", "the same pickle as `fit --ckpt_path` (Lightning's resume path)",
             lambda e: e.cli("fit", "--config", str(e.cfg), "--ckpt_path", str(e.evil)), r"refusing to load .*evil\.pth", lambda e: [e.run_dir, e.tmp / "pwned"]),
        Case("checkpoint", "the same pickle as `predict --ckpt_path`",
             lambda e: e.cli("predict", "--config", str(e.cfg), "--data.predict_root", str(e.data / "img_dir" / "val"),
                           "--ckpt_path", str(e.evil), "--out", str(e.out)), r"refusing to load .*evil\.pth", lambda e: [e.out, e.tmp / "pwned"]),
        Case("checkpoint", "checkpoint truncated to 4 KiB (`predict-scene`)",
             lambda e: e.scene(str(e.tif), str(e.scene_out), "--ckpt", str(e.truncated)), r"truncated\.ckpt \(4096 bytes\): truncated",
             lambda e: [e.scene_out]),
        Case("checkpoint", "empty file as `test --ckpt_path`",
             lambda e: e.cli("test", "--config", str(e.cfg), "--ckpt_path", str(e.empty)), r"empty\.ckpt \(0 bytes\)", lambda e: [e.run_dir]),
        Case("checkpoint", "a bare tensor instead of a checkpoint (`load_segmentor`)",
             lambda e: e.api(lambda: load_segmentor(e.not_dict)), r"tensor\.pth: expected a checkpoint dictionary", lambda e: []),
        Case("checkpoint", "mmseg-style weights without a config (`predict-scene`)",
             lambda e: e.scene(str(e.tif), str(e.scene_out), "--ckpt", str(e.weights_only)), r"mmseg_weights\.pth does not record its model",
             lambda e: [e.scene_out]),
        Case("checkpoint", "5-class weights into a 7-class model (`load_pretrained`)",
             lambda e: e.api(lambda: load_pretrained(RelTinySeg(7), e.wrong_classes)),
             r"five_classes\.pth .*decode_head\.weight: checkpoint \(5, 8, 1, 1\) vs model \(7, 8, 1, 1\)", lambda e: []),
        Case("checkpoint", "checkpoint path that does not exist (`predict-scene`)",
             lambda e: e.scene(str(e.tif), str(e.scene_out), "--ckpt", str(e.tmp / "missing.ckpt")), r"missing\.ckpt does not exist",
             lambda e: [e.scene_out]),
        Case("checkpoint", "`test --ckpt_path last` in a run folder without checkpoints",
             lambda e: e.cli("test", "--config", str(e.cfg), "--ckpt_path", "last", "--trainer.default_root_dir", str(e.tmp / "fresh")),
             r"--ckpt_path last: no such checkpoint in .*fresh/checkpoints", lambda e: [e.tmp / "fresh"]),
        Case("checkpoint", "`validate --ckpt_path` naming a file that does not exist",
             lambda e: e.cli("validate", "--config", str(e.cfg), "--ckpt_path", str(e.tmp / "nowhere.ckpt")),
             r"--ckpt_path .*nowhere\.ckpt: no such file", lambda e: [e.run_dir]),
        Case("checkpoint", "`fit --ckpt_path last` in a run folder without checkpoints (would start at step 0)",
             lambda e: e.cli("fit", "--config", str(e.cfg), "--ckpt_path", "last", "--trainer.default_root_dir", str(e.tmp / "fresh")),
             r"--ckpt_path last: no such checkpoint in .*fresh/checkpoints", lambda e: [e.tmp / "fresh"]),
        Case("checkpoint", "checkpoint damaged in place (16 bytes flipped every 256 KiB, same size) to `load_pretrained`",
             lambda e: e.api(lambda: load_pretrained(RelTinySeg(7), e.damaged)),
             r"damaged\.ckpt is damaged: member '\S+' fails its CRC-32 check", lambda e: []),
        Case("checkpoint", "the damaged checkpoint as `predict-scene --ckpt`",
             lambda e: e.scene(str(e.tif), str(e.scene_out), "--ckpt", str(e.damaged)), r"damaged\.ckpt is damaged",
             lambda e: [e.scene_out]),
        Case("checkpoint", "the damaged checkpoint as `validate --ckpt_path`",
             lambda e: e.cli("validate", "--config", str(e.cfg), "--ckpt_path", str(e.damaged)), r"damaged\.ckpt is damaged",
             lambda e: [e.run_dir]),
        Case("checkpoint", "the damaged checkpoint as `fit --ckpt_path` (resume)",
             lambda e: e.cli("fit", "--config", str(e.cfg), "--ckpt_path", str(e.damaged)), r"damaged\.ckpt is damaged",
             lambda e: [e.run_dir]),
        Case("checkpoint", "`test --ckpt_path` with a checkpoint of another width",
             lambda e: e.cli("test", "--config", str(e.cfg), "--ckpt_path", str(e.wide)),
             r"wide\.ckpt does not fit the configured model.*model\.backbone\.0\.weight: checkpoint \(16, 3, 3, 3\) vs model \(8, 3, 3, 3\)",
             lambda e: [e.run_dir]),
        Case("checkpoint", "a second `fit` into a run folder that already holds a run",
             lambda e: e.cli("fit", "--config", str(e.cfg)), r"run folder .*run already holds a run.*--auto-resume.*--new-version",
             lambda e: [e.run_dir]),
        Case("checkpoint", "`fit --auto-resume --new-version` (continue and start anew at once)",
             lambda e: e.cli("fit", "--config", str(e.cfg), "--auto-resume", "--new-version"), r"--auto-resume .* --new-version",
             lambda e: [e.run_dir]),
        # -- configs
        Case("config", "`class_path: os.system` as a callback",
             lambda e: e.cli("fit", "--config", str(e.yaml("os.yaml", e.cfg.read_text().replace(
                 "seglstm.training.callbacks.RunCheckpoint", "os.system")))),
             r"trainer\.callbacks\[0\]\.class_path='os\.system' is outside", lambda e: [e.run_dir]),
        Case("config", "`--trainer.logger.class_path subprocess.Popen` on the command line",
             lambda e: e.cli("fit", "--config", str(e.cfg), "--trainer.logger.class_path", "subprocess.Popen"),
             r"trainer\.logger\.class_path='subprocess\.Popen'", lambda e: [e.run_dir]),
        Case("config", "YAML with a `!!python/object/apply:os.system` tag",
             lambda e: e.cli("fit", "--config", str(e.yaml("tag.yaml", "trainer:\n  max_steps: !!python/object/apply:os.system ['true']\n"))),
             r"tag\.yaml is not valid YAML", lambda e: []),
        Case("config", "YAML syntax error",
             lambda e: e.cli("fit", "--config", str(e.yaml("broken.yaml", "model: [unclosed\n"))), r"broken\.yaml is not valid YAML", lambda e: []),
        Case("config", "`_base_` files that include each other",
             lambda e: (e.yaml("b.yaml", "_base_: [a.yaml]\n"), e.cli("fit", "--config", str(e.yaml("a.yaml", "_base_: [b.yaml]\n"))))[1],
             r"_base_ cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml", lambda e: []),
        Case("config", "`_base_` naming a missing file",
             lambda e: e.cli("fit", "--config", str(e.yaml("orphan.yaml", "_base_: [nowhere.yaml]\n"))), r"nowhere\.yaml does not exist", lambda e: []),
        Case("config", "a list instead of a mapping at the top level",
             lambda e: e.cli("fit", "--config", str(e.yaml("list.yaml", "- 1\n- 2\n"))), r"list\.yaml must hold a mapping", lambda e: []),
        Case("config", "`model.num_classes: 5` for the 7-class LoveDA data",
             lambda e: e.cli("fit", "--config", str(e.cfg), "--model.num_classes", "5"), r"model\.num_classes=5 conflicts with data\.dataset='loveda'", lambda e: [e.run_dir]),
        Case("config", "unknown model preset",
             lambda e: e.cli("fit", "--config", str(e.cfg), "--model.model", "seglstm_upernet_xl"), r"model\.model: unknown model 'seglstm_upernet_xl'", lambda e: [e.run_dir]),
        Case("config", "`data.root` that does not exist",
             lambda e: e.cli("fit", "--config", str(e.cfg), "--data.root", str(e.tmp / "no_data")), r"data\.root: .*no_data is not a directory", lambda e: [e.run_dir]),
        Case("config", "config file that does not exist",
             lambda e: e.cli("fit", "--config", str(e.tmp / "nope.yaml")), r"--config .*nope\.yaml: file does not exist", lambda e: []),
        # -- command-line arguments
        Case("cli", "`--trainer.unsafe_load true` without the `--unsafe-load` flag",
             lambda e: e.cli("fit", "--config", str(e.cfg), "--trainer.unsafe_load", "true"), r"needs the --unsafe-load flag", lambda e: [e.run_dir]),
        Case("cli", "`--allow-class-path` without a module",
             lambda e: e.cli("fit", "--config", str(e.cfg), "--allow-class-path"), r"--allow-class-path needs a module name", lambda e: [e.run_dir]),
        Case("cli", "unknown sub-command `seglstm fitt`", lambda e: e.cli("fitt"), r"unknown command 'fitt'", lambda e: []),
        Case("cli", "`--data.batch_size 0`",
             lambda e: e.cli("fit", "--config", str(e.cfg), "--data.batch_size", "0"), r"batch_size", lambda e: [e.run_dir]),
        Case("cli", "`--trainer.max_nonfinite_steps -1`",
             lambda e: e.cli("fit", "--config", str(e.cfg), "--trainer.max_nonfinite_steps", "-1"), r"max_consecutive must be >= 0", lambda e: [e.run_dir]),
        Case("cli", "`fit --model.lr -1`",
             lambda e: e.cli("fit", "--config", str(e.cfg), "--model.lr", "-1"), r"model\.lr must be > 0, got -1", lambda e: [e.run_dir]),
        Case("cli", "`test --out` below a regular file (unwritable), before the first batch",
             lambda e: e.cli("test", "--config", str(e.cfg), "--ckpt_path", str(e.ckpt), "--out", str(e.tmp / "blocker" / "vis")),
             r"--out .*blocker/vis: cannot write there", lambda e: [e.tmp / "blocker", e.run_dir]),
        Case("cli", "`predict --out` below a regular file (unwritable), before the first batch",
             lambda e: e.cli("predict", "--config", str(e.cfg), "--data.predict_root", str(e.data / "img_dir" / "val"),
                             "--ckpt_path", str(e.ckpt), "--out", str(e.tmp / "blocker" / "pred")),
             r"--out .*blocker/pred: cannot write there", lambda e: [e.tmp / "blocker"]),
        Case("cli", "`synth --out` naming a regular file",
             lambda e: e.cli("synth", "--out", str(e.tmp / "blocker"), "--train", "1", "--val", "1", "--size", "32", "--quiet"),
             r"--out .*blocker: .*blocker is a file, not a folder", lambda e: [e.tmp / "blocker"]),
        Case("cli", "`plot-log RUN --out FILE/x.png` (a file where the folder should be)",
             lambda e: e.cli("plot-log", str(e.run_dir), "--out", str(e.tmp / "blocker" / "x.png")),
             r"--out .*blocker/x\.png: cannot write the PNG there \(.*blocker is a file", lambda e: [e.tmp / "blocker"]),
        Case("cli", "`predict-scene --overlap` as large as the tile",
             lambda e: e.scene(str(e.tif), str(e.scene_out), "--ckpt", str(e.meta_ckpt), "--tile", "32", "--overlap", "32"),
             r"--overlap must be in \[0, tile=32\)", lambda e: [e.scene_out]),
        # -- data
        Case("data", "training image whose pixels are cut off (header intact)",
             lambda e: e.fit_on(e.data_copy("cut", lambda r: _first_image(r).write_bytes(_first_image(r).read_bytes()[:300]))),
             r"cut/img_dir/train/\S+\.png.*\(item 0\)|cut/img_dir/train/\S+\.png: not a readable image", lambda e: []),
        Case("data", "mask with label value 9 (LoveDA has 0..7)",
             lambda e: e.fit_on(e.data_copy("labels", lambda r: Image.fromarray(np.full((32, 32), 9, np.uint8)).save(_first_mask(r)))),
             r"labels/ann_dir/train/\S+\.png: label values 9 are outside", lambda e: []),
        Case("data", "mask 16x16 for a 32x32 image",
             lambda e: e.fit_on(e.data_copy("size", lambda r: Image.fromarray(np.ones((16, 16), np.uint8)).save(_first_mask(r)))),
             r"size/ann_dir/train/\S+\.png.*16x16.*32x32", lambda e: []),
        Case("data", "image without its mask",
             lambda e: e.fit_on(e.data_copy("orphan", lambda r: _first_mask(r).unlink())), r"orphan.*(no mask|missing|without)", lambda e: []),
        Case("data", "400x400 image with `--data.max_pixels 100000` (decompression-bomb cap)",
             lambda e: e.fit_on(e.data_copy("bomb", _bomb), "--data.max_pixels", "100000"),
             r"bomb/\S+\.png: 400x400 = 160000 pixels exceeds max_pixels=100000", lambda e: []),
        Case("data", "val image cut short (truncated PNG), found before the first training step",
             lambda e: e.fit_on(e.data_copy("cutval", lambda r: _first_image(r, "val").write_bytes(_first_image(r, "val").read_bytes()[:300])),
                                "--trainer.limit_val_batches", "1.0"),
             r"val split has 1 bad file.*cutval/img_dir/val/\S+\.png: truncated image", lambda e: [e.tmp / "run_cutval"]),
        Case("data", "val mask with label value 200, found before the first training step",
             lambda e: e.fit_on(e.data_copy("val200", lambda r: Image.fromarray(np.full((32, 32), 200, np.uint8)).save(_first_mask(r, "val"))),
                                "--trainer.limit_val_batches", "1.0"),
             r"val200/ann_dir/val/\S+\.png: label values 200 are outside", lambda e: [e.tmp / "run_val200"]),
        Case("data", "`convert` where a later tile's label is cut short",
             lambda e: e.cli("convert", "potsdam", str(e.isprs), "--out", str(e.converted), "--clip-size", "32", "--quiet"),
             r"5_15_label\.tif", lambda e: [e.converted], "none written: no partial dataset (the patches of the good tile are not kept)"),
        # -- GeoTIFFs
        Case("geotiff", "scene file that does not exist",
             lambda e: e.scene(str(e.tmp / "nowhere.tif"), str(e.scene_out), "--ckpt", str(e.meta_ckpt)), r"input .*nowhere\.tif does not exist", lambda e: [e.scene_out]),
        Case("geotiff", "text file named `.tif`",
             lambda e: e.scene(str(e.not_tiff), str(e.scene_out), "--ckpt", str(e.meta_ckpt)), r"notes\.tif is not a readable raster", lambda e: [e.scene_out]),
        Case("geotiff", "GeoTIFF without a CRS",
             lambda e: e.scene(str(e.no_crs), str(e.scene_out), "--ckpt", str(e.meta_ckpt)), r"no_crs\.tif has no CRS.*--allow-no-crs", lambda e: [e.scene_out]),
        Case("geotiff", "2-band raster for a 3-band model",
             lambda e: e.scene(str(e.two_band), str(e.scene_out), "--ckpt", str(e.meta_ckpt)), r"two_band\.tif", lambda e: [e.scene_out]),
        Case("geotiff", "`--bands 1,2,7` on a 3-band raster",
             lambda e: e.scene(str(e.tif), str(e.scene_out), "--ckpt", str(e.meta_ckpt), "--bands", "1,2,7"), r"scene\.tif.*band", lambda e: [e.scene_out]),
        Case("geotiff", "output path equal to the input",
             lambda e: e.scene(str(e.tif), str(e.tif), "--ckpt", str(e.meta_ckpt)), r"would overwrite the input", lambda e: [e.tif]),
        # -- model and trainer values that used to end in a traceback
        Case("config", "`model.model_kwargs.patch_size: 0` (ViL preset)", lambda e: _vil(e, "patch_size: 0", "p0"),
             r"patch_size must be a positive integer, got 0", lambda e: [], check=_absent("p0")),
        Case("config", "`model.model_kwargs.embed_dim: 0` (ViL preset)", lambda e: _vil(e, "patch_size: 8, embed_dim: 0", "e0"),
             r"embed_dim must be a positive integer, got 0", lambda e: [], check=_absent("e0")),
        Case("config", "`model.model_kwargs.num_heads: 0` (ViL preset)", lambda e: _vil(e, "patch_size: 8, num_heads: 0", "h0"),
             r"num_heads must be a positive integer, got 0", lambda e: [], check=_absent("h0")),
        Case("config", "`model.model_kwargs.patch_size: -4` (ViL preset)", lambda e: _vil(e, "patch_size: -4", "pm4"),
             r"patch_size must be a positive integer, got -4", lambda e: [], check=_absent("pm4")),
        Case("config", "`trainer.val_check_interval: 0`, refused before the run folder exists",
             lambda e: e.cli("fit", "--config", str(e.cfg), "--trainer.val_check_interval", "0", "--trainer.default_root_dir", str(e.tmp / "v0")),
             r"trainer\.val_check_interval must be > 0", lambda e: [], check=_absent("v0")),
        Case("config", "`trainer.val_check_interval: -5`",
             lambda e: e.cli("fit", "--config", str(e.cfg), "--trainer.val_check_interval", "-5", "--trainer.default_root_dir", str(e.tmp / "vm5")),
             r"trainer\.val_check_interval must be > 0 .*got -5", lambda e: [], check=_absent("vm5")),
        Case("config", "`trainer.check_val_every_n_epoch: 0`",
             lambda e: e.cli("fit", "--config", str(e.cfg), "--trainer.check_val_every_n_epoch", "0", "--trainer.default_root_dir", str(e.tmp / "ve0")),
             r"check_val_every_n_epoch must be >= 1 or null, got 0", lambda e: [], check=_absent("ve0")),
        # -- config messages: one line naming file and key, no usage dump
        Case("config", "unknown key `model.lrr` in a config file",
             lambda e: e.cli("fit", "--config", str(_with(e, "unknown_key.yaml", lambda t: t.replace("  lr: 0.01", "  lr: 0.01\n  lrr: 3")))),
             r"config file .*unknown_key\.yaml: model\.lrr: unknown key", lambda e: [e.run_dir], check=_no_usage),
        Case("config", "wrong type `model.lr: fast` in a config file",
             lambda e: e.cli("fit", "--config", str(_with(e, "wrong_type.yaml", lambda t: t.replace("  lr: 0.01", "  lr: fast")))),
             r"config file .*wrong_type\.yaml: model\.lr: Expected a <class 'float'>", lambda e: [e.run_dir], check=_no_usage),
        Case("config", "unknown key `trainer.max_stepz` in a config file",
             lambda e: e.cli("fit", "--config", str(_with(e, "typo.yaml", lambda t: t.replace("  max_steps: 2", "  max_stepz: 2")))),
             r"config file .*typo\.yaml: trainer\.max_stepz: unknown key", lambda e: [e.run_dir], check=_no_usage),
        Case("config", "wrong type `data.batch_size: two` in a config file",
             lambda e: e.cli("fit", "--config", str(_with(e, "bs.yaml", lambda t: t.replace("batch_size: 2", "batch_size: two")))),
             r"config file .*bs\.yaml: data\.batch_size", lambda e: [e.run_dir], check=_no_usage),
        Case("cli", "wrong type on the command line `--model.lr fast`",
             lambda e: e.cli("fit", "--config", str(e.cfg), "--model.lr", "fast"), r"argument --model\.lr: model\.lr: Expected",
             lambda e: [e.run_dir], check=_no_usage),
        Case("cli", "unknown option on the command line `--trainer.bogus 1`",
             lambda e: e.cli("fit", "--config", str(e.cfg), "--trainer.bogus", "1"), r"unrecognized arguments: --trainer\.bogus",
             lambda e: [e.run_dir], check=_no_usage),
        Case("config", "empty config file",
             lambda e: e.cli("fit", "--config", str(e.yaml("empty.yaml", ""))), r"--config .*empty\.yaml: the file is empty", lambda e: []),
        Case("config", "config file holding only comments",
             lambda e: e.cli("fit", "--config", str(e.yaml("comments.yaml", "# nothing yet\n# model: ...\n"))),
             r"--config .*comments\.yaml: the file is empty", lambda e: []),
        Case("config", "duplicate top-level key `model:`",
             lambda e: e.cli("fit", "--config", str(_with(e, "dup.yaml", lambda t: t + "model:\n  lr: 0.5\n"))),
             r"dup\.yaml: duplicate key 'model' \(lines 1 and \d+\)", lambda e: [e.run_dir]),
        Case("config", "duplicate nested key `model.lr`",
             lambda e: e.cli("fit", "--config", str(_with(e, "dup_lr.yaml", lambda t: t.replace("  lr: 0.01", "  lr: 0.01\n  lr: 0.5")))),
             r"dup_lr\.yaml: duplicate key 'lr' \(lines \d+ and \d+\)", lambda e: [e.run_dir]),
        Case("config", "duplicate key in a `_base_` file",
             lambda e: (e.yaml("dup_base.yaml", "trainer:\n  max_steps: 2\n  max_steps: 3\n"),
                        e.cli("fit", "--config", str(e.yaml("uses_dup.yaml", f"_base_: [dup_base.yaml, {e.cfg.name}]\n"))))[1],
             r"dup_base\.yaml: duplicate key 'max_steps'", lambda e: [e.run_dir]),
        # -- checkpoints that are not checkpoints
        Case("checkpoint", "`--unsafe-load` with a text file as `--ckpt_path`",
             lambda e: e.cli("validate", "--config", str(e.cfg), "--ckpt_path", str(e.yaml("notes.ckpt", "hello")), "--unsafe-load"),
             r"notes\.ckpt is not a torch checkpoint", lambda e: [e.run_dir]),
        Case("checkpoint", "`--unsafe-load` with a truncated checkpoint",
             lambda e: e.cli("validate", "--config", str(e.cfg), "--ckpt_path", str(e.truncated), "--unsafe-load"),
             r"truncated\.ckpt", lambda e: [e.run_dir]),
        Case("checkpoint", "`predict-scene --ckpt model.onnx` (advises --onnx, not --unsafe-load)",
             lambda e: e.scene(str(e.tif), str(e.scene_out), "--ckpt", str(e.yaml("model.onnx", "\x08\x07onnx-bytes"))),
             r"model\.onnx is not a torch checkpoint .*ONNX model.*--onnx", lambda e: [e.scene_out]),
        Case("checkpoint", "`predict-scene --ckpt config.yaml` (advises --config)",
             lambda e: e.scene(str(e.tif), str(e.scene_out), "--ckpt", str(e.cfg)), r"c\.yaml is not a torch checkpoint .*--config",
             lambda e: [e.scene_out]),
        Case("checkpoint", "`export --ckpt model.onnx`",
             lambda e: e.cli("export", "--ckpt", str(e.yaml("exported.onnx", "\x08\x07onnx-bytes")), "--out", str(e.tmp / "re.onnx")),
             r"exported\.onnx is not a torch checkpoint .*ONNX", lambda e: [e.tmp / "re.onnx"]),
        Case("checkpoint", "`--unsafe-load` with a config file as `predict-scene --ckpt`",
             lambda e: e.scene(str(e.tif), str(e.scene_out), "--ckpt", str(e.cfg), "--unsafe-load"), r"c\.yaml is not a torch checkpoint",
             lambda e: [e.scene_out]),
        # -- outputs
        Case("cli", "`export --out` below a regular file",
             lambda e: e.cli("export", "--ckpt", str(e.meta_ckpt), "--out", str(e.tmp / "blocker" / "m.onnx")),
             r"--out .*blocker/m\.onnx: .*blocker is a file, not a folder", lambda e: [e.tmp / "blocker"]),
        Case("geotiff", "`predict-scene` output named `.png` (it writes a GeoTIFF)",
             lambda e: e.scene(str(e.tif), str(e.tmp / "classes.png"), "--ckpt", str(e.meta_ckpt)),
             r"classes\.png: predict-scene writes a GeoTIFF there; name it \.tif", lambda e: [e.tmp / "classes.png"]),
        Case("geotiff", "`predict-scene --probs` named `.jpg`",
             lambda e: e.scene(str(e.tif), str(e.scene_out), "--ckpt", str(e.meta_ckpt), "--probs", str(e.tmp / "p.jpg")),
             r"probabilities .*p\.jpg: predict-scene writes a GeoTIFF", lambda e: [e.scene_out, e.tmp / "p.jpg"]),
        Case("cli", "`plot-log` on a CSV whose step is not a number",
             lambda e: e.cli("plot-log", str(e.yaml("steps.csv", "step,val/mIoU\n1,0.5\nabc,0.3\n")), "--out", str(e.tmp / "pl.png")),
             r"steps\.csv: line 3: could not convert", lambda e: [e.tmp / "pl.png"]),
        Case("cli", "`plot-log` on a CSV with more cells than columns",
             lambda e: e.cli("plot-log", str(e.yaml("cells.csv", "step,a\n1,2,3\n")), "--out", str(e.tmp / "pl.png")),
             r"cells\.csv: line 2: 3 cells for 2 columns", lambda e: [e.tmp / "pl.png"]),
        Case("cli", "`plot-log` on a binary file named `.csv`",
             lambda e: e.cli("plot-log", str((e.tmp / "bin.csv", (e.tmp / "bin.csv").write_bytes(bytes(range(128, 256))))[0]), "--out", str(e.tmp / "pl.png")),
             r"bin\.csv: not a text CSV file", lambda e: [e.tmp / "pl.png"]),
        Case("cli", "`demo --data` naming a folder with other files (advice names its real options)",
             lambda e: e.cli("demo", "--quick", "--data", str(e.isprs), "--out", str(e.tmp / "demo_run")),
             r"isprs exists and is not empty, and it is not this demo's dataset: give another --data folder", lambda e: [e.isprs]),
        # -- half-made data
        Case("data", "`fit` on the folder of a `synth` killed mid-way (only its staging folder exists)",
             lambda e: e.fit_on(_staged_synth(e)), r"half \(only its staging folder .*\) is an incomplete dataset.*complete it with `seglstm synth --out",
             lambda e: [_staged_synth(e).parent / ".half.staging"]),
        Case("data", "`check-data` on the folder of a `synth` killed mid-way",
             lambda e: e.cli("check-data", str(_data_cfg(e, _staged_synth(e), "half_cfg"))), r"incomplete dataset.*seglstm synth --out",
             lambda e: [e.tmp / ".half.staging"]),
        Case("data", "`fit` on a dataset a killed `convert` was moving into place (marker left)",
             lambda e: e.fit_on(_marked(e)), r"swapping is an incomplete dataset.*complete it with `seglstm convert potsdam",
             lambda e: [_marked(e)]),
        Case("data", "`check-data` on a dataset a killed `convert` was moving into place",
             lambda e: e.cli("check-data", str(_data_cfg(e, _marked(e), "swap_cfg"))), r"swapping is an incomplete dataset.*seglstm convert",
             lambda e: [e.tmp / "swapping"]),
        Case("data", "self-referencing symlink among the training images (`fit`)",
             lambda e: e.fit_on(e.data_copy("loop", _loop)), r"loop/img_dir/train/loop\.png: Too many levels of symbolic links",
             lambda e: []),
        Case("data", "self-referencing symlink among the training images (`check-data`)",
             lambda e: e.cli("check-data", str(_data_cfg(e, e.data_copy("loop2", _loop), "loop2_cfg"))),
             r"loop2/img_dir/train/loop\.png: Too many levels", lambda e: []),
        Case("data", "dangling symlink among the training images",
             lambda e: e.fit_on(e.data_copy("dangling", _dangling)), r"dangling/img_dir/train/gone\.png: No such file",
             lambda e: []),
        Case("data", "a folder named `folder.png` among the training images",
             lambda e: e.fit_on(e.data_copy("dirpng", _folder_png)), r"dirpng/img_dir/train/folder\.png: not a regular file",
             lambda e: []),
        # -- one writer per run folder
        Case("fault", "second `fit` into a run folder another live run holds",
             lambda e: _locked(e, e.tmp / "busy"), r"run folder .*busy is in use by PID \d+ on host \S+",
             lambda e: [], check=lambda e: _only_lock(e.tmp / "busy")),
        Case("fault", "second `fit --auto-resume` into a run folder another live run holds",
             lambda e: _locked(e, e.run_dir, "--auto-resume"), r"run folder .*run is in use by PID \d+ on host",
             lambda e: [e.run_dir / "checkpoints"]),
        Case("fault", "lock file left by a dead process", _stale_lock, r"exit 0: seglstm fit: run folder", lambda e: [],
             "works: the kernel dropped the dead holder's lock; the file now names this run"),
        Case("fault", "run folder on a filesystem without `flock`", _no_flock, r"exit 0: .*does not support file locks", lambda e: [],
             "works, with the warning"),
        Case("fault", "`*.part` file a killed writer left in `checkpoints/`", _part_left,
             r"exit 0: seglstm: removed 1 partial file\(s\) a killed run left", lambda e: [], "works: removed by the next run holding the folder"),
        Case("fault", "Lightning's \"`weights_only` was not set\" line at each checkpoint save", _quiet_saves,
             r"exit 0: .*no \"`weights_only` was not set\" line", lambda e: [], "works: that line only is filtered"),
        # -- signals (the fault matrix below has each with its resume)
        *[Case("fault", f"{sig} {moment} of `fit`", lambda e, s=sig, m=moment: _signal(e, s, m),
               rf"exit {128 + int(getattr(signal, sig))}: seglstm fit: interrupted by {sig} at iteration \d: wrote .*last\.ckpt",
               lambda e: [], "last.ckpt written at the point reached and loadable (checked)", _last_loads(sig, moment))
          for sig in ("SIGINT", "SIGTERM") for moment in MOMENTS],
        Case("fault", "SIGTERM during `validate`",
             lambda e: e.cli("validate", "--config", str(_with(e, "val_sig.yaml", lambda t: t.replace("limit_val_batches: 0", "limit_val_batches: 1.0").replace(
                 "callbacks:", "callbacks:\n  - class_path: tests.reliability_helpers.SignalWhen\n    init_args: {moment: in validation, step: 0, signum: 15}"))),
                 "--ckpt_path", str(e.ckpt), "--allow-class-path", "tests"),
             r"exit 143: seglstm validate: interrupted by SIGTERM", lambda e: [e.run_dir]),
        # -- faults
        Case("fault", "run folder below a regular file (unwritable)",
             lambda e: e.cli("fit", "--config", str(e.cfg), "--trainer.default_root_dir", str(e.tmp / "blocker" / "run")),
             r"cannot write to .*blocker/run", lambda e: [e.tmp / "blocker"]),
        Case("fault", "loss NaN on every step from the start, `--trainer.max_nonfinite_steps 2`",
             lambda e: e.cli("fit", "--config", str(e.cfg), "--trainer.default_root_dir", str(e.tmp / "nan_run"),
                           "--model.model_kwargs", "{nan_input_steps: [1, 2, 3]}", "--trainer.max_nonfinite_steps", "2"),
             r"2 consecutive training steps had a NaN/Inf loss", lambda e: [e.run_dir],
             "checkpoints written before the stop hold finite weights no bad step touched (checked)",
             _finite_checkpoints),
    ]  # fmt: skip


def _cell(text: str, tmp: Path) -> str:
    text = text.replace(str(tmp), "<tmp>").replace(f"PID {os.getpid()} on host {socket.gethostname()}", "PID <pid> on host <host>").replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 400 else text[:397] + "..."


CASES = cases()
ROWS: dict[int, str] = {}  # filled by test_case, written by test_document_is_current


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return Env(tmp_path_factory.mktemp("reliability"))


def _snapshot(paths: list[Path]) -> dict[Path, object]:
    return {p: tree_digest(p) if p.is_dir() else (p.read_bytes() if p.exists() else None) for p in paths}


@pytest.mark.parametrize("number", range(1, len(CASES) + 1), ids=[f"{i}-{c.area}" for i, c in enumerate(CASES, 1)])
def test_case(number: int, env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    """One row: the message names the culprit and the outputs the command could touch are unchanged."""
    case = CASES[number - 1]
    env.capsys = capsys
    capsys.readouterr()
    watch = case.watch(env)
    before = _snapshot(watch)
    seen = case.run(env)
    assert _snapshot(watch) == before, f"{case.bad_input}: outputs changed"
    assert re.search(case.expect, seen, re.S), f"{case.bad_input}: saw {seen!r}, expected /{case.expect}/"
    if case.check is not None:
        case.check(env)
    outputs = case.note or ("unchanged: " + ", ".join(f"`{_cell(str(p), env.tmp)}`" for p in watch) if watch else "none written")
    ROWS[number] = f"| {number} | {case.area} | {case.bad_input} | {_cell(seen, env.tmp)} | {outputs} |"


def test_document_is_current() -> None:
    """docs/reliability.md lists exactly these cases; with SEGLSTM_WRITE_RELIABILITY_DOC=1 it is rewritten
    from this run's rows (which needs every case to have run)."""
    if os.environ.get("SEGLSTM_WRITE_RELIABILITY_DOC") == "1":
        missing = [i for i in range(1, len(CASES) + 1) if i not in ROWS]
        assert not missing, f"cases {missing} did not run or failed: run the whole module to write the table"
        # the fault matrix after the table is written by tests/test_reliability_signals.py: kept as it is
        old = DOC.read_text(encoding="utf-8") if DOC.is_file() else ""
        matrix = old[old.index(MATRIX_START):] if MATRIX_START in old else ""
        DOC.write_text(render([ROWS[i] for i in range(1, len(CASES) + 1)]) + ("\n" + matrix if matrix else ""), encoding="utf-8")
        return
    assert DOC.is_file(), f"{DOC} is missing: run with SEGLSTM_WRITE_RELIABILITY_DOC=1"
    documented = [ln.split("|")[3].strip() for ln in DOC.read_text().splitlines() if re.match(r"\| \d+ \|", ln)]
    assert documented == [c.bad_input for c in CASES], "docs/reliability.md is stale: regenerate it"


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
        "- with `save_last`, `last.ckpt` is refreshed at every checkpoint event and at least every "
        "`last_every_minutes` (default 10); SIGINT/SIGTERM anywhere in `fit` (before the first step, inside or "
        "between steps, in validation, during a checkpoint write) write `last.ckpt` at the point reached and exit "
        "130/143, never 0 (the fault matrix at the end; `tests/test_reliability_signals.py`); a checkpoint taken "
        "before or during a due validation resumes into that validation;",
        "- one writer per run folder: `fit` holds an OS lock (`flock` on `<run folder>/.seglstm.lock`, naming its "
        "PID and host) for its whole life; a second `fit` or `--auto-resume` is refused naming the holder, a dead "
        "holder's lock (SIGKILL included) is free again, DDP ranks share rank 0's; the next run holding the folder "
        "removes `*.part` files a killed writer left (`tests/test_reliability_lock.py`);",
        "- the best score survives resume: `checkpoints/index.json` keeps each top-k file's score, monitoring "
        "callbacks restore their top-k files from it, so after SIGKILL and `--auto-resume` the best file, the "
        "top-k files and `--ckpt_path best` are those of an uninterrupted run (`tests/test_reliability_resume.py`);",
        "- `synth` (and `demo`) build a new dataset in a staging folder and move it into place when complete; "
        "a killed `synth` or `convert` leaves a marker naming its command, which `check-data` and `fit` report; "
        "unreadable dataset entries (symlink loops, dangling links) are errors, not skipped "
        "(`tests/test_reliability_data.py`);",
        "- `--auto-resume` takes the run's newest checkpoint by global step (from `checkpoints/index.json`, "
        "skipping damaged files), says which, or says there is none (`tests/test_training_checkpoints.py`);",
        "- one run per run folder: `fit` into a folder holding a run refuses unless it resumes or `--new-version` "
        "picks `<folder>-vN`; `--ckpt_path best` is the best score recorded in `checkpoints/index.json`;",
        "- every zip-format checkpoint (what torch writes, ours and foreign) has its members' CRC-32 checked on "
        "load, through every loader; legacy-format files carry no checksum and still load;",
        "- `validate/test/predict --ckpt_path` also take a plain weights file (as `predict-scene --ckpt` does);",
        "- `_base_` merges nested mappings recursively (`_delete_: true` replaces one), as mmengine does; "
        "`--print_config` shows the result (`tests/test_training_config.py`);",
        "- `convert` writes into a staging folder and moves the dataset into place only when every tile "
        "converted;",
        "- mIoU is shown in percent with 2 decimals (progress bar, validate/test tables); the logged metrics "
        "`val/mIoU`, `test/mIoU`, `val/IoU.<class>` (CSV, TensorBoard, checkpoint monitor, `metrics.json`) "
        "stay fractions in [0, 1];",
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
