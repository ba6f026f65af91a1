"""Wall time of the Lightning stream runner as a ratio to Avalanche's ``Naive`` strategy.

Same benchmark (Split, domain-incremental by default), same model (an MLP), optimizer (Adam, its
state carried across experiences as Avalanche does: ``optimizer_state="carry"``), epochs, batch
sizes and evaluation (accuracy on every test experience after every training experience, i.e. the
full accuracy matrix) on both sides, no logger on either side; repeats are interleaved (the order
alternates) in one run, and each ratio is taken within a repeat; the median ratio is the figure. Split digits always; Split
Fashion-MNIST when ``/usr/share/datasets/fashion-mnist`` exists (or ``--fmnist-dir``).

    python benchmarks/stream_vs_avalanche.py                 # digits (+ Fashion-MNIST if installed)
    python benchmarks/stream_vs_avalanche.py --repeats 5 --datasets digits

Goal: a ratio of at most 1.2.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_ssr.continual import ClassifierModule, fit_stream  # noqa: E402
from lightning_ssr.data import make_benchmark  # noqa: E402

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


def mlp(n_in: int, hidden: int, n_out: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_out))


def run_lightning(bench, args, seed: int) -> tuple[float, list[list[float]]]:
    torch.manual_seed(seed)
    module = ClassifierModule(mlp(bench.input_size, args.hidden, bench.n_classes), lr=args.lr)
    t0 = time.perf_counter()
    result = fit_stream(module, bench, epochs=args.epochs, batch_size=args.batch_size,
                        eval_batch_size=args.eval_batch_size, seed=seed, trainer_kwargs={"accelerator": "cpu"})
    return time.perf_counter() - t0, result.accuracy


def run_avalanche(bench, args, seed: int) -> tuple[float, list[list[float]]]:
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    torch.manual_seed(seed)
    model = mlp(bench.input_size, args.hidden, bench.n_classes)
    t0 = time.perf_counter()
    strategy = Naive(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=args.lr), criterion=nn.CrossEntropyLoss(),
        train_mb_size=args.batch_size, train_epochs=args.epochs, eval_mb_size=args.eval_batch_size,
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[]), device="cpu",
    )
    n = len(bench.test_stream)
    matrix = []
    for exp in bench.train_stream:
        strategy.train(exp, num_workers=0)
        res = strategy.eval(bench.test_stream, num_workers=0)
        matrix.append([res[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"] for j in range(n)])
    return time.perf_counter() - t0, matrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["digits", "fmnist"], choices=["digits", "fmnist"])
    parser.add_argument("--scenario", default="domain", choices=["task", "domain", "class"])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (Fashion-MNIST)")
    parser.add_argument("--digits-repeats", type=int, default=15, help="interleaved repeats (digits: cheap, noisy)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 keeps timings steady)")
    parser.add_argument("--fmnist-dir", default=FMNIST_DIR)
    parser.add_argument("--fmnist-train-subset", type=int, default=None,
                        help="training samples per experience for Fashion-MNIST (default: all, 12,000)")
    args = parser.parse_args()
    if args.scenario == "task":
        parser.error("--scenario task needs a multi-head model; this benchmark times a single-head MLP")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    print(f"torch {torch.__version__}, {args.threads} thread(s); MLP 2x{args.hidden}, Adam lr={args.lr}, "
          f"{args.epochs} epoch(s), batch {args.batch_size}, eval batch {args.eval_batch_size}, "
          f"scenario {args.scenario}; Adam's state carried across experiences on both sides")
    for name in args.datasets:
        if name == "fmnist" and not os.path.isdir(args.fmnist_dir):
            print(f"\n{name}: skipped ({args.fmnist_dir} not found; apt-get install dataset-fashion-mnist)")
            continue
        kwargs = {"data_dir": args.fmnist_dir, "train_subset": args.fmnist_train_subset} if name == "fmnist" else {}
        bench = make_benchmark(name, "split", args.scenario, **kwargs)
        sizes = [len(e.dataset) for e in bench.train_stream]
        print(f"\nSplit {name} ({args.scenario}): {len(sizes)} experiences of {sizes} training samples")
        run_lightning(bench, args, 0)  # warm-up (imports, first-call costs), untimed
        run_avalanche(bench, args, 0)
        ours, theirs, ratios = [], [], []
        for rep in range(args.digits_repeats if name == "digits" else args.repeats):
            order = (run_lightning, run_avalanche) if rep % 2 == 0 else (run_avalanche, run_lightning)
            times = {}
            for fn in order:
                times[fn.__name__], matrix = fn(bench, args, rep)
                acc = sum(matrix[-1]) / len(matrix[-1])
                times[fn.__name__ + "_acc"] = acc
            ours.append(times["run_lightning"])
            theirs.append(times["run_avalanche"])
            ratios.append(ours[-1] / theirs[-1])
            print(f"  repeat {rep}: lightning {ours[-1]:.3f} s (avg acc {times['run_lightning_acc']:.3f}), "
                  f"avalanche Naive {theirs[-1]:.3f} s (avg acc {times['run_avalanche_acc']:.3f}), "
                  f"ratio {ratios[-1]:.3f}")
        print(f"  {name}: median lightning {statistics.median(ours):.3f} s, "
              f"median avalanche {statistics.median(theirs):.3f} s, "
              f"median ratio {statistics.median(ratios):.3f} (goal <= 1.2)")


if __name__ == "__main__":
    main()
