"""Compare two ``lightning-ssr bench`` output folders figure by figure, ignoring times.

The recorded check that a refactoring changed no result: run the same fixed-seed benchmark on
two checkouts and compare. Every number in every ``results.json`` must be equal (NaN equals NaN);
wall, train, CPU and eval times and the command line are skipped.

Usage::

    A="bench --seeds 1 --search-budget 1 --epochs 2 --methods all --no-plots --no-progress"
    (cd OLD && lightning-ssr $A --out /tmp/old)
    lightning-ssr $A --out /tmp/new
    python benchmarks/compare_results.py /tmp/old /tmp/new

Prints the differing entries and exits with 1 if there is any, else prints how many figures were
compared and exits with 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

#: Keys whose values legitimately differ between two runs of the same benchmark: any key naming
#: a time (wall or CPU), and the command line and output folder the run was given.
SKIPPED = {"command", "out"}


def _skipped(key: str) -> bool:
    return key in SKIPPED or "time" in key or key.endswith("cpu_s")


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def compare(a: Any, b: Any, path: str, diffs: list[str]) -> int:
    """Append every difference below ``path`` to ``diffs``; return the number of leaves compared."""
    if isinstance(a, dict) and isinstance(b, dict):
        n = 0
        for key in sorted(set(a) | set(b)):
            if _skipped(key):
                continue
            if key not in a or key not in b:
                diffs.append(f"{path}/{key}: only in {'second' if key not in a else 'first'}")
                continue
            n += compare(a[key], b[key], f"{path}/{key}", diffs)
        return n
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            diffs.append(f"{path}: {len(a)} != {len(b)} entries")
            return 1
        return sum(compare(x, y, f"{path}[{i}]", diffs) for i, (x, y) in enumerate(zip(a, b)))
    if not _equal(a, b):
        diffs.append(f"{path}: {a!r} != {b!r}")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path, help="one bench output folder")
    parser.add_argument("second", type=Path, help="the other")
    args = parser.parse_args(argv)
    files = sorted(p.relative_to(args.first) for p in args.first.rglob("results.json"))
    others = sorted(p.relative_to(args.second) for p in args.second.rglob("results.json"))
    if not files or files != others:
        print(f"results.json files differ: {[str(f) for f in files]} vs {[str(f) for f in others]}")
        return 1
    diffs: list[str] = []
    n = 0
    for rel in files:
        n += compare(json.loads((args.first / rel).read_text()), json.loads((args.second / rel).read_text()),
                     str(rel.parent), diffs)
    for d in diffs:
        print(d)
    print(f"{len(files)} results files, {n} figures compared, {len(diffs)} differ")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
