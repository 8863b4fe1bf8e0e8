"""Print the installed versions of the given packages beside the ones constraints.txt locks, and whether the
newest-Lightning test run differs from the locked one at all (it still runs when it does not).

Usage: python .ci/lightning_versions.py constraints.txt lightning pytorch-lightning ...
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import version
from pathlib import Path


def main(constraints: str, packages: list[str]) -> None:
    locked = {}
    for line in Path(constraints).read_text(encoding="utf-8").splitlines():
        found = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line)
        if found:
            locked[found[1].lower().replace("_", "-")] = found[2]
    rows = [(name, locked.get(name.lower(), "-"), version(name)) for name in packages]
    for name, pin, now in rows:
        print(f"  {name:<20} locked {pin:<10} tested {now}")
    if all(pin == now for _, pin, now in rows):
        print("newest Lightning on the index is the locked one: this run repeats the locked tests")
    else:
        print("testing the newest Lightning on the index against the locked one's tests")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
