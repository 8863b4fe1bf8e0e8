"""The comparison study: train and measure several segmentors under one data config, recipe and budget.

``seglstm compare`` is :func:`run_compare` (its command line: :mod:`seglstm.cli.compare`); the models' jobs
in child processes are :mod:`seglstm.study.jobs`, the rows and files :mod:`seglstm.study.tables`, the figures
:mod:`seglstm.study.plots`; :mod:`seglstm.study.measure` holds the cost measurements the benchmark scripts
share. Submodules are imported on use so that
``import seglstm.study`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from seglstm.study.compare import Budget, CompareConfig, run_compare

__all__ = ["Budget", "CompareConfig", "run_compare"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from seglstm.study import compare

        return getattr(compare, name)
    raise AttributeError(f"module 'seglstm.study' has no attribute {name!r}")
