#!/usr/bin/env python
"""How fast ``lightning-ssr`` answers ``--help`` and an argument error, in fresh processes.

Each command runs ``--repeats`` times as ``python -m lightning_ssr.cli ...`` (a new interpreter
each time, as a user's shell would start it); the median and the slowest wall time are printed
beside the target (1 s), with the time of ``python -c "import torch"`` for scale.

Usage::

    python benchmarks/cli_startup.py
    python benchmarks/cli_startup.py --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

TARGET_S = 1.0
COMMANDS = {
    "bench --help": ["-m", "lightning_ssr.cli", "bench", "--help"],
    "bench --methods nope": ["-m", "lightning_ssr.cli", "bench", "--methods", "nope"],
    "bench --seeds 0": ["-m", "lightning_ssr.cli", "bench", "--seeds", "0"],
    "(scale) import torch": ["-c", "import torch"],
}


def _time(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], capture_output=True, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (median and max printed)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    print(f"{'command':<24} {'median s':>9} {'max s':>7}  target")
    for name, argv in COMMANDS.items():
        times = [_time(argv) for _ in range(args.repeats)]
        verdict = "" if name.startswith("(scale)") else ("met" if max(times) < TARGET_S else "NOT met") + f" (< {TARGET_S} s)"
        print(f"{name:<24} {statistics.median(times):>9.3f} {max(times):>7.3f}  {verdict}")


if __name__ == "__main__":
    main()
