"""Package layering: inference runs without the training stack (Lightning, the task, the callbacks)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import seglstm

INFERENCE = Path(seglstm.__file__).parent / "inference"


def _package(path: Path) -> str:
    """The package a source file under src/seglstm belongs to (relative imports resolve against it)."""
    return ".".join(path.relative_to(INFERENCE.parent.parent).parent.parts)


def _imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """Every module an ``import``/``from ... import`` statement in ``path`` names (at any depth, so imports
    inside functions count), as absolute names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            found += [(node.lineno, module)] + [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return found


def test_inference_sources_never_import_training():
    files = sorted(INFERENCE.rglob("*.py"))
    assert len(files) > 10  # the scan sees the whole package
    offenders = [
        f"{path.relative_to(INFERENCE.parent)}:{line}: {name}"
        for path in files
        for line, name in _imported_modules(path, _package(path))
        if name == "seglstm.training" or name.startswith("seglstm.training.")
    ]
    assert not offenders, "inference imports training:\n" + "\n".join(offenders)


def test_scan_resolves_relative_and_nested_imports(tmp_path):
    """A relative import of training, or one inside a function, would otherwise slip past the scan."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ...training import task\n\ndef f():\n    from ... import training\n    import os.path\n")
    names = [name for _, name in _imported_modules(probe, "seglstm.inference.scene")]
    assert names == ["seglstm.training", "seglstm.training.task", "seglstm", "seglstm.training", "os.path"]
    assert _package(INFERENCE / "scene" / "region.py") == "seglstm.inference.scene"
    assert _package(INFERENCE / "__init__.py") == "seglstm.inference"


def test_importing_inference_loads_no_training_module():
    code = (
        "import pkgutil, importlib, sys, seglstm.inference as inf\n"
        "mods = [m.name for m in pkgutil.walk_packages(inf.__path__, 'seglstm.inference.')]\n"
        "[importlib.import_module(m) for m in mods]\n"
        "print(len(mods)); print(sorted(m for m in sys.modules if m.startswith('seglstm.training')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    count, loaded = out.stdout.strip().splitlines()
    assert int(count) > 10
    assert loaded == "[]", f"importing seglstm.inference loaded {loaded}"
