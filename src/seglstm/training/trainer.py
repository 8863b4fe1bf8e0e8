"""``SegTrainer``: Lightning's Trainer with the project's run layout and device-dependent defaults.

What it adds over ``lightning.pytorch.Trainer`` (every other argument is passed through unchanged):

- ``precision="auto"``: ``bf16-mixed`` on a CUDA GPU that supports it (else ``16-mixed``), ``32-true`` on the
  CPU, with TF32 matmuls on CUDA (:func:`seglstm.utils.device.resolve_precision`). Mixed precision on the CPU
  is refused: it is slow there and the project's CPU numbers are float32. An NVIDIA GPU that torch cannot
  use (driver older than the wheel's CUDA) gives a warning rather than a silent CPU run.
- ``sync_batchnorm="auto"``: SyncBatchNorm when training on several CUDA devices (the seed's SyncBN under
  DDP); off on the CPU, where torch has no SyncBatchNorm kernel.
- ``logger=None``/``True``: a CSV logger and a TensorBoard logger sharing one ``logs/version_N`` folder under
  ``default_root_dir``, so ``seglstm plot-log`` and TensorBoard read the same run. Without the tensorboard
  extra, CSV alone (as Lightning's own default falls back to CSV), said once at the start.
- checkpoints are always written atomically (:class:`~seglstm.training.callbacks.AtomicCheckpointIO`), and
  the progress bar counts iterations to ``max_steps`` with an ETA.
- checkpoints are always read with ``weights_only=True`` (resume included) unless ``unsafe_load``.
- faults (:mod:`seglstm.training.faults`): NaN/Inf steps are skipped and counted, and the run stops after
  ``max_nonfinite_steps`` in a row; ``fit`` probes every output folder before the first step; DDP gets a
  ``ddp_timeout`` so a dead rank makes the others fail instead of hang.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from typing import Any, Literal

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from seglstm.training.callbacks import AtomicCheckpointIO, StepProgressBar
from seglstm.training.faults import NonFiniteGuard, ddp_strategy, probe_run_dirs
from seglstm.utils.device import resolve_precision, wants_cuda

__all__ = ["SegTrainer", "default_loggers", "resolve_precision"]


def _device_count(devices: Any) -> int:
    if isinstance(devices, int):
        return devices if devices > 0 else torch.cuda.device_count()
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        if devices in ("auto", "-1"):
            return torch.cuda.device_count()
        return len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    return 1


def default_loggers(root_dir: str) -> list[Logger]:
    """CSV + TensorBoard in ``<root_dir>/logs/version_N`` (TensorBoard in its ``tb`` subfolder)."""
    from seglstm.utils.optional import available

    csv = CSVLogger(root_dir, name="logs")
    if not available("tensorboard"):
        _note_no_tensorboard()
        return [csv]
    return [
        csv,
        TensorBoardLogger(root_dir, name="logs", version=csv.version, sub_dir="tb", default_hp_metric=False),
    ]


@functools.cache
def _note_no_tensorboard() -> None:
    """Once per process: fit and test each build a trainer."""
    from lightning.pytorch.utilities import rank_zero_info

    from seglstm.utils.optional import missing_extra_message

    rank_zero_info(missing_extra_message("tensorboard", "Writing TensorBoard logs beside metrics.csv"))


class SegTrainer(Trainer):
    """Lightning Trainer with ``precision``/``sync_batchnorm`` resolved per device and the run layout above.

    Args:
        precision: ``auto`` (see module docstring) or any Lightning precision.
        sync_batchnorm: ``auto``, ``True`` or ``False``.
        logger: ``None``/``True`` for the CSV + TensorBoard pair, ``False`` for none, or Lightning loggers.
        callbacks: Lightning callbacks; a :class:`StepProgressBar` and a :class:`NonFiniteGuard` are added
            unless one is given.
        plugins: Lightning plugins; :class:`AtomicCheckpointIO` is added unless a ``CheckpointIO`` is given.
        max_nonfinite_steps: consecutive NaN/Inf steps (each skipped) that stop the run; 0 never stops.
        ddp_timeout: seconds a DDP collective waits for the other ranks before failing.
        unsafe_load: read checkpoints (``ckpt_path``) with full unpickling; only for trusted files.
    """

    def __init__(
        self,
        *args: Any,
        precision: str | int | None = "auto",
        sync_batchnorm: bool | Literal["auto"] = "auto",
        logger: Logger | Iterable[Logger] | bool | None = None,
        callbacks: list[Callback] | Callback | None = None,
        plugins: Any = None,
        max_nonfinite_steps: int = 10,
        ddp_timeout: float = 1800.0,
        unsafe_load: bool = False,
        **kwargs: Any,
    ) -> None:
        accelerator = kwargs.get("accelerator", "auto")
        devices = kwargs.get("devices", "auto")
        n_devices = _device_count(devices) if wants_cuda(accelerator) or isinstance(devices, int) else 1
        multi = n_devices * int(kwargs.get("num_nodes", 1) or 1) > 1
        kwargs["strategy"] = ddp_strategy(kwargs.get("strategy", "auto"), ddp_timeout, multi)
        precision = resolve_precision(precision, accelerator)
        if sync_batchnorm == "auto":
            sync_batchnorm = wants_cuda(accelerator) and (
                _device_count(kwargs.get("devices", "auto")) * int(kwargs.get("num_nodes", 1) or 1) > 1
            )
        root = kwargs.get("default_root_dir") or os.getcwd()
        if logger is None or logger is True:
            logger = default_loggers(str(root))
        callbacks = (
            [] if callbacks is None else list(callbacks) if isinstance(callbacks, list) else [callbacks]
        )
        if kwargs.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            callbacks.append(StepProgressBar())
        if not any(isinstance(c, NonFiniteGuard) for c in callbacks):
            callbacks.append(NonFiniteGuard(max_nonfinite_steps))
        plugin_list = (
            [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        )
        if not any(isinstance(p, CheckpointIO) for p in plugin_list):
            plugin_list.append(AtomicCheckpointIO(unsafe_load=unsafe_load))
        super().__init__(
            *args,
            precision=precision,
            sync_batchnorm=sync_batchnorm,
            logger=logger,
            callbacks=callbacks,
            plugins=plugin_list,
            **kwargs,
        )

    def fit(self, model: Any, *args: Any, **kwargs: Any) -> None:
        """``Trainer.fit`` after checking every output folder takes a file and has room for a checkpoint."""
        probe_run_dirs(self, model)
        super().fit(model, *args, **kwargs)
