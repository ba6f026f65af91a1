"""The units of work of ``lightning-ssr bench``, and its worker processes (``--workers N``).

:func:`warm_up` and :func:`search_method` serve the run in one process and the workers alike; a
worker runs one (scenario, method) job at a time (:func:`method_job`).

Each worker builds the benchmarks from the options (the same seed, so the same data as every other
process), makes one untimed pass of each runner, and then runs a method's hyperparameter search
and its seeds as one job. Runs are seeded by their own seed, so a job's figures do not depend on
which worker ran it or when.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch

from lightning_ssr.bench.methods import METHODS, Method
from lightning_ssr.bench.options import BenchOptions
from lightning_ssr.bench.runner import run_method, validation_benchmark
from lightning_ssr.bench.settings import RunSettings, settings_of
from lightning_ssr.continual import StreamResult
from lightning_ssr.data import ContinualBenchmark, make_benchmark

__all__ = ["benchmark_of", "denormals_flushed", "flush_denormals", "init_worker", "method_job", "search_method",
           "settings_of", "warm_up"]

_STATE: dict[str, Any] = {}


def benchmark_of(opts: BenchOptions, scenario: str) -> ContinualBenchmark:
    """The scenario's benchmark (seed 0: every process builds the same one)."""
    return make_benchmark(opts.dataset, opts.protocol, scenario, opts.n_tasks, seed=0, data_dir=opts.data_dir,
                          train_subset=opts.train_subset, test_subset=opts.test_subset, pad=opts.pad,
                          download=opts.download)


def warm_up(bench: ContinualBenchmark, settings: RunSettings, tick: Optional[Callable[[], None]] = None) -> None:
    """One untimed pass of each runner, so that no method pays the first-call start-up costs (20
    iterations a task are enough for that: every Trainer, loader and evaluation is built as in a run)."""
    settings = dataclasses.replace(settings, iterations=min(settings.iterations or 20, 20))
    for name in ("naive", "naive-lightning"):
        run_method(METHODS[name], {}, bench, settings, seed=0, tick=tick)


def search_method(method: Method, opts: BenchOptions, val: Optional[ContinualBenchmark], s: RunSettings,
                  tick: Optional[Callable[[], None]] = None) -> tuple[dict, list]:
    """The method's chosen hyperparameters and every candidate tried (none is run when there is one)."""
    candidates = method.candidates(opts.search_budget)
    if len(candidates) == 1 or val is None:
        return candidates[0], [{"hyperparameters": candidates[0], "val_accuracy": None}]
    tried = []
    for hp in candidates:
        r = run_method(method, hp, val, s, seed=0, tick=tick)
        tried.append({"hyperparameters": hp, "val_accuracy": r.average_accuracy})
    best = max(tried, key=lambda t: t["val_accuracy"])
    return best["hyperparameters"], tried


def flush_denormals() -> bool:
    """Flush denormal floats to zero on the CPU, for every method alike (``torch.set_flush_denormal``).

    Adam's first moment of a weight whose gradient is exactly zero (the input pixels a permutation
    leaves blank, a dead unit) decays by 0.9 a step into the denormal range, where each operation
    on it is far slower: plain training of Permuted digits slowed from 0.9 to 2.5 s a task over the
    stream while its accuracy was that of flushed arithmetic to the digit (43.8 % either way), so the
    time column measured the CPU's denormal penalty rather than the methods. Returns whether the CPU
    supports it (x86 with SSE3, AArch64); a worker process keeps it on, see :func:`denormals_flushed`
    for a block of the caller's process.

    Example:
        >>> with denormals_flushed() as flushed:
        ...     tiny = float(torch.tensor([1e-40]) * 1.0)  # a denormal float32
        >>> tiny == 0.0 or not flushed
        True
    """
    return bool(torch.set_flush_denormal(True))


@contextlib.contextmanager
def denormals_flushed() -> Iterator[bool]:
    """:func:`flush_denormals` for the block, then torch's default again (not flushed: torch cannot
    say what the mode was before)."""
    try:
        yield flush_denormals()
    finally:
        torch.set_flush_denormal(False)


def init_worker(opts: BenchOptions, threads: int) -> None:
    """Set a worker up: quiet logs, its share of the CPU threads, and one untimed pass of each runner."""
    from lightning_ssr.bench.command import quiet_warnings

    quiet_warnings()
    # Importing Lightning switches torch to NVML's CUDA check (PYTORCH_NVML_BASED_CUDA_CHECK=1, which
    # spares a process that forks later), and torch then asks NVML again at every Adam step (~90 us,
    # a few % of a step here). A worker is spawned, never forks and trains on the CPU: the plain check.
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
    torch.set_num_threads(threads)
    flush_denormals()
    _STATE.update(opts=opts, settings=settings_of(opts), benches={}, vals={})
    warm_up(_bench(opts.scenarios[0]), _STATE["settings"])


def _bench(scenario: str) -> ContinualBenchmark:
    if scenario not in _STATE["benches"]:
        _STATE["benches"][scenario] = benchmark_of(_STATE["opts"], scenario)
    return _STATE["benches"][scenario]


def _val(scenario: str) -> ContinualBenchmark:
    if scenario not in _STATE["vals"]:
        _STATE["vals"][scenario] = validation_benchmark(_bench(scenario), _STATE["opts"].val_fraction, seed=0)
    return _STATE["vals"][scenario]


def method_job(scenario: str, name: str) -> tuple[dict, list, list[StreamResult]]:
    """One method in one scenario: its search on the validation split, then every seed on the test stream."""
    opts: BenchOptions = _STATE["opts"]
    method = METHODS[name]
    val: Optional[ContinualBenchmark] = _val(scenario) if len(method.candidates(opts.search_budget)) > 1 else None
    chosen, search = search_method(method, opts, val, _STATE["settings"])
    runs = [run_method(method, chosen, _bench(scenario), _STATE["settings"], seed) for seed in range(opts.seeds)]
    return chosen, search, runs
