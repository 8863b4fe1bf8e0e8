"""One exception base: every class the project raises derives from ``seglstm.SeglstmError``, keeps its
built-in kind, and the ``seglstm`` command turns an unhandled one into one line and its exit status."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import seglstm
from seglstm import SeglstmError
from seglstm.utils.optional import EXTRAS

SRC = Path(seglstm.__file__).parent


def _runtime_exception_classes() -> dict[str, type[BaseException]]:
    """``module.Class`` -> class, for every exception class defined in an importable seglstm module."""
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(seglstm.__path__, "seglstm."):
        try:
            module = importlib.import_module(info.name)
        except ModuleNotFoundError as err:  # a module of an optional extra; the source scan still covers it
            assert (err.name or "").partition(".")[0] in EXTRAS, f"{info.name}: {err}"
            continue
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return found


def _source_exception_names() -> set[str]:
    """``module.Class`` for every class in src/seglstm whose name or a base's name says it is an exception
    (found without importing, so a module that cannot be imported here is not missed)."""
    ends = ("Error", "Exception", "Interrupt", "Interrupted", "Exit")
    names = set()
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = [ast.unparse(b).rpartition(".")[2] for b in node.bases]
            if node.name.endswith(ends) or any(b.endswith(ends) for b in bases):
                names.add(f"{module}.{node.name}")
    return names


def test_every_project_exception_derives_from_seglstm_error():
    classes = _runtime_exception_classes()
    classes.pop("seglstm.errors.SeglstmError")
    assert len(classes) >= 21  # the walk reaches every subpackage (21 classes when this test was written)
    assert _source_exception_names() - {"seglstm.errors.SeglstmError"} <= set(classes), "not imported/checked"
    outside = sorted(name for name, cls in classes.items() if not issubclass(cls, SeglstmError))
    assert not outside, f"exception classes not deriving from SeglstmError: {outside}"


def test_each_keeps_its_builtin_kind():
    from seglstm.config import ClassPathError, ConfigError
    from seglstm.data.io import DataError, DatasetNotFoundError
    from seglstm.inference.scene import SceneError
    from seglstm.models.pretrained import PretrainedWeightsError
    from seglstm.training.callbacks import TrainingInterrupted
    from seglstm.utils.io import CheckpointLoadError, CorruptCheckpointError
    from seglstm.utils.optional import MissingExtraError

    kinds = {
        ConfigError: ValueError, ClassPathError: ValueError, DataError: ValueError, SceneError: ValueError,
        DatasetNotFoundError: FileNotFoundError, CheckpointLoadError: RuntimeError,
        CorruptCheckpointError: RuntimeError, PretrainedWeightsError: RuntimeError, MissingExtraError: ImportError,
    }
    for cls, kind in kinds.items():
        assert issubclass(cls, SeglstmError) and issubclass(cls, kind), cls
    err = DatasetNotFoundError(2, "no such dataset folder", "/data/missing")
    assert (err.errno, err.filename) == (2, "/data/missing")  # OSError's fields still work
    # an interruption must stay an ordinary Exception: Lightning turns a KeyboardInterrupt in fit into exit 1
    assert not issubclass(TrainingInterrupted, KeyboardInterrupt)
    assert TrainingInterrupted("SIGTERM", 7, None).exit_code == 143


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda: __import__("seglstm.data.io", fromlist=["x"]).DataError("tiles/a.tif: 3 bands, expected 4"), 1),
        (lambda: __import__("seglstm.utils.optional", fromlist=["x"]).MissingExtraError("pip install x"), 2),
        (lambda: __import__("seglstm.training.callbacks", fromlist=["x"]).TrainingInterrupted("SIGINT", 3, None),
         130),
    ],
)
def test_the_command_catches_the_one_base(monkeypatch, capsys, make, code):
    from seglstm.cli import main as cli
    from seglstm.cli import synth

    err = make()

    def fail(argv: list[str]) -> int:
        raise err

    monkeypatch.setattr(synth, "main", fail)
    assert cli.main(["synth", "--out", "x"]) == code
    assert capsys.readouterr().err == f"seglstm synth: error: {err}\n"


def test_other_exceptions_are_not_swallowed(monkeypatch):
    from seglstm.cli import main as cli
    from seglstm.cli import synth

    def fail(argv: list[str]) -> int:
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(synth, "main", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["synth"])
