"""The one base class of every exception seglstm raises on purpose.

``except SeglstmError`` catches any of them, and the ``seglstm`` command turns one that a sub-command did
not handle into a single ``seglstm <command>: error: ...`` line and exit status :attr:`SeglstmError.exit_code`
instead of a traceback. Each subclass keeps the built-in base that says what kind of failure it is
(``ValueError`` for bad input, ``FileNotFoundError``, ``RuntimeError``, ``ImportError``), so code written
against those still catches it.

:class:`~seglstm.training.callbacks.TrainingInterrupted` is a ``SeglstmError`` too, although it reports a
stop request rather than a fault: it must pass through Lightning's ``Trainer.fit`` as an ordinary exception,
since Lightning turns a ``KeyboardInterrupt`` raised there into ``sys.exit(1)``, which would lose the
``last.ckpt`` message and the 128 + signal exit status that schedulers read. Its ``exit_code`` is that status.
"""

from __future__ import annotations

__all__ = ["SeglstmError"]


class SeglstmError(Exception):
    """Base of the project's exceptions; the message is one line naming the file or argument and the fix."""

    exit_code: int = 1
    """Exit status of the ``seglstm`` command when this error ends it."""
