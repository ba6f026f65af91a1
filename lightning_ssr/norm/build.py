"""Build SSRNorm's native CPU kernel ahead of its first use: ``python -m lightning_ssr.norm.build``.

Prints the path of the build (compiling it first unless it is cached, about 30 s) and exits 0, or
says why it cannot be built and exits 1; ``--force`` compiles again. ``make setup`` runs it.
"""

from __future__ import annotations

import argparse
import sys

from lightning_ssr.norm.native import KernelUnavailableError, build_kernel

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Build the kernel; the exit status (0 built or cached, 1 not available)."""
    parser = argparse.ArgumentParser(prog="python -m lightning_ssr.norm.build", description=__doc__)
    parser.add_argument("--force", action="store_true", help="compile again even if a build is cached")
    args = parser.parse_args(argv)
    try:
        print(build_kernel(force=args.force))
    except KernelUnavailableError as err:
        print(f"SSRNorm's native kernel is not available: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
