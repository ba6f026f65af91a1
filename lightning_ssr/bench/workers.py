"""Worker processes of ``lightning-ssr bench --workers N``: one (scenario, method) job at a time.

Each worker builds the benchmarks from the options (the same seed, so the same data as every other
process), makes one untimed pass of each runner, and then runs a method's hyperparameter search
and its seeds as one job. Runs are seeded by their own seed, so a job's figures do not depend on
which worker ran it or when.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from lightning_ssr.bench.methods import METHODS
from lightning_ssr.bench.options import BenchOptions
from lightning_ssr.bench.runner import RunSettings, run_method, validation_benchmark
from lightning_ssr.continual import StreamResult
from lightning_ssr.data import ContinualBenchmark, make_benchmark

__all__ = ["benchmark_of", "init_worker", "method_job", "settings_of"]

_STATE: dict[str, Any] = {}


def settings_of(opts: BenchOptions) -> RunSettings:
    """The budget every method gets alike, from the options."""
    return RunSettings(hidden=opts.hidden_units, lr=opts.lr, epochs=opts.epochs, batch_size=opts.batch_size)


def benchmark_of(opts: BenchOptions, scenario: str) -> ContinualBenchmark:
    """The scenario's benchmark (seed 0: every process builds the same one)."""
    return make_benchmark(opts.dataset, opts.protocol, scenario, opts.n_tasks, seed=0, data_dir=opts.data_dir,
                          train_subset=opts.train_subset, test_subset=opts.test_subset)


def init_worker(opts: BenchOptions, threads: int) -> None:
    """Set a worker up: quiet logs, its share of the CPU threads, and one untimed pass of each runner."""
    from lightning_ssr.bench.command import _quiet

    _quiet()
    torch.set_num_threads(threads)
    _STATE.update(opts=opts, settings=settings_of(opts), benches={}, vals={})
    warm = _bench(opts.scenarios[0])
    for name in ("naive", "naive-lightning"):
        run_method(METHODS[name], {}, warm, _STATE["settings"], seed=0)


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
    from lightning_ssr.bench.command import _search

    opts: BenchOptions = _STATE["opts"]
    method = METHODS[name]
    val: Optional[ContinualBenchmark] = _val(scenario) if len(method.candidates(opts.search_budget)) > 1 else None
    chosen, search = _search(method, opts, val, _STATE["settings"], lambda: None)
    runs = [run_method(method, chosen, _bench(scenario), _STATE["settings"], seed) for seed in range(opts.seeds)]
    return chosen, search, runs
