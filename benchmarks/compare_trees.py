"""Run one benchmark script against two source trees in one run: a baseline revision and the working tree.

    python benchmarks/compare_trees.py --baseline REV [--rounds 2] -- block_cpu_time.py --part encoder

The script comes from this tree's benchmarks/ and must take ``--out JSON`` and write a ``rows`` list; the
baseline's ``src/`` (``git archive REV src``) or this tree's ``src/`` comes first on PYTHONPATH. Rounds
alternate the order of the trees, so a load change during the run hits both; each number in the table is
the minimum over the rounds, and ``ratio`` is this tree's over the baseline's. A script can measure a tree
only through names that tree has (``block_cpu_time.py`` needs ``seglstm.create_encoder``/``create_model``
and ``seglstm.study.measure.machine_info``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _export(rev: str, dest: Path) -> Path:
    """``src/`` of ``rev`` unpacked under ``dest``."""
    archive = dest / "src.tar"
    with archive.open("wb") as fh:
        subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], stdout=fh, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest / "src"


def _run(script: list[str], src: Path, out: Path) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(HERE / script[0]), *script[1:], "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, cwd=REPO)
    return json.loads(out.read_text())["rows"]


def merge(runs: dict[str, list[list[dict[str, Any]]]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of both trees side by side: the text and integer fields identify a row, every float field gets
    its minimum over the rounds per tree and the ratio current / baseline."""
    first = runs["baseline"][0]
    keys = [k for k, v in first[0].items() if not isinstance(v, float)]
    metrics = [k for k, v in first[0].items() if isinstance(v, float)]
    table = []
    for i, row in enumerate(first):
        merged = {k: row[k] for k in keys}
        for rounds in runs.values():
            if any(other[i][k] != row[k] for other in rounds for k in keys):
                raise ValueError(f"row {i} differs between the trees or rounds: {row}")
        for m in metrics:
            best = {tree: min(other[i][m] for other in rounds) for tree, rounds in runs.items()}
            merged[f"{m} baseline"], merged[f"{m} current"] = best["baseline"], best["current"]
            merged[f"{m} ratio"] = best["current"] / best["baseline"]
        table.append(merged)
    return table, [*keys, *[f"{m} {c}" for m in metrics for c in ("baseline", "current", "ratio")]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/compare_trees.json)")
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- SCRIPT.py [its arguments]")
    args = parser.parse_args(argv)
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script or not (HERE / script[0]).is_file():
        parser.error(f"name a script in {HERE} after --, got {script}")
    if "--out" in script:
        parser.error("--out of the script is set by compare_trees.py")
    runs: dict[str, list[list[dict[str, Any]]]] = {"baseline": [], "current": []}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"baseline": _export(args.baseline, Path(tmp)), "current": REPO / "src"}
        for r in range(args.rounds):
            for tree in (("baseline", "current") if r % 2 == 0 else ("current", "baseline")):
                print(f"round {r + 1}/{args.rounds}: {tree} ({trees[tree]})", flush=True)
                runs[tree].append(_run(script, trees[tree], Path(tmp) / f"{tree}{r}.json"))
    table, columns = merge(runs)
    print(f"\n{' '.join(script)}: baseline {args.baseline} vs the working tree, minimum of {args.rounds} rounds")
    print_table(table, columns)
    out = args.out or HERE / "results" / "compare_trees.json"
    write_json(out, {"baseline": args.baseline, "script": script, "rounds": args.rounds, "rows": table, "raw": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
