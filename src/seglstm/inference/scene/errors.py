"""The one error type of scene inference, kept apart so every module can raise it without cycles."""

from __future__ import annotations

from seglstm.errors import SeglstmError


class SceneError(SeglstmError, ValueError):
    """Bad scene input, arguments or partial state; the message names the file or argument."""
