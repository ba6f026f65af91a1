"""Anchoring's pull against the learning rate, on validation data only (how ``anchor_lr`` was chosen).

At the learning rate 0.0001 of van de Ven & Tolias's Permuted MNIST, a fixed pull of
``anchor_rate=0.1`` of the distance to the anchor every step leaves protected synapses almost no
room: SSR falls far below plain training. This script scores plain training, SSR with fixed pulls
(``anchor_lr=None``, one row per ``--rates`` value) and SSR with the pull scaled by the learning
rate (``anchor_rate=0.1, anchor_lr=--anchor-lr``: ``0.1 * min(lr / anchor_lr, 1)`` per step, the
library's default since it was chosen with this script) at each
learning rate of ``--lrs``, on the validation split of the training data
(``validation_benchmark``; the test set is never used).

Usage::

    python benchmarks/anchor_rate_vs_lr.py             # Permuted MNIST, 10 tasks, lr 1e-4 (about 8 minutes)
    python benchmarks/anchor_rate_vs_lr.py --dataset digits --protocol split --scenario domain class \\
        --lrs 3e-4 1e-3 3e-3 --epochs 5 --batch-size 32 --hidden 400 --seeds 3 --rates 0.1
    python benchmarks/anchor_rate_vs_lr.py --rates 0.1 0.01 --seeds 1 --iterations 5 --tasks 2
"""

from __future__ import annotations

import argparse
import statistics

from lightning_ssr.bench.command import quiet_warnings
from lightning_ssr.bench.methods import METHODS
from lightning_ssr.bench.runner import RunSettings, run_method, validation_benchmark
from lightning_ssr.core.anchoring import lr_factor
from lightning_ssr.data import make_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--protocol", default="permuted")
    parser.add_argument("--scenario", nargs="+", default=["domain"])
    parser.add_argument("--tasks", type=int, default=None, help="default: 10 for permuted, 5 for split")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4], help="Adam learning rates")
    parser.add_argument("--rates", type=float, nargs="*", default=[0.1, 0.03, 0.01],
                        help="fixed anchor_rate values (anchor_lr=None)")
    parser.add_argument("--anchor-lr", type=float, default=1e-3, help="the scaled row: anchor_rate 0.1 at this lr")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=None, help="mini-batches per task (default: 100 "
                        "without --epochs)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=1000)
    parser.add_argument("--pad", type=int, default=None, help="default: 2 for MNIST (32x32), else 0")
    parser.add_argument("--train-subset", type=int, default=None, help="default: 10000 for MNIST")
    parser.add_argument("--test-subset", type=int, default=None, help="default: 1000 for MNIST")
    args = parser.parse_args()
    quiet_warnings()
    mnist = args.dataset == "mnist"
    iterations = args.iterations if args.iterations is not None or args.epochs is not None else 100
    configs = [("naive-lightning", {})] + [("ssr", {"anchor_rate": r, "anchor_lr": None}) for r in args.rates]
    configs.append(("ssr", {"anchor_rate": 0.1, "anchor_lr": args.anchor_lr}))
    for scenario in args.scenario:
        bench = make_benchmark(args.dataset, args.protocol, scenario, n_tasks=args.tasks,
                               pad=args.pad if args.pad is not None else (2 if mnist else 0),
                               train_subset=args.train_subset or (10000 if mnist else None),
                               test_subset=args.test_subset or (1000 if mnist else None))
        val = validation_benchmark(bench, 0.2, seed=0)
        for lr in args.lrs:
            settings = RunSettings(hidden=args.hidden, lr=lr, batch_size=args.batch_size, iterations=iterations,
                                   epochs=args.epochs or 1)
            budget = f"{iterations} iterations/task" if iterations is not None else f"{args.epochs} epochs/task"
            print(f"\n{args.dataset} {args.protocol} ({bench.n_tasks} tasks), {scenario}, validation split; Adam lr "
                  f"{lr:g}, {budget}, batch {args.batch_size}, {args.seeds} seeds: average accuracy % (plasticity %)")
            for name, hp in configs:
                runs = [run_method(METHODS[name], hp, val, settings, seed) for seed in range(args.seeds)]
                acc = statistics.fmean(100 * r.average_accuracy for r in runs)
                plasticity = statistics.fmean(100 * r.plasticity for r in runs)
                if not hp:
                    label = name
                elif hp["anchor_lr"] is None:
                    label = f"ssr anchor_rate={hp['anchor_rate']:g}"
                else:
                    label = f"ssr anchor_lr={hp['anchor_lr']:g} (pull {hp['anchor_rate'] * lr_factor(lr, hp['anchor_lr']):.3g})"
                print(f"{label:<36} {acc:5.1f} ({plasticity:.1f})", flush=True)


if __name__ == "__main__":
    main()
