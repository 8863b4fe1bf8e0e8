"""The README's "Project layout" table stays current: every subpackage is in it and every file it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "seglstm"


def _layout() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("## Project layout", 1)[1].split("\n## ", 1)[0]


def test_every_subpackage_is_listed():
    table = _layout()
    for init in SRC.rglob("__init__.py"):
        package = init.parent.relative_to(SRC)
        if package.parts:  # the top level is the table itself
            top, rest = package.parts[0], "/".join(package.parts[1:])
            assert f"`src/seglstm/{top}`" in table, f"{top} missing from the README layout"
            if rest:
                assert f"`{rest}/`" in table, f"{package} missing from the README layout"


def test_every_named_file_exists():
    table = _layout()
    named = set(re.findall(r"`([A-Za-z_]+\.(?:py|yaml|md))`", table))
    assert len(named) > 40
    present = {p.name for p in (*SRC.rglob("*"), *ROOT.glob("configs/*"), *ROOT.glob("docs/*"), *ROOT.glob("benchmarks/*"))}
    assert not named - present, f"the README layout names files that do not exist: {sorted(named - present)}"
    modules = {p.name for p in SRC.rglob("*.py") if p.name != "__init__.py" and "vil" not in p.parts}
    modules -= {p.name for p in (SRC / "models" / "heads").glob("*.py")}  # the heads are listed as heads/
    assert not modules - named, f"modules missing from the README layout: {sorted(modules - named)}"
