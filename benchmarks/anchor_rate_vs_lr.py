"""Anchoring's pull against the learning rate, on validation data only (a lead for the mechanism).

At the learning rate 0.0001 of van de Ven & Tolias's Permuted MNIST, SSR's default anchoring
(``anchor_rate=0.1`` of the distance to the anchor every step) leaves protected synapses almost no
room: SSR falls far below plain training. This script scores plain training and SSR at several
``anchor_rate`` values on the validation split of the training data (``validation_benchmark``;
the test set is never used); ``anchor_rate = 0.1 * lr / 0.001`` is the default's pull scaled with
the learning rate.

Usage::

    python benchmarks/anchor_rate_vs_lr.py                      # Permuted MNIST, 10 tasks (about 8 minutes)
    python benchmarks/anchor_rate_vs_lr.py --rates 0.1 0.01 --seeds 1 --iterations 5 --tasks 2
"""

from __future__ import annotations

import argparse
import statistics

from lightning_ssr.bench.command import quiet_warnings
from lightning_ssr.bench.methods import METHODS
from lightning_ssr.bench.runner import RunSettings, run_method, validation_benchmark
from lightning_ssr.data import make_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.03, 0.01], help="anchor_rate values")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=100, help="mini-batches per task")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--test-subset", type=int, default=1000)
    args = parser.parse_args()
    quiet_warnings()
    bench = make_benchmark("mnist", "permuted", "domain", n_tasks=args.tasks, pad=2, train_subset=args.train_subset,
                           test_subset=args.test_subset)
    val = validation_benchmark(bench, 0.2, seed=0)
    settings = RunSettings(hidden=1000, lr=args.lr, batch_size=128, iterations=args.iterations)
    print(f"Permuted MNIST, {args.tasks} tasks, domain, validation split; lr {args.lr:g}, {args.iterations} "
          f"iterations/task, {args.seeds} seeds: average accuracy % (plasticity %)")
    for name, hp in [("naive-lightning", {})] + [("ssr", {"anchor_rate": r}) for r in args.rates]:
        runs = [run_method(METHODS[name], hp, val, settings, seed) for seed in range(args.seeds)]
        acc = statistics.fmean(100 * r.average_accuracy for r in runs)
        plasticity = statistics.fmean(100 * r.plasticity for r in runs)
        label = name if not hp else f"ssr anchor_rate={hp['anchor_rate']:g}"
        print(f"{label:<28} {acc:5.1f} ({plasticity:.1f})", flush=True)


if __name__ == "__main__":
    main()
