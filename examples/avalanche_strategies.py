"""SSRPlugin beside Avalanche's EWC, SI, LwF and Replay on Split digits (CPU, offline, < 1 minute).

Every method is an Avalanche plugin in the same ``Naive`` strategy, with the same MLP, optimizer,
mini-batches and epochs; accuracy and forgetting come from Avalanche's evaluation metrics. The
data is scikit-learn's 8x8 digits, split into 5 tasks of 2 classes, in the three scenarios of
van de Ven & Tolias (2019): task-incremental (a head per task), domain-incremental (one 2-way
head) and class-incremental (one 10-way head)::

    python examples/avalanche_strategies.py
    python examples/avalanche_strategies.py --scenarios domain --seeds 5 --epochs 5

Hyperparameters are a rough hand choice on this data (SSR runs with its defaults), not a search:
this shows how to use the plugin next to Avalanche's baselines; it is not the benchmark.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
from avalanche.logging import TextLogger
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from avalanche.training import Naive
from avalanche.training.plugins import (
    EvaluationPlugin,
    EWCPlugin,
    LwFPlugin,
    ReplayPlugin,
    SupervisedPlugin,
    SynapticIntelligencePlugin,
)
from torch import nn

from lightning_ssr.avalanche import SSRPlugin, fix_synaptic_intelligence
from lightning_ssr.data import ContinualBenchmark, make_benchmark


class MLP(nn.Module):
    """Two hidden ReLU layers and one shared head (domain and class scenarios)."""

    def __init__(self, n_in: int, n_out: int, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class MultiHeadMLP(MultiTaskModule):
    """The same body with a head per task, chosen by the task label (task scenario)."""

    def __init__(self, n_in: int, n_out: int, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = MultiHeadClassifier(hidden, n_out)

    def forward(self, x: torch.Tensor, task_labels: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x), task_labels)


def methods(args: argparse.Namespace) -> dict[str, Callable[[], list[SupervisedPlugin]]]:
    """Each method as a factory of fresh plugins."""
    return {
        "Naive": lambda: [],
        "EWC": lambda: [EWCPlugin(ewc_lambda=args.ewc_lambda)],
        "SI": lambda: [SynapticIntelligencePlugin(si_lambda=args.si_lambda)],
        "LwF": lambda: [LwFPlugin(alpha=args.lwf_alpha, temperature=2.0)],
        "Replay": lambda: [ReplayPlugin(mem_size=args.replay_memory)],
        "SSR": lambda: [SSRPlugin(**{k: v for k, v in (("consolidation", args.ssr_consolidation),
                                                       ("protection", args.ssr_protection)) if v is not None})],
    }


def run(bench: ContinualBenchmark, plugins: list[SupervisedPlugin], args: argparse.Namespace,
        seed: int) -> tuple[float, float, float, int]:
    """Train on every experience in turn, testing on the whole test stream after each.

    Returns the final accuracy averaged over experiences (%), Avalanche's stream forgetting (%),
    the training time in seconds (evaluation excluded) and SSR's extra state in bytes.
    """
    torch.manual_seed(seed)
    net = MultiHeadMLP if bench.multi_head else MLP
    model = net(bench.input_size, bench.n_classes, args.hidden)
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True), forgetting_metrics(stream=True),
        loggers=[TextLogger(io.StringIO())],
    )
    strategy = Naive(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=args.lr),
        criterion=nn.CrossEntropyLoss(), train_mb_size=args.batch_size, train_epochs=args.epochs,
        eval_mb_size=512, plugins=plugins, evaluator=evaluator,
    )
    seconds = 0.0
    for exp in bench.train_stream:
        start = time.perf_counter()
        strategy.train(exp, eval_streams=[])
        seconds += time.perf_counter() - start
        results = strategy.eval(bench.test_stream)
    accs = [v for k, v in results.items() if k.startswith("Top1_Acc_Exp/eval_phase/test_stream")]
    forgetting = results.get("StreamForgetting/eval_phase/test_stream", float("nan"))
    extra = sum(p.extra_state_bytes() for p in plugins if isinstance(p, SSRPlugin))
    return 100.0 * sum(accs) / len(accs), 100.0 * forgetting, seconds, extra


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", nargs="+", default=["task", "domain", "class"], choices=["task", "domain", "class"])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ewc-lambda", type=float, default=10_000.0)
    parser.add_argument("--si-lambda", type=float, default=100.0)
    parser.add_argument("--lwf-alpha", type=float, default=1.0)
    parser.add_argument("--replay-memory", type=int, default=100)
    parser.add_argument("--ssr-consolidation", type=float, default=None,
                        help="SSR's protection strength (default: the library's)")
    parser.add_argument("--ssr-protection", default=None, choices=["update", "gradient", "penalty", "anchor"],
                        help="how SSR protects important neurons (default: the library's)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(1)  # a tiny MLP: more threads only add overhead
    if fix_synaptic_intelligence():
        print("note: patched Avalanche's SynapticIntelligencePlugin, a no-op on CPU in avalanche-lib 0.6 "
              "(see lightning_ssr.avalanche.fix_synaptic_intelligence)")

    table: dict[tuple[str, str], tuple[list[float], list[float], list[float], int]] = {}
    start = time.perf_counter()
    for scenario in args.scenarios:
        bench = make_benchmark("digits", "split", scenario)
        run(bench, [], args, seed=0)  # warm-up, so that first-call costs do not land on Naive's time
        for name, make_plugins in methods(args).items():
            accs, forgets, secs, extra = [], [], [], 0
            for seed in range(args.seeds):
                acc, forget, sec, extra = run(bench, make_plugins(), args, seed)
                accs.append(acc)
                forgets.append(forget)
                secs.append(sec)
            table[(scenario, name)] = (accs, forgets, secs, extra)

    def cell(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):5.1f} ± {sd:4.1f}"

    print(f"Split digits, 5 tasks, MLP 2x{args.hidden}, Adam, {args.epochs} epochs per task, {args.seeds} seeds")
    print("accuracy: average over the 5 test experiences after the last task (%, mean ± std over seeds);")
    print("forgetting: Avalanche's StreamForgetting (%); time: training time / Naive's")
    for scenario in args.scenarios:
        naive_time = statistics.mean(table[(scenario, "Naive")][2])
        print(f"\n{scenario}-incremental")
        print(f"| {'method':<8} | {'accuracy':>13} | {'forgetting':>13} | {'time':>5} |")
        print(f"|{'-' * 10}|{'-' * 15}|{'-' * 15}|{'-' * 7}|")
        for name in methods(args):
            accs, forgets, secs, _ = table[(scenario, name)]
            ratio = statistics.mean(secs) / naive_time
            print(f"| {name:<8} | {cell(accs):>13} | {cell(forgets):>13} | {ratio:4.1f}x |")
    ssr_bytes = table[(args.scenarios[0], "SSR")][3]
    print(f"\nSSR's extra state: {ssr_bytes} bytes (per-neuron, O(neurons)); total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
