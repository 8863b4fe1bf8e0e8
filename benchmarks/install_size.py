"""Install footprint of seglstm: the distributions ``pip install seglstm`` pulls in (mandatory dependencies and
everything they need, recursively) and their size on disk, for the working tree's pyproject.toml against a
baseline revision's, and what each extra adds on top.

The closure is resolved from the metadata of the distributions installed in the running environment (the
locked versions of constraints.txt in CI's venv), and a distribution's size is the sum of the files its RECORD
lists (what ``pip install`` wrote, byte-compiled files included):

    python benchmarks/install_size.py [--baseline REV]      # REV: a git revision, default HEAD
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser as the tomli package
    import tomli as tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PLATFORM_EXTRAS = ("mamba-cuda",)  # not part of `all`: builds only against a CUDA toolkit


def pyproject_requirements(text: str, extras: tuple[str, ...] = ()) -> list[Requirement]:
    """The requirements ``pip install 'seglstm[extras]'`` asks for, ``seglstm[...]`` self-references expanded."""
    project = tomllib.loads(text)["project"]
    optional = project.get("optional-dependencies", {})
    reqs, todo, seen = [Requirement(r) for r in project["dependencies"]], list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise KeyError(f"pyproject.toml has no extra {extra!r} (it has {', '.join(optional)})")
        seen.add(extra)
        for line in optional[extra]:
            req = Requirement(line)
            if canonicalize_name(req.name) == "seglstm":
                todo.extend(req.extras)
            else:
                reqs.append(req)
    return reqs


def closure(reqs: list[Requirement]) -> dict[str, metadata.Distribution]:
    """Every installed distribution that ``reqs`` need, recursively (markers evaluated for this interpreter,
    requested extras followed). A requirement that is missing or out of range here is an error: the answer
    would be about another environment."""
    found: dict[str, metadata.Distribution] = {}
    extras_done: dict[str, set[str]] = {}
    todo = [(req, "") for req in reqs]
    while todo:
        req, for_extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": for_extra}):
            continue
        name = canonicalize_name(req.name)
        if name not in found:
            try:
                dist = metadata.distribution(req.name)
            except metadata.PackageNotFoundError as err:
                raise RuntimeError(f"{req} is needed but not installed in {sys.prefix}") from err
            if dist.version not in req.specifier:
                raise RuntimeError(f"{req} is needed but {req.name} {dist.version} is installed")
            found[name] = dist
            extras_done[name] = set()
        new = {""} | set(req.extras)
        new -= extras_done[name]
        extras_done[name] |= new
        for sub in found[name].requires or []:
            todo.extend((Requirement(sub), extra) for extra in new)
    return found


def dist_bytes(dist: metadata.Distribution) -> int:
    """Bytes of the files ``dist`` installed (its RECORD), byte-compiled files included."""
    total = 0
    for file in dist.files or []:
        path = Path(dist.locate_file(file))
        if path.is_file():
            total += path.stat().st_size
    return total


def footprint(text: str, extras: tuple[str, ...] = ()) -> dict:
    """Distributions, their versions and bytes; ``beside_torch_*``: what an environment that already has torch
    and torchvision (and what they need) would add."""
    dists = closure(pyproject_requirements(text, extras))
    sizes = {name: dist_bytes(d) for name, d in sorted(dists.items())}
    torch_stack = closure([Requirement("torch"), Requirement("torchvision")])
    beside = {n: b for n, b in sizes.items() if n not in torch_stack}
    return {"distributions": {n: {"version": dists[n].version, "bytes": b} for n, b in sizes.items()},
            "count": len(sizes), "bytes": sum(sizes.values()),
            "beside_torch_count": len(beside), "beside_torch_bytes": sum(beside.values())}


def main(argv: list[str] | None = None) -> int:
    from _common import print_table, write_json

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="HEAD", help="git revision whose pyproject.toml is the baseline")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "install_size.json"))
    args = p.parse_args(argv)
    old = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.baseline}:pyproject.toml"], check=True,
                         capture_output=True, text=True).stdout
    new = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    rows = {f"mandatory at {args.baseline}": footprint(old), "mandatory (working tree)": footprint(new)}
    base = rows["mandatory (working tree)"]
    optional = tomllib.loads(new)["project"].get("optional-dependencies", {})
    for extra in optional:
        if extra in PLATFORM_EXTRAS:
            continue
        rows[f"+ [{extra}]"] = footprint(new, (extra,))
    print(f"Python {sys.version.split()[0]} on {sys.platform}; sizes of the installed files (RECORD)\n")
    table = [{"install": label, "dists": row["count"], "MiB": round(row["bytes"] / 2**20, 1),
              "dists beside torch": row["beside_torch_count"],
              "MiB beside torch": round(row["beside_torch_bytes"] / 2**20, 1),
              "adds MiB": round((row["bytes"] - base["bytes"]) / 2**20, 1) if label.startswith("+") else None}
             for label, row in rows.items()]
    print_table(table, ["install", "dists", "MiB", "dists beside torch", "MiB beside torch", "adds MiB"])
    for label, row in rows.items():  # in the JSON an extra lists the distributions it adds
        if label.startswith("+"):
            row["distributions"] = sorted(set(row.pop("distributions")) - set(base["distributions"]))
    removed = sorted(set(rows[f"mandatory at {args.baseline}"]["distributions"]) - set(base["distributions"]))
    added = sorted(set(base["distributions"]) - set(rows[f"mandatory at {args.baseline}"]["distributions"]))
    print(f"\nno longer mandatory: {', '.join(removed) or '-'}\nnewly mandatory: {', '.join(added) or '-'}")
    write_json(args.out, {"baseline": args.baseline, "python": sys.version.split()[0], "rows": rows,
                          "no_longer_mandatory": removed, "newly_mandatory": added})
    return 0


if __name__ == "__main__":
    sys.exit(main())
