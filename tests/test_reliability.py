"""Reliability and safety: untrusted checkpoints and configs, non-finite steps, unwritable run folders,
failing data items and DDP timeouts, each through the public API or CLI."""

from __future__ import annotations

import collections
import sys
import types
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from seglstm.cli.main import main as seglstm
from seglstm.config import ClassPathError, check_class_paths
from seglstm.data.datamodule import SegDataModule
from seglstm.data.io import DataError
from seglstm.inference.loading import load_segmentor
from seglstm.models.checkpoint import load_pretrained
from seglstm.training.callbacks import RunCheckpoint
from seglstm.training.faults import (
    ElasticDDPStrategy,
    NonFiniteGuard,
    NonFiniteLossError,
    RunDirectoryError,
    probe_dir,
)
from seglstm.training.task import SegmentationTask
from seglstm.training.trainer import SegTrainer
from seglstm.utils.distributed import restart_scoped_store
from seglstm.utils.io import CorruptCheckpointError, UnsafeCheckpointError, torch_load
from tests.reliability_helpers import RelTinySeg, make_synth, malicious_checkpoint, write_config

pytestmark = pytest.mark.usefixtures("rel_tiny_seg")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synth(tmp_path_factory.mktemp("synth") / "loveda")


# -- untrusted checkpoints ---------------------------------------------------------------------------------


def test_malicious_checkpoint_is_refused_by_every_loader(tmp_path, synth, capsys):
    marker = tmp_path / "pwned"
    ckpt = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    refused = r"evil\.ckpt: it is not a plain tensor checkpoint \(it names \S+, which is not on the allow-list"
    with pytest.raises(UnsafeCheckpointError, match=refused + r".*--unsafe-load"):
        torch_load(ckpt)
    with pytest.raises(UnsafeCheckpointError):
        load_pretrained(RelTinySeg(3), ckpt)
    with pytest.raises(UnsafeCheckpointError):
        load_segmentor(ckpt)
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", synth, run)
    assert seglstm(["fit", "--config", str(cfg), "--ckpt_path", str(ckpt)]) == 1
    assert "refusing to load" in capsys.readouterr().err
    out = tmp_path / "pred"
    assert seglstm(["predict", "--config", str(cfg), "--data.predict_root", str(synth / "img_dir" / "val"),
                    "--ckpt_path", str(ckpt), "--out", str(out)]) == 1  # fmt: skip
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists()
    assert not (run / "checkpoints").exists() and not out.exists()


def test_unsafe_load_is_an_explicit_opt_in_that_warns(tmp_path):
    marker = tmp_path / "ran"
    ckpt = malicious_checkpoint(tmp_path / "trusted.ckpt", marker)
    with pytest.warns(UserWarning, match=r"trusted\.ckpt with full unpickling \(--unsafe-load\)"):
        obj = torch_load(ckpt, unsafe=True)
    assert marker.exists()  # the opt-in really unpickles (here: a touch inside tmp_path)
    assert set(obj["state_dict"]) == set(RelTinySeg(3).state_dict())


def test_unsafe_load_cannot_be_switched_on_by_a_config(tmp_path, synth, capsys):
    cfg = write_config(tmp_path / "c.yaml", synth, tmp_path / "run")
    assert seglstm(["fit", "--config", str(cfg), "--trainer.unsafe_load", "true"]) == 2
    assert "needs the --unsafe-load flag" in capsys.readouterr().err


def test_mmseg_style_metadata_loads_weights_only(tmp_path):
    """numpy scalars/arrays/dtypes, OrderedDict state dicts and mmengine's HistoryBuffer are plain data."""
    fake = types.ModuleType("mmengine.logging.history_buffer")

    class HistoryBuffer:
        def __init__(self) -> None:
            self._log_history = np.array([0.5, 0.25])
            self._count_history = np.array([1, 1])
            self.max_length = 1000000

    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = fake.__name__, "HistoryBuffer"
    fake.HistoryBuffer = HistoryBuffer
    names = ["mmengine", "mmengine.logging", fake.__name__]
    for name in names[:-1]:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[fake.__name__] = fake
    try:
        model = RelTinySeg(3)
        sd = collections.OrderedDict((k, torch.randn_like(v.float()).to(v.dtype)) for k, v in model.state_dict().items())
        meta = {"seed": np.int64(7), "lr": np.float32(0.5), "CLASSES": ("a", "b", "c"), "dtype": np.dtype("uint8"),
                "iter": 15000, "hist": np.arange(4, dtype=np.float64)}  # fmt: skip
        hub = {"log_scalars": {"train/loss": HistoryBuffer()}}
        torch.save({"meta": meta, "state_dict": sd, "message_hub": hub}, tmp_path / "mmseg.pth")
    finally:
        for name in names:
            del sys.modules[name]
    obj = torch_load(tmp_path / "mmseg.pth")
    assert obj["meta"]["seed"] == 7 and obj["meta"]["dtype"] == np.uint8
    np.testing.assert_array_equal(obj["meta"]["hist"], np.arange(4.0))
    np.testing.assert_array_equal(obj["message_hub"]["log_scalars"]["train/loss"]._log_history, [0.5, 0.25])
    fresh = RelTinySeg(3)
    load_pretrained(fresh, tmp_path / "mmseg.pth")
    for k, v in sd.items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize("cut", [0, 100, -50])
def test_truncated_checkpoint_is_reported_as_corrupt(tmp_path, cut):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": RelTinySeg(3).state_dict()}, good)
    data = good.read_bytes()
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(data[:cut] if cut else b"")
    with pytest.raises(CorruptCheckpointError, match=r"bad\.ckpt \(\d+ bytes\): truncated or not a torch checkpoint"):
        torch_load(bad)


# -- configs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["os.system", "subprocess.Popen"])
def test_config_class_path_outside_the_project_names_the_key(tmp_path, synth, capsys, target):
    cfg = write_config(tmp_path / "c.yaml", synth, tmp_path / "run")
    text = cfg.read_text().replace("seglstm.training.callbacks.RunCheckpoint", target)
    cfg.write_text(text)
    assert seglstm(["fit", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"trainer.callbacks[0].class_path={target!r} is outside" in err
    assert f"--allow-class-path {target.rsplit('.', 1)[0]}" in err
    assert not (tmp_path / "run").exists()


def test_class_path_on_the_command_line_is_checked_too(tmp_path, synth, capsys):
    cfg = write_config(tmp_path / "c.yaml", synth, tmp_path / "run")
    assert seglstm(["fit", "--config", str(cfg), "--trainer.logger.class_path", "subprocess.Popen"]) == 2
    assert "trainer.logger.class_path='subprocess.Popen'" in capsys.readouterr().err
    assert seglstm(["fit", "--config", str(cfg), "--trainer.callbacks+=os.system"]) == 2
    assert "trainer.callbacks.class_path='os.system'" in capsys.readouterr().err
    assert seglstm(["fit", "--config", str(cfg), "--trainer.callbacks", "[{class_path: os.system}]"]) == 2
    assert "trainer.callbacks[0].class_path='os.system'" in capsys.readouterr().err


def test_allow_class_path_admits_a_named_module_only():
    cfg = {"trainer": {"callbacks": [{"class_path": "mypkg.cb.Tracker"}, {"class_path": "ModelCheckpoint"}]}}
    with pytest.raises(ClassPathError, match=r"trainer\.callbacks\[0\]\.class_path='mypkg\.cb\.Tracker'"):
        check_class_paths(cfg, "x.yaml")
    check_class_paths(cfg, "x.yaml", ("mypkg",))
    with pytest.raises(ClassPathError, match="mypkgevil"):
        check_class_paths({"a": {"class_path": "mypkgevil.X"}}, "x.yaml", ("mypkg",))


def test_yaml_python_tags_are_refused(tmp_path, capsys):
    cfg = tmp_path / "tag.yaml"
    cfg.write_text("trainer:\n  max_steps: !!python/object/apply:os.system ['touch " + str(tmp_path / "p") + "']\n")
    assert seglstm(["fit", "--config", str(cfg)]) == 2
    assert f"config file {cfg} is not valid YAML" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


# -- non-finite steps -------------------------------------------------------------------------------------


class Snapshots(Callback):
    """Model state after every optimizer step (by global step)."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 12) -> None:
        g = torch.Generator().manual_seed(3)
        self.images = torch.randn(n, 3, 8, 8, generator=g)
        self.masks = torch.randint(0, 3, (n, 8, 8), generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "mask": self.masks[i]}


def _fit(tmp_path: Path, max_steps: int, max_nonfinite: int = 10, **model_kw) -> tuple[SegTrainer, Snapshots]:
    snaps = Snapshots()
    torch.manual_seed(0)
    task = SegmentationTask(model="rel_tiny_seg", num_classes=3, model_kwargs=model_kw, warmup_iters=0, lr=0.05, max_iters=50)
    trainer = SegTrainer(
        default_root_dir=str(tmp_path), max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        max_nonfinite_steps=max_nonfinite,
        callbacks=[snaps, RunCheckpoint(filename="iter_{step}", every_n_train_steps=1, save_last=True)],
    )  # fmt: skip
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(_Data(), batch_size=2))
    return trainer, snaps


@pytest.mark.parametrize("kind", ["nan_input_steps", "nan_grad_steps", "inf_loss_steps"])
def test_a_non_finite_step_is_skipped_and_counted(tmp_path, kind):
    trainer, snaps = _fit(tmp_path, 4, **{kind: [2, 3]})
    # steps 2 and 3 change nothing (weights, Adam state and BatchNorm statistics), steps 1 and 4 train
    for k, v in snaps.states[1].items():
        torch.testing.assert_close(snaps.states[2][k], v, rtol=0, atol=0)
        torch.testing.assert_close(snaps.states[3][k], v, rtol=0, atol=0)
    changed = [k for k, v in snaps.states[4].items() if v.is_floating_point() and not torch.equal(v, snaps.states[3][k])]
    assert "decode_head.weight" in changed and "backbone.1.running_mean" in changed
    assert all(torch.isfinite(v).all() for v in snaps.states[4].values() if v.is_floating_point())
    guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
    assert (guard.total, guard.consecutive) == (2, 0)
    assert float(trainer.callback_metrics["train/nonfinite_steps"]) == 2.0
    # the optimizer took 2 real steps only
    state = next(iter(trainer.optimizers[0].state.values()))
    assert int(state["step"]) == 2


def test_consecutive_non_finite_steps_stop_the_run_with_good_checkpoints(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive training steps had a NaN/Inf loss or gradient"):
        _fit(tmp_path, 10, max_nonfinite=3, nan_input_steps=list(range(3, 20)))
    last = torch_load(tmp_path / "checkpoints" / "last.ckpt")
    good = _fit(tmp_path / "ref", 2)[1].states[2]  # the same two good steps, uninterrupted
    for k, v in good.items():
        torch.testing.assert_close(last["state_dict"][f"model.{k}"], v, rtol=0, atol=0)
    assert last["global_step"] == 4  # saved after the first two skipped steps; the third stopped the run


# -- output folders ---------------------------------------------------------------------------------------


def test_unwritable_run_folder_fails_before_training(tmp_path, synth, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = write_config(tmp_path / "c.yaml", synth, blocker / "run")
    assert seglstm(["fit", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"cannot write to {blocker / 'run'}" in err
    assert blocker.read_text() == "not a folder"


def test_full_disk_fails_before_training(tmp_path, monkeypatch):
    import seglstm.training.faults as faults

    usage = faults.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(faults.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(RunDirectoryError, match=r"checkpoints has 0\.0 MiB free but a checkpoint of this model needs"):
        _fit(tmp_path, 2)
    assert not list((tmp_path / "checkpoints").glob("*.ckpt"))
    with pytest.raises(RunDirectoryError, match=r"0\.0 MiB free"):
        probe_dir(tmp_path / "x", need_bytes=2000)


# -- data items and DDP ------------------------------------------------------------------------------------


def test_a_failing_item_in_a_worker_names_file_and_index(tmp_path, synth):
    import shutil

    root = tmp_path / "loveda"
    shutil.copytree(synth, root)
    files = sorted((root / "img_dir" / "train").iterdir())
    files[2].write_bytes(files[2].read_bytes()[:200])  # the header (size) reads, the pixels do not
    dm = SegDataModule("loveda", str(root), batch_size=1, num_workers=1, crop_size=(16, 16),
                       train_scale=(32, 16), test_scale=(32, 32))  # fmt: skip
    dm.setup("fit")
    with pytest.raises(DataError, match=rf"{files[2].name}.*\(item 2\)"):
        for _ in dm.train_dataloader():
            pass


def test_ddp_gets_a_process_group_timeout():
    trainer = SegTrainer(strategy="ddp", accelerator="cpu", devices=2, ddp_timeout=7, logger=False)
    assert isinstance(trainer.strategy, ElasticDDPStrategy) and trainer.strategy._timeout == timedelta(seconds=7)
    trainer = SegTrainer(strategy="ddp_spawn", accelerator="cpu", devices=2, logger=False)
    assert trainer.strategy._timeout == timedelta(seconds=1800) and trainer.strategy._start_method == "spawn"
    with pytest.raises(ValueError, match="ddp_timeout must be > 0"):
        SegTrainer(strategy="ddp", accelerator="cpu", devices=2, ddp_timeout=0, logger=False)


def test_each_elastic_restart_sees_its_own_keys_in_the_agents_store(monkeypatch):
    """The elastic agent's store outlives the workers; a restarted rank must not read what the previous
    attempt's ranks published there (the stale address made gloo's connect fail or hang)."""
    agent = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(agent.port))
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert restart_scoped_store(timedelta(seconds=10)) is None  # not the agent's store: torch's own path
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    first = restart_scoped_store(timedelta(seconds=10))
    first.set("rank_0", "127.0.0.1:41234")
    assert restart_scoped_store(timedelta(seconds=10)).get("rank_0") == b"127.0.0.1:41234"  # same attempt
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second = restart_scoped_store(timedelta(seconds=10))
    assert not second.check(["rank_0"])
    second.set("rank_0", "127.0.0.1:50000")
    assert first.get("rank_0") == b"127.0.0.1:41234"


def test_png_decompression_bomb_is_capped(tmp_path):
    from seglstm.data.io import read_image

    big = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(big)
    with pytest.raises(DataError, match=r"big\.png: 300x200 = 60000 pixels exceeds max_pixels=50000"):
        read_image(big, max_pixels=50_000)
    assert read_image(big, max_pixels=60_000).shape == (200, 300, 3)
