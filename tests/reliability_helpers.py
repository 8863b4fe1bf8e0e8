"""Shared pieces of the reliability tests: a tiny segmentor that can be told to go non-finite on chosen steps
(registered as ``rel_tiny_seg`` by the ``rel_tiny_seg`` fixture in conftest.py, or by
:func:`register_rel_tiny_seg` in a child process), a synthetic LoveDA folder, a CLI config around them, a
checkpoint that runs code when unpickled, and callbacks that kill or signal a child run (named by class
path in its config). ``python -m tests.reliability_helpers fit ...`` is the CLI with
``rel_tiny_seg`` registered."""

from __future__ import annotations

import hashlib
import io
import math
import os
import pathlib
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import Callback
from torch import nn

from seglstm.models.registry import list_models, register_model
from seglstm.training.callbacks import AtomicCheckpointIO


class RelTinySeg(nn.Module):
    """Segmentor interface (``loss``, ``inference``) with BatchNorm, so a NaN batch would poison buffers.

    Args:
        num_classes: output classes.
        nan_input_steps: 1-based training calls whose input is multiplied by NaN (loss and BN stats go NaN).
        nan_grad_steps: 1-based training calls whose loss stays finite but whose gradient is NaN.
        inf_loss_steps: 1-based training calls whose loss is +Inf.
    """

    def __init__(
        self,
        num_classes: int,
        nan_input_steps: list[int] | None = None,
        nan_grad_steps: list[int] | None = None,
        inf_loss_steps: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.neck = None
        self.decode_head = nn.Conv2d(8, num_classes, 1)
        self.auxiliary_head = None
        self.nan_input_steps = set(nan_input_steps or [])
        self.nan_grad_steps = set(nan_grad_steps or [])
        self.inf_loss_steps = set(inf_loss_steps or [])
        self.calls = 0

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.backbone(img))

    def loss(self, img: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls in self.nan_input_steps:
            img = img * math.nan
        logits = self(img)
        if self.calls in self.nan_grad_steps:
            logits.register_hook(lambda g: torch.full_like(g, math.nan))
        ce = F.cross_entropy(logits, mask, ignore_index=255)
        if self.calls in self.inf_loss_steps:
            ce = ce * math.inf
        return {"loss": ce, "loss_decode": ce}

    @torch.no_grad()
    def inference(self, img: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        return self(img)


def rel_tiny_seg(num_classes: int, **kwargs: Any) -> RelTinySeg:
    return RelTinySeg(num_classes, **kwargs)


def register_rel_tiny_seg() -> None:
    """Make ``rel_tiny_seg`` a model preset (the configs of :func:`write_config` name it)."""
    if "rel_tiny_seg" not in list_models():
        register_model(rel_tiny_seg)


class Payload:
    """Unpickling this calls ``Path.touch`` on ``target``: harmless, but proof that code ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.target),))


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint whose tensors are fine but whose metadata runs code when fully unpickled."""
    model = RelTinySeg(3)
    torch.save({"state_dict": model.state_dict(), "meta": {"note": Payload(marker)}}, path)
    return path


def make_synth(root: Path, train: int = 4, val: int = 2, size: int = 32) -> Path:
    """A small synthetic LoveDA folder (the generator is deterministic from its seed)."""
    from seglstm.data.synthetic import generate

    if not (root / "meta.json").is_file():
        generate(root, train, val, 0, size=size, seed=0, workers=1, overwrite=False, progress=False)
    return root


def write_config(path: Path, data_root: Path, run_dir: Path, max_steps: int = 3, **model: Any) -> Path:
    """A CLI config for ``rel_tiny_seg`` on ``data_root``: checkpoint every step, no validation."""
    cfg = {
        "model": {"model": "rel_tiny_seg", "warmup_iters": 0, "lr": 0.01, "model_kwargs": model or None},
        "data": {
            "dataset": "loveda", "root": str(data_root), "batch_size": 2, "val_batch_size": 1, "num_workers": 0,
            "crop_size": [16, 16], "train_scale": [32, 16], "test_scale": [32, 32],
        },
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "logger": False,
            "default_root_dir": str(run_dir), "enable_progress_bar": False, "enable_model_summary": False,
            "num_sanity_val_steps": 0, "limit_val_batches": 0,
            "callbacks": [{
                "class_path": "seglstm.training.callbacks.RunCheckpoint",
                "init_args": {"filename": "iter_{step}", "every_n_train_steps": 1, "save_last": True},
            }],
        },
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def interval_config(path: Path, data_root: Path, run_dir: Path, max_steps: int = 6, every: int = 2,
                    callbacks: list[dict] | None = None, plugins: list[dict] | None = None) -> Path:  # fmt: skip
    """:func:`write_config` with validation and checkpoints every ``every`` steps (coinciding, as in the seed's
    schedule): ``iter_{step}`` top-1 with ``last.ckpt``, and ``best_mIoU_iter_{step}`` top-1 by val mIoU;
    ``callbacks`` and ``plugins`` (class-path dicts) are added."""
    write_config(path, data_root, run_dir, max_steps=max_steps)
    doc = yaml.safe_load(path.read_text())
    trainer = doc["trainer"]
    trainer.update(limit_val_batches=1.0, val_check_interval=every, check_val_every_n_epoch=None)
    trainer["callbacks"] = [
        {"class_path": "seglstm.training.callbacks.RunCheckpoint",
         "init_args": {"filename": "iter_{step}", "every_n_train_steps": every, "save_last": True, "save_top_k": 1}},
        {"class_path": "seglstm.training.callbacks.RunCheckpoint",
         "init_args": {"filename": "best_mIoU_iter_{step}", "monitor": "val/mIoU", "mode": "max", "save_top_k": 1}},
        *(callbacks or []),
    ]  # fmt: skip
    if plugins:
        trainer["plugins"] = plugins
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (empty when it does not exist): "no output was corrupted"."""
    if not folder.exists():
        return {}
    return {
        os.fspath(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def damage(path: Path, out: Path | None = None, start: int = 1024, every: int = 256 * 1024) -> Path:
    """Flip 16 bytes every ``every`` bytes from ``start`` (same size, zip structure intact, CRCs broken), as a
    bad disk or copy would; written to ``out`` (default: in place)."""
    data = bytearray(path.read_bytes())
    for offset in range(start, len(data) - 16, every):
        data[offset : offset + 16] = bytes(b ^ 0xFF for b in data[offset : offset + 16])
    target = out or path
    target.write_bytes(bytes(data))
    return target


class DieOnce(Callback):
    """Exit at once (``os._exit``) after training step ``step`` on rank ``rank``, on the first attempt only (a
    torchrun elastic restart has ``TORCHELASTIC_RESTART_COUNT`` > 0)."""

    def __init__(self, step: int = 2, rank: int = 1) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0
        if trainer.global_step == self.step and trainer.global_rank == self.rank and first_attempt:
            os._exit(17)


class SignalAt(Callback):
    """Sends ``signum`` to its own process in the middle of training step ``step`` (before the backward)."""

    def __init__(self, step: int = 3, signum: int = 2) -> None:
        self.step, self.signum = step, signum

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if trainer.global_step + 1 == self.step and int(os.environ.get("SIGNAL_AT_ON", "1")):
            os.kill(os.getpid(), self.signum)


MOMENTS = ("before the first step", "inside a step", "between steps", "in validation", "during a checkpoint write")


class SignalWhen(Callback):
    """Sends ``signum`` to its own process at ``moment`` (one of :data:`MOMENTS`) of training step ``step``
    (validation: the one after step ``step``; the checkpoint write is :class:`SignalingIO`'s); off when the
    environment has ``SIGNAL_AT_ON=0``."""

    def __init__(self, moment: str, step: int = 3, signum: int = 15) -> None:
        if moment not in MOMENTS:
            raise ValueError(f"moment must be one of {MOMENTS}, got {moment!r}")
        self.moment, self.step, self.signum = moment, step, signum

    def _send(self, moment: str, step: int) -> None:
        if moment == self.moment and step == self.step and int(os.environ.get("SIGNAL_AT_ON", "1")):
            os.kill(os.getpid(), self.signum)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._send("before the first step", self.step)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        self._send("inside a step", trainer.global_step + 1)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._send("between steps", trainer.global_step)

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._send("in validation", trainer.global_step)


class KillAt(Callback):
    """Ends its process like SIGKILL (``how="sigkill"``: the real signal; ``how="raise"``: a BaseException no
    handler saves anything for, for in-process tests) at ``moment`` of step ``step``: after the step ends
    (``"after step"``) or in the validation that follows it (``"in validation"``). Off with ``SIGNAL_AT_ON=0``."""

    def __init__(self, step: int, moment: str = "after step", how: str = "sigkill") -> None:
        self.step, self.moment, self.how = step, moment, how

    def _die(self, moment: str, step: int) -> None:
        if moment == self.moment and step == self.step and int(os.environ.get("SIGNAL_AT_ON", "1")):
            if self.how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise SimulatedKill(f"killed {moment} {step}")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._die("after step", trainer.global_step)

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._die("in validation", trainer.global_step)


class WaitAt(Callback):
    """After training step ``step``, waits (up to 5 minutes) until the file named by the environment variable
    ``WAIT_AT_FILE`` exists; does nothing without it. Keeps a run alive while a test starts another."""

    def __init__(self, step: int = 1) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        marker = os.environ.get("WAIT_AT_FILE")
        if marker and trainer.global_step == self.step:
            deadline = time.monotonic() + 300
            while not Path(marker).exists() and time.monotonic() < deadline:
                time.sleep(0.05)


class SimulatedKill(BaseException):
    """Stands for SIGKILL in-process: nothing catches it, so nothing is saved on the way out."""


class SignalingIO(AtomicCheckpointIO):
    """Checkpoint IO that sends ``signum`` to its own process in the middle of writing the checkpoint of step
    ``step`` (after the first half of its bytes), then finishes the write; once."""

    def __init__(self, step: int = 4, signum: int = 15) -> None:
        super().__init__()
        self.step, self.signum, self.sent = step, signum, False

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if int(checkpoint.get("global_step", -1)) == self.step and int(os.environ.get("SIGNAL_AT_ON", "1")) and not self.sent:
            self.sent = True
            real_save = torch.save

            def half_then_signal(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
                buf = io.BytesIO()
                real_save(obj, buf)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.kill(os.getpid(), self.signum)
                f.write(data[len(data) // 2 :])

            torch.save = half_then_signal
            try:
                super().save_checkpoint(checkpoint, path, storage_options)
            finally:
                torch.save = real_save
            return
        super().save_checkpoint(checkpoint, path, storage_options)


if __name__ == "__main__":  # `python -m tests.reliability_helpers fit ...`: the CLI with rel_tiny_seg
    from seglstm.cli.main import main

    register_rel_tiny_seg()
    sys.exit(main(sys.argv[1:]))
