"""The bench's time column, taken apart: a stream's training CPU time under SSR settings over plain training's.

The bench's time column compares the CPU time a method's stream spends training (``train_cpu_s``
summed over the tasks) with ``naive-lightning``'s. This script trains one bench stream (Split digits,
domain-incremental, the bench's MLP and budget by default; seed 0) with plain training
(``naive-lightning``), with plain training and an empty Lightning callback (what adding any callback
costs the Trainer), and with SSR under each setting of ``--variants``; all of them in one process
with one torch thread and denormals flushed (as the bench's workers), interleaved (the order
alternates between repeats). Per setting it prints the median CPU seconds of a stream's training and
the median of the per-repeat ratios to plain training, with their range.

Usage::

    python benchmarks/stream_overhead.py                          # Split digits, domain-IL
    python benchmarks/stream_overhead.py --scenario task --repeats 9
    python benchmarks/stream_overhead.py --protocol permuted       # Permuted digits (hidden 2x1000)
    python benchmarks/stream_overhead.py --variants '{"every 4th step": {"protect_every": 4}}'

Goal (issue 10): SSR's ratio at most 1.1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_ssr.bench.options import BenchOptions  # noqa: E402  (no torch: --help and argument errors stay fast)
from lightning_ssr.data.names import DATASETS, PROTOCOLS, SCENARIOS  # noqa: E402

#: The settings measured by default: the library's defaults, then parts switched off, down to an SSR
#: whose every part is off (the callback's bookkeeping alone).
DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "SSR, the defaults": {},
    "pull and projection every 4th step (protect_every=4)": {"protect_every": 4},
    "no input-subspace protection (subspace_energy=0)": {"subspace_energy": 0.0},
    "nothing protected (consolidation=0)": {"consolidation": 0.0},
    "nothing protected, no scaling, no subspace": {"consolidation": 0.0, "scaling_rate": 0.0, "subspace_energy": 0.0},
    "every part off (sensing every 1000th step)": {
        "consolidation": 0.0, "scaling_rate": 0.0, "subspace_energy": 0.0, "sense_every": 1000, "update_every": 1000,
        "recycle_below": 0.0, "scale_partial_batches": False, "output_targets": False},
}
PLAIN, EMPTY = "plain training (naive-lightning)", "plain training + an empty callback"


def parse_variants(text: str | None) -> dict[str, dict[str, Any]]:
    """``--variants`` as ``{label: SSRConfig keyword arguments}``, each checked by building its ``SSRConfig``.

    Raises:
        ValueError: not a JSON object of objects, a label of a baseline row, or a setting ``SSRConfig``
            refuses (its own message, after the label).

    Example:
        >>> parse_variants('{"every 4th": {"protect_every": 4}}')
        {'every 4th': {'protect_every': 4}}
        >>> parse_variants('[1]')
        Traceback (most recent call last):
        ...
        ValueError: `--variants` must be a JSON object of {label: {SSRConfig argument: value}}, got '[1]'
    """
    from lightning_ssr import SSRConfig

    if text is None:
        return dict(DEFAULT_VARIANTS)
    try:
        variants = json.loads(text)
    except json.JSONDecodeError:
        variants = None
    if not isinstance(variants, dict) or not variants or not all(isinstance(v, dict) for v in variants.values()):
        raise ValueError(f"`--variants` must be a JSON object of {{label: {{SSRConfig argument: value}}}}, got {text!r}")
    for label, kwargs in variants.items():
        if label in (PLAIN, EMPTY):
            raise ValueError(f"`--variants`: the label {label!r} is taken by a baseline row; name the setting otherwise")
        try:
            SSRConfig(**kwargs)
        except (TypeError, ValueError) as err:  # an unknown argument or a value out of range
            raise ValueError(f"`--variants` {label!r}: {err}") from None
    return variants


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_defaults = BenchOptions()
    parser.add_argument("--dataset", default=bench_defaults.dataset, choices=DATASETS)
    parser.add_argument("--protocol", default=bench_defaults.protocol, choices=PROTOCOLS)
    parser.add_argument("--scenario", default="domain", choices=SCENARIOS)
    parser.add_argument("--tasks", type=int, default=None, help="the stream's tasks (default: the bench's)")
    parser.add_argument("--epochs", type=int, default=bench_defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=bench_defaults.batch_size)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--test-subset", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats (the median is printed)")
    parser.add_argument("--variants", default=None,
                        help="JSON {label: {SSRConfig argument: value}}: the SSR settings to time (default: the "
                             "defaults, then parts switched off)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    try:
        variants = parse_variants(args.variants)
    except ValueError as err:
        parser.error(str(err))

    import torch
    import lightning.pytorch as pl

    from lightning_ssr.bench.command import quiet_warnings
    from lightning_ssr.bench.methods import METHODS
    from lightning_ssr.bench.runner import run_method
    from lightning_ssr.bench.settings import settings_of
    from lightning_ssr.bench.workers import benchmark_of, flush_denormals

    quiet_warnings()
    torch.set_num_threads(1)
    flushed = flush_denormals()
    opts = BenchOptions(dataset=args.dataset, protocol=args.protocol, n_tasks=args.tasks, epochs=args.epochs,
                        batch_size=args.batch_size, train_subset=args.train_subset, test_subset=args.test_subset)
    settings, bench = settings_of(opts), benchmark_of(opts, args.scenario)

    class Empty(pl.Callback):
        """A callback that does nothing: the Trainer's cost of calling one."""

    runs: dict[str, tuple[str, dict[str, Any], bool]] = {PLAIN: ("naive-lightning", {}, False),
                                                         EMPTY: ("naive-lightning", {}, True)}
    runs.update({label: ("ssr", kwargs, False) for label, kwargs in variants.items()})

    def train_cpu(label: str) -> float:
        name, hp, empty = runs[label]
        result = run_method(METHODS[name], hp, bench, settings, seed=0, extra_callbacks=[Empty()] if empty else ())
        return sum(result.train_cpu_s)

    start = time.perf_counter()
    for label in runs:  # one untimed pass each: first-call costs
        train_cpu(label)
    times: dict[str, list[float]] = {label: [] for label in runs}
    for r in range(args.repeats):
        for label in (list(runs) if r % 2 else list(runs)[::-1]):
            times[label].append(train_cpu(label))
    ratios = {label: [t / p for t, p in zip(ts, times[PLAIN])] for label, ts in times.items()}
    print(f"{args.dataset} {args.protocol} {args.scenario}-incremental, {settings.network}, {args.epochs} epochs, batch {args.batch_size}: "
          f"training CPU time of one stream (seed 0), {args.repeats} interleaved repeats, 1 thread, denormals "
          f"{'flushed' if flushed else 'not flushed (unsupported CPU)'}; {time.perf_counter() - start:.0f} s")
    width = max(len(label) for label in runs)
    print(f"{'setting':{width}}    CPU s  ratio to plain, median [range]")
    for label in runs:
        r = ratios[label]
        print(f"{label:{width}}  {statistics.median(times[label]):7.3f}  {statistics.median(r):.3f} [{min(r):.3f}-{max(r):.3f}]")


if __name__ == "__main__":
    main()
