"""The ``lightning-ssr`` command line.

Arguments are parsed and checked before torch, Lightning or Avalanche is imported, so ``--help``
and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import Optional

__all__ = ["MAX_AUTO_WORKERS", "auto_workers", "build_parser", "main"]

#: ``--workers auto`` starts one process per CPU core, at most this many (each holds its own torch).
MAX_AUTO_WORKERS = 8


def auto_workers() -> int:
    """``--workers auto``: one worker process per CPU core available to this process, at most
    :data:`MAX_AUTO_WORKERS` (1 on a single core: the bench then runs in this process).

    Example:
        >>> 1 <= auto_workers() <= MAX_AUTO_WORKERS
        True
    """
    from lightning_ssr.bench.options import available_cores

    return max(1, min(available_cores(), MAX_AUTO_WORKERS))


def _workers(text: str) -> int:
    """``--workers``: ``auto`` or a whole number (checked by ``BenchOptions``)."""
    if text == "auto":
        return auto_workers()
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an int >= 1, got {text!r}") from None


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's default appended once, unless its help already states it (or there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-ssr`` (imports nothing heavy).

    Example:
        >>> build_parser().parse_args(["bench", "--seeds", "1"]).seeds
        1
    """
    from lightning_ssr.bench.methods import DEFAULT_METHODS, METHODS
    from lightning_ssr.bench.presets import PRESETS
    from lightning_ssr.bench.options import CNN_CHANNELS, MODELS
    from lightning_ssr.data.names import DATASETS, PROTOCOLS, SCENARIOS

    parser = argparse.ArgumentParser(prog="lightning-ssr", description="Synaptic Scaling Regularization tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "bench",
        help="SSR against Avalanche's EWC, Online EWC, SI, MAS, LwF, replay and PNN",
        description=(
            "Run SSR (the Lightning callback and the Avalanche plugin) and Avalanche's baselines on the same "
            "benchmark, network, optimizer and budget; print a table per scenario (mean ± std over seeds) and "
            "write results.json, results.csv and PNG plots. With no option it runs Split digits (embedded, "
            "no download) in the task, domain and class scenarios."
        ),
        formatter_class=_HelpFormatter,
    )
    b.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="a published protocol (data, network, optimizer, batch, iterations); options given beside it "
                        "override its values: " + "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()))
    b.add_argument("--dataset", default=None, choices=DATASETS,
                   help="digits: scikit-learn's 8x8 digits (embedded, the default); fmnist / mnist: the four IDX files "
                        "in --data-dir")
    b.add_argument("--data-dir", default=None,
                   help="directory of the four IDX files, or a torchvision root holding MNIST/raw or FashionMNIST/raw "
                        "(default for fmnist: /usr/share/datasets/fashion-mnist, as the Debian package "
                        "dataset-fashion-mnist installs it; for mnist: the cache, where tools/get-mnist puts it)")
    b.add_argument("--download", action="store_true",
                   help="download fmnist / mnist with torchvision into the cache when the files are missing (needs a "
                        "network; tools/get-mnist gets MNIST from the Python package index instead)")
    b.add_argument("--scenario", default=",".join(SCENARIOS),
                   help=f"comma-separated scenarios from {list(SCENARIOS)}: task (a head per task), domain (one "
                        "shared head, no task label) or class (one head over every class seen)")
    b.add_argument("--protocol", default=None, choices=PROTOCOLS,
                   help="how the data becomes tasks: split (disjoint pairs of classes per task, the default) or permuted "
                        "(all classes, a fixed random pixel permutation per task)")
    b.add_argument("--tasks", type=int, default=None, help="number of tasks (default: 5 for split, 10 for permuted)")
    b.add_argument("--methods", default=None,
                   help=f"comma-separated from {list(METHODS)}, or 'all', or 'ablations' (SSR with each part off) "
                        f"(default: {','.join(DEFAULT_METHODS)}; with a preset also joint, the upper bound)")
    b.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1); tables show mean ± std")
    b.add_argument("--epochs", type=int, default=None, help="epochs per task (default: 5)")
    b.add_argument("--iterations", type=int, default=None,
                   help="mini-batches per task for every method, instead of epochs (the presets' budget)")
    b.add_argument("--batch-size", type=int, default=None, help="mini-batch size of every method (default: 32)")
    b.add_argument("--lr", type=float, default=None, help="Adam learning rate of every method (default: 0.001)")
    b.add_argument("--pad", type=int, default=None,
                   help="zero pixels added on each side of the images (vdv2019-permuted: 2, 28x28 -> 32x32; default: 0)")
    b.add_argument("--partial-batches-all", action="store_true",
                   help="give every method without SSR the partial-batch scaling SSR does by default (a smaller last batch counts by "
                        "its samples: PartialBatchPlugin in Avalanche's strategies, PartialBatchScaling beside plain "
                        "Lightning training), so the comparison holds without that difference")
    b.add_argument("--hidden", type=int, default=None,
                   help="units per hidden layer of the 2-layer MLP, or of the CNN's fully connected layer (default: 400 for split, 1000 for permuted)")
    b.add_argument("--model", default=None, choices=MODELS,
                   help="the network every method trains: mlp (van de Ven & Tolias's 2-layer MLP, the default) or cnn "
                        f"(two 3x3 convolutions of {CNN_CHANNELS[0]} and {CNN_CHANNELS[1]} channels with 2x2 max-pooling, then one layer of --hidden "
                        "units; square one-channel images)")
    b.add_argument("--train-subset", type=int, default=None, help="training samples per task (default: all)")
    b.add_argument("--test-subset", type=int, default=None, help="test samples per task (default: all)")
    b.add_argument("--search-budget", type=int, default=3,
                   help="hyperparameter candidates tried per method on a validation split held out from the "
                        "training data (1: each method's defaults only)")
    b.add_argument("--workers", type=_workers, default="auto",
                   help="processes that run the methods side by side, one (scenario, method) job each, one torch thread "
                        "each; every run is seeded by its own seed, so the accuracy figures are the same as with 1, and "
                        "the time column compares CPU time, which other processes do not inflate (default: auto, one "
                        f"per CPU core, at most {MAX_AUTO_WORKERS}; --wandb always runs in this process)")
    b.add_argument("--out", default="bench_results", help="output directory")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    b.add_argument("--no-progress", action="store_true",
                   help="no progress report (a bar on a terminal, plain lines otherwise)")
    b.add_argument("--wandb", action="store_true",
                   help="log every stream to Weights & Biases, one run per (scenario, method, seed), under OUT/wandb "
                        "(set WANDB_MODE=offline to keep the runs on disk; upload them later with wandb sync)")
    b.add_argument("--wandb-project", default="lightning-ssr", help="the W&B project of --wandb")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``lightning-ssr`` console script."""
    from lightning_ssr.bench.options import BenchOptions

    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # every option is checked here, before anything heavy is imported
        given = {"dataset": args.dataset, "protocol": args.protocol, "n_tasks": args.tasks, "epochs": args.epochs,
                 "iterations": args.iterations, "batch_size": args.batch_size, "lr": args.lr, "hidden": args.hidden,
                 "pad": args.pad, "model": args.model}
        given = {k: v for k, v in given.items() if v is not None}  # what the preset (or the defaults) leaves
        if args.methods is not None:
            given["methods"] = args.methods
        common = dict(
            scenarios=args.scenario, seeds=args.seeds, data_dir=args.data_dir, train_subset=args.train_subset,
            test_subset=args.test_subset, search_budget=args.search_budget, out=args.out, plots=not args.no_plots,
            progress=not args.no_progress, wandb=args.wandb, wandb_project=args.wandb_project, workers=args.workers,
            download=args.download, partial_batches_all=args.partial_batches_all,
        )
        opts = (BenchOptions.from_preset(args.preset, **given, **common) if args.preset
                else BenchOptions(**given, **common))
    except (ValueError, TypeError) as err:
        parser.error(f"bench: {err}")
    from lightning_ssr.bench.command import run_bench
    from lightning_ssr.data.idx import DatasetNotFoundError

    try:
        command = shlex.join(["lightning-ssr", *(sys.argv[1:] if argv is None else argv)])
        run_bench(opts, command=command)  # with --wandb: one W&B run per stream (lightning_ssr.loggers.wandb_logger_factory)
    except (ValueError, TypeError, ImportError, DatasetNotFoundError) as err:
        parser.error(f"bench: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
