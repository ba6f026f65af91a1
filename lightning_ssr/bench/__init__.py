"""The benchmark behind ``lightning-ssr bench``: SSR against Avalanche's baselines."""

from lightning_ssr.bench.command import BenchOptions, run_bench
from lightning_ssr.bench.methods import METHODS, Method, resolve_methods
from lightning_ssr.bench.runner import RunSettings, run_method

__all__ = ["METHODS", "BenchOptions", "Method", "RunSettings", "resolve_methods", "run_bench", "run_method"]
