"""Every private Lightning / torch name seglstm relies on, in one module, each with the reason no public API
does the job.

A renamed private method would otherwise break silently on an upgrade (an override that is never called
again, a hook that quietly stops firing). :func:`compat_problems` lists what no longer matches and
``tests/test_lightning_compat.py`` fails loudly on it, naming the Lightning and torch versions; it also
checks that no subclass of a Lightning/torch class overrides a private name missing from the list. The rest
of the code reaches these names only through the classes and functions below (one exception, listed:
``RunCheckpoint`` overrides ``ModelCheckpoint._find_last_checkpoints``). ``make test-lightning-latest``
runs these checks and the training/CLI tests against the newest Lightning on the package index.

The CLI (``seglstm.cli.lightning``) uses LightningCLI's public hooks only (``parser_class`` and
per-sub-command ``parser_kwargs``, ``add_arguments_to_parser``, ``setup_parser``, ``parse_arguments``,
``before_instantiate_classes``). Four seglstm flags stay outside jsonargparse, taken from the command line
before it parses: ``--allow-class-path`` must be known before parsing, because jsonargparse imports every
``class_path`` module while it parses; ``--unsafe-load`` must not be settable by a config file (a parser
argument is a config key, and configs are untrusted); ``--auto-resume`` / ``--new-version`` act on this
invocation only, whereas a parser argument is saved into the run's ``config.yaml`` and reset by a later
``--config`` (jsonargparse applies arguments in order). ``_base_`` configs are composed before parsing for
the same reason as the class-path check.

Public Lightning features looked at and what they lack (so the private names below remain):

- torchdata's ``StatefulDataLoader`` (0.11) in place of ``ResumableDataLoader``: Lightning creates the
  train iterator (``iter`` in the fit loop's ``setup_data``) before it calls the sampler's ``set_epoch``
  (``on_advance_start``), and StatefulDataLoader replays its saved position while the iterator is created,
  so a run resumed in epoch *e* finishes that epoch in epoch *e - 1*'s order (with the epoch-dependent
  augmentation of *e - 1*); ``tests/test_data_order.py`` shows it and fails once it no longer happens.
  ``ResumableDataLoader`` creates its iterator on the first ``next()`` and skips at the index level.
- ``ModelCheckpoint(train_time_interval=...)`` in place of ``last_every_minutes``: Lightning refuses it
  together with ``every_n_train_steps`` (the seed's ``iter_N`` files), and it writes a periodic file, not
  only ``last.ckpt``.
- ``ModelCheckpoint(save_last=True)`` is used as is (``last.ckpt`` at every checkpoint event); its save at
  ``on_train_end`` comes after Lightning counted a part-done epoch as finished (a resume would start the
  next epoch's order), hence the final-step save through ``_save_topk_checkpoint`` /
  ``_save_last_checkpoint`` at the end of the last step.
- ``ModelCheckpoint(save_on_exception=True)`` / the ``on_exception`` hook: they save where the exception
  arrived (possibly inside a step, between the optimizer step and the loop counters), under a top-k name;
  ``InterruptGuard`` defers to the next point whose state resumes exactly and writes ``last.ckpt``.
- Lightning's SIGTERM handling (``trainer.received_sigterm``, ``SIGTERMException``) is used: the flag is read
  by ``caught_signal`` and the exception caught by ``SegTrainer.fit`` and the CLI. It stops on SIGTERM
  without saving (exit status 0 through ``SystemExit()``), Ctrl-C ends in its ``KeyboardInterrupt``
  shutdown (``sys.exit(1)``, no checkpoint), and the cluster environments' ``requeue`` exists for SLURM
  alone.
"""

from __future__ import annotations

import inspect
from typing import Any

import lightning
import torch
from lightning.fabric.utilities import distributed as fabric_distributed
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loops import _FitLoop, _TrainingEpochLoop
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

# (owner, name, parameter names after self (None: an attribute or property), why we need it)
PRIVATE_USES: list[tuple[Any, str, tuple[str, ...] | None, str]] = [
    (ModelCheckpoint, "_monitor_candidates", ("trainer",), "the metrics a save at the last step formats into its name"),
    (ModelCheckpoint, "_save_topk_checkpoint", ("trainer", "monitor_candidates"),
     "a save at the last step that keeps top-k bookkeeping (the seed saves at 15000 whatever the interval)"),
    (ModelCheckpoint, "_save_last_checkpoint", ("trainer", "monitor_candidates"), "the same for last.ckpt"),
    (ModelCheckpoint, "_last_global_step_saved", None, "whether this step was saved already"),
    (DataLoader, "_index_sampler", None,
     "skip the batches a resumed epoch already used at the index level, without loading them"),
    (fabric_distributed, "_init_dist_connection", ("cluster_environment", "torch_distributed_backend"),
     "build the DDP process group on a store scoped to a torchrun restart"),
    (DDPStrategy, "_get_process_group_backend", (), "the backend Lightning would choose"),
    (DDPStrategy, "_timeout", None, "the process-group timeout the strategy was given"),
    (DDPStrategy, "_process_group_backend", None, "where Lightning keeps the chosen backend"),
    (ModelCheckpoint, "_find_last_checkpoints", ("trainer",),
     "RunCheckpoint roots its folder there before setup, so trainer.fit(ckpt_path='last') finds last.ckpt"),
    (_TrainingEpochLoop, "_should_check_val_fx", ("data_fetcher",),
     "whether the step that just ended is followed by a validation (its checkpoint must then resume into it)"),
    (_FitLoop, "_data_fetcher", None, "the fetcher _should_check_val_fx reads"),
]  # fmt: skip


def _has(owner: Any, name: str) -> bool:
    if hasattr(owner, name):
        return True
    # Instance attributes set in __init__ (or, for LightningCLI, while building the parsers).
    if inspect.isclass(owner):
        try:
            source = inspect.getsource(owner)
        except (OSError, TypeError):
            return False
        return f"self.{name} =" in source or f"self.{name}:" in source
    return False


def compat_problems() -> list[str]:
    """What of :data:`PRIVATE_USES` the installed Lightning / torch no longer provide as expected."""
    problems = []
    for owner, name, params, why in PRIVATE_USES:
        where = f"{getattr(owner, '__module__', '')}.{getattr(owner, '__qualname__', getattr(owner, '__name__', owner))}"
        if not _has(owner, name):
            problems.append(f"{where}.{name} is gone (needed to {why})")
            continue
        if params is None:
            continue
        found = tuple(inspect.signature(getattr(owner, name)).parameters)
        found = found[1:] if found[:1] == ("self",) else found
        if found[: len(params)] != params:
            problems.append(f"{where}.{name} now takes {found}, expected {params} first (needed to {why})")
    return problems


def versions() -> str:
    return f"lightning {lightning.__version__}, torch {torch.__version__}"


def save_topk_and_last(callback: ModelCheckpoint, trainer: Any) -> None:
    """Save now as ``callback`` would at a checkpoint event: its top-k file and ``last.ckpt``."""
    candidates = callback._monitor_candidates(trainer)
    callback._save_topk_checkpoint(trainer, candidates)
    callback._save_last_checkpoint(trainer, candidates)


def last_saved_step(callback: ModelCheckpoint) -> int:
    """The global step ``callback`` saved last (Lightning's own skip-if-saved bookkeeping)."""
    return int(callback._last_global_step_saved)


class IndexSamplerHookLoader(DataLoader):
    """DataLoader whose index sampler passes through :meth:`wrap_index_sampler` each time torch asks for it."""

    def wrap_index_sampler(self, sampler: Any) -> Any:
        return sampler

    @property
    def _index_sampler(self) -> Any:
        return self.wrap_index_sampler(super()._index_sampler)


def process_group_timeout(strategy: DDPStrategy) -> Any:
    """The process-group timeout ``strategy`` was built with (a ``timedelta``)."""
    return strategy._timeout


def init_process_group(strategy: DDPStrategy, **kwargs: Any) -> None:
    """Lightning's process-group set-up for ``strategy`` (its cluster environment, backend and timeout), with
    extra ``init_process_group`` keyword arguments (a ``store``)."""
    assert strategy.cluster_environment is not None
    strategy._process_group_backend = strategy._get_process_group_backend()
    fabric_distributed._init_dist_connection(
        strategy.cluster_environment, strategy._process_group_backend, timeout=strategy._timeout, **kwargs
    )


def validation_due(trainer: Any) -> bool:
    """Whether the fit loop validates right after the training step that just ended (Lightning's decision)."""
    loop = trainer.fit_loop
    return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))


def val_batches_done(trainer: Any) -> int:
    """Validation batches the fit loop has completed in this epoch (its progress counter)."""
    return int(trainer.fit_loop.epoch_loop.val_loop.batch_progress.total.completed)


def mark_validation_pending(checkpoint: dict[str, Any], val_done_before: int, mid_validation: bool) -> None:
    """Rewrite the loop state of a checkpoint taken at step N before (or during) step N's validation so that
    a resume runs that validation in full.

    Lightning resumes a checkpoint saved at the end of a step past the validation due there, and one saved
    mid-validation from the batch reached (with the metric accumulators of the batches before it lost). The
    state written here is the one Lightning calls "restarted mid evaluation" with no batch done, at the end
    of step N: the resumed run validates first, from the first batch, then trains step N + 1.
    """
    fit = checkpoint["loops"]["fit_loop"]
    if mid_validation:  # the step's own progress as it stood at the end of the step (before `completed`)
        step = fit["epoch_loop.batch_progress"]
        for part in ("total", "current"):
            step[part]["completed"] = step[part]["processed"] - 1
    val = fit["epoch_loop.val_loop.batch_progress"]
    val["total"].update(ready=val_done_before + 1, started=val_done_before + 1,
                        processed=val_done_before, completed=val_done_before)  # fmt: skip
    val["current"].update(ready=1, started=1, processed=0, completed=0)
    val["is_last_batch"] = False
