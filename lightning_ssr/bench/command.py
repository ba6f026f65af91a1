"""``lightning-ssr bench``: SSR against Avalanche's baselines, side by side in one run."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from lightning_ssr.bench.methods import Method, resolve_methods
from lightning_ssr.bench.options import BenchOptions, available_cores

if TYPE_CHECKING:  # torch, Lightning and Avalanche load inside run_bench, after the workers have started
    from lightning_ssr.bench.runner import RunSettings
    from lightning_ssr.continual import StreamResult
    from lightning_ssr.data import ContinualBenchmark

__all__ = ["BenchOptions", "quiet_warnings", "run_bench"]

#: A factory of one logger per (scenario, method, seed) stream, or ``None`` for none.
LoggerFactory = Callable[[str, Method, int, dict[str, Any]], Any]


def quiet_warnings() -> None:
    """Silence the warnings and start-up logs of torch, Lightning and Avalanche for a benchmark run
    (the bench, its worker processes and the scripts of ``benchmarks/`` call it first)."""
    warnings.filterwarnings("ignore")
    # Avalanche's @deprecated re-inserts a "once" filter on every call; route warnings to a
    # logger instead, which filter edits cannot reach
    logging.captureWarnings(True)
    for name in ("py.warnings", "lightning.pytorch", "lightning.fabric", "lightning", "avalanche"):
        logging.getLogger(name).setLevel(logging.ERROR)


class _PlainProgress:
    """Progress for a log file or pipe: a plain line at each tenth of the work, no carriage returns."""

    def __init__(self, total: int, stream: Any) -> None:
        self.total, self.done, self.stream, self.postfix, self._printed = max(total, 1), 0, stream, "", 0

    def update(self, n: int = 1) -> None:
        self.done += n
        tenth = min(10, self.done * 10 // self.total)
        if tenth > self._printed:
            self._printed = tenth
            print(f"lightning-ssr bench: {self.done}/{self.total} tasks trained ({10 * tenth}%) {self.postfix}",
                  file=self.stream, flush=True)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def clear(self) -> None:
        pass

    refresh = close = clear


def _progress(total: int, enabled: bool) -> Any:
    """A tqdm bar on a terminal, plain lines on anything else (a log file, CI), nothing when disabled."""
    from tqdm.auto import tqdm

    if enabled and not sys.stderr.isatty():
        return _PlainProgress(total, sys.stderr)
    return tqdm(total=total, disable=not enabled, unit="task", desc="lightning-ssr bench", file=sys.stderr,
                dynamic_ncols=True)


def _run_here(opts: BenchOptions, plan: dict[str, list[Method]], benches: dict[str, ContinualBenchmark],
              settings: RunSettings, bar: Any, tick: Callable[[], None], logger_factory: Optional[LoggerFactory],
              finish: Callable[[str, dict, dict, dict], None]) -> None:
    """In this process: per scenario every search, then the seeds with the methods interleaved."""
    from lightning_ssr.bench.runner import run_method, validation_benchmark
    from lightning_ssr.bench.workers import search_method, warm_up

    warm_up(benches[opts.scenarios[0]], settings, tick)
    for scenario, methods in plan.items():
        bench = benches[scenario]
        searching = any(len(m.candidates(opts.search_budget)) > 1 for m in methods)
        val = validation_benchmark(bench, opts.val_fraction, seed=0) if searching else None
        search: dict[str, Any] = {}
        chosen: dict[str, dict] = {}
        for m in methods:
            bar.set_postfix_str(f"{scenario}: search {m.name}")
            chosen[m.name], search[m.name] = search_method(m, opts, val, settings, tick)
        runs: dict[str, list[StreamResult]] = {m.name: [] for m in methods}
        for seed in range(opts.seeds):
            for m in methods:
                bar.set_postfix_str(f"{scenario}: {m.name} seed {seed}")
                meta = {"scenario": scenario, "dataset": opts.dataset, "protocol": opts.protocol, "seed": seed,
                        "method": m.name, "hyperparameters": chosen[m.name], **settings.to_dict()}
                logger = logger_factory(scenario, m, seed, meta) if logger_factory else None
                runs[m.name].append(run_method(m, chosen[m.name], bench, settings, seed, tick=tick, logger=logger))
                if logger is not None and hasattr(logger, "finalize_stream"):
                    logger.finalize_stream(runs[m.name][-1])
        finish(scenario, chosen, search, runs)


def _start_workers(opts: BenchOptions, plan: dict[str, list[Method]], workers: int) -> tuple[Any, dict[Any, tuple]]:
    """Start ``workers`` processes and hand them every (scenario, method) job: the time baselines
    first (so that they run, like every other method, while all workers are busy: a core running
    alone runs faster), then the longest (those with a hyperparameter search), so that no process
    is left with a long job at the end."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = _worker_threads(workers)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                               initargs=(opts, threads, os.getpid()))
    order = sorted(((s, m) for s, methods in plan.items() for m in methods),
                   key=lambda job: (job[1].baseline != job[1].name, -len(job[1].candidates(opts.search_budget))))
    return pool, {pool.submit(_method_job, s, m.name): (s, m) for s, m in order}


def _worker_threads(workers: int) -> int:
    """The torch threads of each of ``workers`` worker processes: their share of the CPU cores."""
    return max(1, available_cores() // workers)


def _check_data(opts: BenchOptions) -> None:
    """Load the dataset once (downloading it with ``opts.download``): a missing file fails here, clearly."""
    from lightning_ssr.data.benchmarks import load_dataset

    load_dataset(opts.dataset, data_dir=opts.data_dir, download=opts.download)


def _init_worker(opts: BenchOptions, threads: int, parent: int) -> None:
    """A worker's start (here, so that the pool starts before this process imports torch)."""
    _exit_with_parent(parent)
    from lightning_ssr.bench.workers import init_worker

    init_worker(opts, threads)


def _exit_with_parent(parent: int, period: float = 1.0) -> threading.Thread:
    """End this process within about ``period`` seconds of process ``parent`` ending.

    A bench worker otherwise outlives a main process that was killed (``SIGTERM`` from ``kill``,
    ``timeout`` or a job scheduler, which ends it before it can stop its pool): it would run its
    current job, minutes on the larger streams, to the end. A daemon thread checks the parent's
    process id once per ``period`` and exits the process (``os._exit``) once it changed.

    Returns:
        The watching thread (started).

    Example:
        A pool's initializer, given the main process's id in ``initargs``::

            ProcessPoolExecutor(2, initializer=_exit_with_parent, initargs=(os.getpid(),))
    """
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(period)
        os._exit(1)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


def _method_job(scenario: str, name: str) -> tuple[dict, list, list[StreamResult]]:
    from lightning_ssr.bench.workers import method_job

    return method_job(scenario, name)


def _collect(opts: BenchOptions, plan: dict[str, list[Method]], jobs: dict[Any, tuple], n_tasks: int, bar: Any,
             finish: Callable[[str, dict, dict, dict], None]) -> None:
    """Gather the workers' jobs; a scenario is reported once all its methods are done, in the scenarios' order."""
    from concurrent.futures import as_completed

    done: dict[tuple[str, str], tuple[dict, list, list[StreamResult]]] = {}
    pending = list(plan)
    for future in as_completed(jobs):
        scenario, method = jobs[future]
        done[(scenario, method.name)] = future.result()
        searched = len(method.candidates(opts.search_budget))
        bar.set_postfix_str(f"{scenario}: {method.name} done")
        bar.update((opts.seeds + (searched if searched > 1 else 0)) * n_tasks)
        while pending and all((pending[0], m.name) in done for m in plan[pending[0]]):
            s = pending.pop(0)
            finish(s, *[{m.name: done[(s, m.name)][i] for m in plan[s]} for i in range(3)])


def run_bench(opts: BenchOptions, logger_factory: Optional[LoggerFactory] = None,
              echo: Callable[[str], None] = print, command: Optional[str] = None) -> dict[str, Any]:
    """Run the benchmark for every scenario of ``opts``; print tables, write results and plots.

    With ``opts.wandb`` and no ``logger_factory``, every (scenario, method, seed) stream is one
    Weights & Biases run in project ``opts.wandb_project``, written under ``opts.out/wandb``
    (see :func:`lightning_ssr.loggers.wandb_logger_factory`; ``WANDB_MODE=offline`` keeps them on disk).

    ``command`` is recorded in ``results.json`` as the command that produced it (default: this
    process's ``sys.argv``).

    Returns:
        Per scenario: ``{"rows": summary rows, "runs": {method: [StreamResult per seed]},
        "search": ..., "files": {...}}``.
    """
    start = time.perf_counter()
    quiet_warnings()
    if logger_factory is None and opts.wandb:
        from lightning_ssr.loggers import wandb_logger_factory

        logger_factory = wandb_logger_factory(opts.wandb_project, opts.out)
    plan = {s: resolve_methods(opts.methods, s, opts.model) for s in opts.scenarios}
    workers = opts.workers if logger_factory is None else 1  # loggers live in this process
    if workers > 1 and opts.download:
        _check_data(opts)  # one download, before any worker reads the files
    with contextlib.ExitStack() as stack:
        pool, jobs = _start_workers(opts, plan, workers) if workers > 1 else (None, {})  # they start meanwhile
        if pool is not None:
            stack.callback(pool.shutdown, cancel_futures=True)
        return _run_plan(opts, plan, workers, pool, jobs, logger_factory, echo, command, start)


def _run_plan(opts: BenchOptions, plan: dict[str, list[Method]], workers: int, pool: Any, jobs: dict[Any, tuple],
              logger_factory: Optional[LoggerFactory], echo: Callable[[str], None],
              command: Optional[str], start: float) -> dict[str, Any]:
    """:func:`run_bench` once the workers (if any) have their jobs: the tables, files and plots."""
    import torch

    from lightning_ssr.bench.report import format_table, plot_results, summarize, write_results
    from lightning_ssr.bench.settings import settings_of
    from lightning_ssr.data.benchmarks import stream_length

    settings = settings_of(opts)
    n_tasks = stream_length(opts.protocol, opts.n_tasks)
    flushes = bool(torch.set_flush_denormal(False))  # whether this CPU can flush denormals (torch's default meanwhile)
    benches: dict[str, ContinualBenchmark] = {}
    if pool is None:
        from lightning_ssr.bench.workers import benchmark_of

        benches = {s: benchmark_of(opts, s) for s in opts.scenarios}
    elif not opts.download:  # the workers build the benchmarks (and import Avalanche); here only a clear
        _check_data(opts)    # error early if the data is missing, with torch alone
    total = 0
    for s, methods in plan.items():
        for m in methods:
            searched = len(m.candidates(opts.search_budget))
            total += (opts.seeds + (searched if searched > 1 else 0)) * n_tasks
    bar = _progress(total + (2 * n_tasks if workers == 1 else 0), opts.progress)  # + the warm-up passes here
    tick = lambda: bar.update(1)  # noqa: E731
    out_root = Path(opts.out)
    report: dict[str, Any] = {}

    def finish(scenario: str, chosen: dict, search: dict, runs: dict) -> None:
        methods = plan[scenario]
        rows = summarize(runs, {m.name: m.baseline for m in methods})
        for row in rows:
            row["hyperparameters"] = chosen[row["method"]]
        preset = f" [preset {opts.preset}]" if opts.preset else ""
        title = (f"{opts.dataset} {opts.protocol} ({n_tasks} tasks), {scenario}-incremental{preset}: "
                 f"{settings.network}, Adam lr {settings.lr:g}, {opts.budget}, batch "
                 f"{settings.batch_size}{f', padded by {opts.pad}' if opts.pad else ''}"
                 f"{', the methods without SSR scale partial batches too' if opts.partial_batches_all else ''}, {opts.seeds} seeds (mean ± std)")
        out_dir = out_root / f"{opts.dataset}-{opts.protocol}{n_tasks}-{scenario}"
        meta = {
            "command": command or " ".join(sys.argv), "options": {k: v for k, v in dataclasses.asdict(opts).items()},
            "scenario": scenario, "n_tasks": n_tasks, "settings": settings.to_dict(),
            "hyperparameters": chosen, "time_baselines": {m.name: m.baseline for m in methods},
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": torch.get_num_threads() if workers == 1 else _worker_threads(workers), "workers": workers,
            "flush_denormal": flushes,  # every method alike (bench.workers.flush_denormals)
        }
        files = write_results(out_dir, meta, rows, runs, search)
        if opts.plots:
            files["plots"] = plot_results(out_dir, runs, title)  # type: ignore[assignment]
        bar.clear()
        echo("\n" + format_table(rows, title))
        echo(f"results: {files['json']}  {files['csv']}" + (f"  plots: {out_dir}/*.png" if opts.plots else ""))
        bar.refresh()
        report[scenario] = {"rows": rows, "runs": runs, "search": search, "files": files, "hyperparameters": chosen}

    if pool is not None:
        _collect(opts, plan, jobs, n_tasks, bar, finish)
    else:
        from lightning_ssr.bench.workers import denormals_flushed

        with denormals_flushed():  # as in every worker process
            _run_here(opts, plan, benches, settings, bar, tick, logger_factory, finish)
    bar.close()
    echo(f"\nwall time {time.perf_counter() - start:.1f} s; time ratios compare each method with the naive run of "
         "its own runner (Avalanche or Lightning) in this run")
    return report
