"""Split digits through Lightning, with and without Synaptic Scaling Regularization.

scikit-learn's handwritten digits (embedded, no download) in 5 tasks of 2 classes; one fresh
``Trainer`` per task with the same ``SynapticScaling`` callback, so its per-neuron state carries
from task to task. Prints the accuracy matrix and the summary (average accuracy, forgetting,
backward transfer) of each method. The network and budget are the benchmark's on digits
(``lightning-ssr bench``: van de Ven & Tolias's MLP 2x400, 5 epochs a task, batch 32, Adam 1e-3);
under half a minute per scenario on one CPU thread.

    python examples/split_digits_lightning.py                     # domain-incremental (default)
    python examples/split_digits_lightning.py --scenario task     # a head per task, task labels given
    python examples/split_digits_lightning.py --scenario class --optimizer-state reset
    python examples/split_digits_lightning.py --method ssr --json ssr.json --ckpt-dir ckpt/
    python examples/split_digits_lightning.py --scenario task --hidden 100 --epochs 3  # where SSR trails (README)
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_ssr.continual import ClassifierModule, fit_stream  # noqa: E402
from lightning_ssr.data import make_benchmark  # noqa: E402


class MultiHeadMLP(nn.Module):
    """An MLP with one output block per task, picked by each sample's task label: ``model(x, t)``."""

    def __init__(self, n_in: int, hidden: int, n_out: int, n_tasks: int) -> None:
        super().__init__()
        self.n_out, self.n_tasks = n_out, n_tasks
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.heads = nn.Linear(hidden, n_out * n_tasks)

    def forward(self, x: Tensor, task_labels: Tensor) -> Tensor:
        out = self.heads(self.body(x)).view(x.shape[0], self.n_tasks, self.n_out)
        return out[torch.arange(x.shape[0], device=x.device), task_labels]


def make_model(bench, hidden: int) -> nn.Module:
    if bench.multi_head:
        return MultiHeadMLP(bench.input_size, hidden, bench.n_classes, bench.n_tasks)
    return nn.Sequential(nn.Flatten(), nn.Linear(bench.input_size, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, bench.n_classes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="domain", choices=["task", "domain", "class"])
    parser.add_argument("--method", default="both", choices=["both", "ssr", "naive"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizer-state", default="carry", choices=["carry", "reset"],
                        help="carry Adam's state across tasks (as Avalanche does) or start each task fresh")
    parser.add_argument("--json", default=None, help="write the (last) result here as JSON")
    parser.add_argument("--ckpt-dir", default=None,
                        help="write a stream checkpoint after each task in CKPT_DIR/<method>")
    parser.add_argument("--resume", action="store_true", help="continue from --ckpt-dir")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny MLP)")
    parser.add_argument("--consolidation", type=float, default=None,
                        help="SSR's protection strength (default: the library's, SSRConfig().consolidation)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    bench = make_benchmark("digits", "split", args.scenario, seed=args.seed)
    print(f"Split digits, {args.scenario}-incremental: {bench.n_tasks} tasks, {bench.n_classes} outputs"
          f"{' per head' if bench.multi_head else ''}; MLP 2x{args.hidden}, Adam lr={args.lr}, "
          f"{args.epochs} epochs per task, optimizer state: {args.optimizer_state}\n")
    methods = ["naive", "ssr"] if args.method == "both" else [args.method]
    result = None
    for method in methods:
        callbacks = []
        if method == "ssr":
            from lightning_ssr.callback import SynapticScaling

            kwargs = {} if args.consolidation is None else {"consolidation": args.consolidation}
            callbacks.append(SynapticScaling(**kwargs))
        torch.manual_seed(args.seed)
        module = ClassifierModule(make_model(bench, args.hidden), lr=args.lr, task_labels=bench.multi_head)
        result = fit_stream(
            module, bench, callbacks=callbacks, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
            ckpt_dir=Path(args.ckpt_dir, method) if args.ckpt_dir else None, resume=args.resume,
            optimizer_state=args.optimizer_state, trainer_kwargs={"accelerator": "cpu", "devices": 1},
        )
        print(result.format())
        print(f"train time {sum(result.train_time_s):.2f} s, wall time {result.wall_time_s:.2f} s, "
              f"extra state {result.extra_state_bytes} bytes\n")
    if args.json and result is not None:
        result.to_json(args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
