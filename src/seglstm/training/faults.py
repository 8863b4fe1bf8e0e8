"""Faults a week-long run must survive: non-finite steps, unwritable or full run folders, dead DDP ranks.

- :class:`NonFiniteGuard`: a step whose loss or gradients are NaN/Inf is skipped (no optimizer update, and
  the buffers the forward pass touched, BatchNorm statistics included, are put back), counted and logged as
  ``train/nonfinite_steps``; after ``max_consecutive`` bad steps in a row the run stops with
  :class:`NonFiniteLossError` before anything else is saved, so the last good checkpoint stays the latest.
- :func:`probe_run_dirs`: before the first step, every folder the run will write to must accept a file and
  have room for one more checkpoint, or :class:`RunDirectoryError` says which folder and why.
- :class:`RunLock`: one writer per run folder, an OS file lock (``flock``) on ``<run folder>/.seglstm.lock``
  held for the whole ``fit``; the kernel drops it when the process ends in any way (SIGKILL included), so a
  dead run's lock file is simply taken over. A second ``fit`` into the folder fails naming the holder.
- :func:`remove_partial_files`: ``*.part`` files a killed writer left in the run folder, removed by the
  next run that holds the lock.
- :func:`ddp_strategy`: DDP with a finite process-group timeout, so when one rank dies the others fail with
  an error instead of waiting forever, and whose process group survives torchrun's elastic restarts
  (:class:`ElasticDDPStrategy`).
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn

from seglstm.errors import SeglstmError
from seglstm.training._lightning_compat import init_process_group, process_group_timeout
from seglstm.utils.distributed import restart_scoped_store
from seglstm.utils.io import atomic_path

DDP_STRATEGIES = ("ddp", "ddp_spawn", "ddp_fork", "ddp_find_unused_parameters_true")


class NonFiniteLossError(SeglstmError, RuntimeError):
    """Too many consecutive training steps had a NaN/Inf loss or gradient."""


class RunDirectoryError(SeglstmError, RuntimeError):
    """A folder the run writes to is not writable or too full for the next checkpoint."""


class RunLockedError(RunDirectoryError):
    """Another live process holds the run folder's lock."""


LOCK_NAME = ".seglstm.lock"
_NO_LOCKING = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def is_rank_zero_process() -> bool:
    """Whether this process is (or will be) global rank 0, from the launcher's environment (torchrun's RANK,
    SLURM's SLURM_PROCID, Lightning's own LOCAL_RANK/NODE_RANK); a plain process is rank 0."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").strip().isdigit():
            return int(os.environ[key]) == 0
    return int(os.environ.get("LOCAL_RANK", "0") or 0) == 0 and int(os.environ.get("NODE_RANK", "0") or 0) == 0


class RunLock:
    """An exclusive ``flock`` on ``<folder>/.seglstm.lock``, with the holder's PID and host written in it.

    ``flock`` locks belong to the open file and vanish with the process, however it ends, so a lock file left
    by a dead run never blocks the next one. On a filesystem without ``flock`` (some NFS mounts) the run goes
    on with a warning instead of a lock.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunLockedError` naming the holder."""
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunDirectoryError(
                f"cannot write to {self.path.parent} ({err.strerror or err}): fix its permissions or choose "
                "another trainer.default_root_dir before training starts"
            ) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(
                f"run folder {self.path.parent} is in use by {holder} (lock {self.path}): wait for that run to "
                "end, or stop it, before starting or resuming this one here"
            ) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in _NO_LOCKING:
                raise
            print(
                f"seglstm: warning: the filesystem of {self.path.parent} does not support file locks "
                f"({err.strerror}): make sure no other run writes to this folder",
                file=sys.stderr,
            )
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays; its content names the last holder)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def remove_partial_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.*.part`` temporary files (see :func:`seglstm.utils.io.atomic_path`) under ``folder``:
    only a killed writer leaves them, and the caller holds the folder's lock, so none is being written."""
    root = Path(folder)
    removed = []
    for part in sorted(root.rglob(".*.part")) if root.is_dir() else []:
        if part.is_file():
            part.unlink()
            removed.append(part)
    return removed


class NonFiniteGuard(Callback):
    """Skip and count steps with a non-finite loss or gradient; stop after ``max_consecutive`` in a row.

    Under DDP every rank takes the same decision (any rank's bad step is skipped everywhere), so the ranks'
    weights stay identical and nobody waits on a collective the others skipped.

    Args:
        max_consecutive: bad steps in a row that stop the run (``0`` disables stopping, never skipping).
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        super().__init__()
        if max_consecutive < 0:
            raise ValueError(f"max_consecutive must be >= 0, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.total = 0
        self.consecutive = 0
        self._loss_finite = True
        self._buffers: list[torch.Tensor] = []

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total = int(state_dict.get("total", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # Buffers are small next to the weights; a copy per step is cheap insurance against NaN statistics.
        self._buffers = [b.detach().clone() for b in pl_module.buffers()]
        self._loss_finite = True

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._loss_finite = bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = self._loss_finite
        if finite and grads:
            finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        bad = bool(trainer.strategy.reduce_boolean_decision(not finite, all=False))
        if not bad:
            self.consecutive = 0
        else:
            self._skip(trainer, pl_module, optimizer)
        pl_module.log("train/nonfinite_steps", float(self.total), on_step=True, on_epoch=False)
        if bad and self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} consecutive training steps had a NaN/Inf loss or gradient (last at "
                f"iteration {trainer.global_step + 1}, {self.total} skipped in all); stopping. None of them updated "
                "the weights, so every checkpoint of this run holds good weights: lower the learning rate or "
                "check the data, then resume from the last checkpoint. "
                "trainer.max_nonfinite_steps sets the limit."
            )

    def _skip(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # AdamW (and every torch optimizer) leaves parameters without a gradient alone
        with torch.no_grad():
            for buf, saved in zip(pl_module.buffers(), self._buffers):
                buf.copy_(saved)
        self.total += 1
        self.consecutive += 1
        what = "loss" if not self._loss_finite else "gradient"
        rank_zero_warn(
            f"non-finite {what} at iteration {trainer.global_step + 1}: step skipped ({self.consecutive} in a row, "
            f"{self.total} in all)"
        )


def checkpoint_bytes(module: torch.nn.Module) -> int:
    """Rough size of one checkpoint: weights, AdamW's two moments per weight, and the buffers."""
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return 3 * params + buffers


def probe_dir(folder: str | os.PathLike, need_bytes: int = 0) -> None:
    """Create ``folder``, write and remove a file in it, and check it has ``need_bytes`` free.

    Raises:
        RunDirectoryError naming the folder and the cause.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / ".seglstm-write-probe") as tmp:
            tmp.write_bytes(b"seglstm write probe\n")
        (folder / ".seglstm-write-probe").unlink()
    except OSError as err:
        raise RunDirectoryError(
            f"cannot write to {folder} ({err.strerror or err}): fix its permissions or choose another "
            "trainer.default_root_dir before training starts"
        ) from err
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise RunDirectoryError(
            f"{folder} has {free / 2**20:.1f} MiB free but a checkpoint of this model needs about "
            f"{need_bytes / 2**20:.1f} MiB: free space or choose another trainer.default_root_dir"
        )


def probe_run_dirs(trainer: pl.Trainer, model: torch.nn.Module) -> list[Path]:
    """Probe the run folder, every checkpoint folder and every logger folder of ``trainer`` (rank 0 only).

    Returns:
        The folders probed.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    root = Path(trainer.default_root_dir)
    folders: dict[Path, int] = {root: 0}
    need = checkpoint_bytes(model)
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint):
            folder = Path(cb.dirpath) if cb.dirpath is not None else root / "checkpoints"
            folders[folder] = need
    for logger in trainer.loggers:
        if logger.save_dir is not None:
            folders.setdefault(Path(logger.save_dir), 0)
    if trainer.is_global_zero:
        for folder, need_bytes in folders.items():
            probe_dir(folder, need_bytes)
    return list(folders)


class ElasticDDPStrategy(DDPStrategy):
    """Lightning's DDP whose process group is built on :func:`restart_scoped_store` under torchrun."""

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        kwargs: dict[str, Any] = {"device_id": self.root_device if self.root_device.type != "cpu" else None}
        store = restart_scoped_store(process_group_timeout(self))
        if store is not None:
            kwargs["store"] = store
        init_process_group(self, **kwargs)


def ddp_strategy(strategy: Any, timeout_s: float, multi_device: bool) -> Any:
    """``strategy`` as an :class:`ElasticDDPStrategy` with a process-group timeout when it is (or ``auto``
    resolves to) DDP.

    Args:
        strategy: the ``trainer.strategy`` value.
        timeout_s: seconds a collective may wait for the other ranks.
        multi_device: whether ``auto`` would pick DDP (several devices or nodes).
    """
    if timeout_s <= 0:
        raise ValueError(f"trainer.ddp_timeout must be > 0 seconds, got {timeout_s}")
    if not isinstance(strategy, str) or strategy not in (*DDP_STRATEGIES, "auto"):
        return strategy
    if strategy == "auto" and not multi_device:
        return strategy
    kwargs: dict[str, Any] = {"timeout": timedelta(seconds=timeout_s)}
    if strategy in ("ddp_spawn", "ddp_fork"):
        kwargs["start_method"] = strategy.split("_")[1]
    if strategy == "ddp_find_unused_parameters_true":
        kwargs["find_unused_parameters"] = True
    return ElasticDDPStrategy(**kwargs)
