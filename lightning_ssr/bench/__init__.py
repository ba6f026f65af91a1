"""The benchmark behind ``lightning-ssr bench``: SSR against Avalanche's baselines.

The names below are imported on first use (the command line parses its arguments first).
"""

from typing import TYPE_CHECKING

from lightning_ssr._lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_ssr.bench.command import BenchOptions, run_bench
    from lightning_ssr.bench.methods import METHODS, Method, resolve_methods
    from lightning_ssr.bench.runner import run_method
    from lightning_ssr.bench.settings import RunSettings

__all__ = ["METHODS", "BenchOptions", "Method", "RunSettings", "resolve_methods", "run_bench", "run_method"]

__getattr__, __dir__ = lazy_exports(globals(), {
    "BenchOptions": "lightning_ssr.bench.command",
    "run_bench": "lightning_ssr.bench.command",
    "METHODS": "lightning_ssr.bench.methods",
    "Method": "lightning_ssr.bench.methods",
    "resolve_methods": "lightning_ssr.bench.methods",
    "RunSettings": "lightning_ssr.bench.settings",
    "run_method": "lightning_ssr.bench.runner",
})
