"""What the benchmark scripts share beyond the measurements: the printed table and the JSON file (nothing
here imports seglstm at load time, so a script can measure an older source tree: compare_trees.py).

The measurements themselves (``time_call``, ``run_isolated``, ``memory_baseline``/``peak_memory_mib``,
``machine_info``) are ``seglstm.study.measure``, the code ``seglstm compare`` measures with: every
configuration runs in a fresh child process, so peak memory is that child's own and one configuration
cannot inflate the next.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    text = "\n".join(lines)
    print(text)
    sys.stdout.flush()
    return text


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    from seglstm.utils.io import atomic_write_text

    path = Path(path)
    atomic_write_text(path, json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return path

