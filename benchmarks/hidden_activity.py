"""How active each hidden layer stays, task after task, and how well it still separates a new task's classes.

Runs one validation stream of ``benchmarks/choose_defaults.py`` (every training experience split 80/20,
as the bench's search does) with plain training and with SSR, and prints, after each task, on that
task's own training images: the accuracy with the whole head, the share of answers that name a class
of an earlier task, and per hidden layer (each ReLU's output) the share of units active on at least 1 %
of the images, their mean activation and the nearest-class-mean accuracy of its features on the task's
classes. This is how the README's "Neurons that fall silent scale up" found Permuted MNIST
class-incremental's hidden layers going quiet without homeostatic scaling.

Usage::

    python benchmarks/hidden_activity.py                                    # Permuted MNIST 20 class-incremental, seed 0
    python benchmarks/hidden_activity.py --config '{"scaling_rate": 0.0}'   # SSR without homeostatic scaling
    python benchmarks/hidden_activity.py --stream digits-class --methods ssr
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from choose_defaults import STREAMS  # noqa: E402


def nearest_mean_accuracy(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of assigning each row to the class whose mean row is nearest (how separable the classes are)."""
    classes = labels.unique()
    means = torch.stack([features[labels == c].mean(0) for c in classes])
    return float((classes[torch.cdist(features, means).argmin(1)] == labels).float().mean())


def printer(batches: int = 12) -> Any:
    """A Lightning callback that prints the figures above at the end of every fit (one per task)."""
    import lightning.pytorch as pl

    class HiddenActivity(pl.Callback):
        def __init__(self) -> None:
            self.task, self.seen = 0, torch.zeros(0, dtype=torch.long)

        def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            rows = [b for _, b in zip(range(batches), trainer.train_dataloader)]
            x, y = torch.cat([b[0] for b in rows]), torch.cat([b[1] for b in rows])
            acts: list[torch.Tensor] = []
            relus = [m for m in pl_module.modules() if isinstance(m, torch.nn.ReLU)]
            hooks = [m.register_forward_hook(lambda _m, _i, out: acts.append(out.detach().flatten(1))) for m in relus]
            was_training = pl_module.training
            pl_module.eval()
            with torch.no_grad():
                out = pl_module(x)
            pl_module.train(was_training)
            for h in hooks:
                h.remove()
            answers = (out[0] if isinstance(out, tuple) else out).argmax(1)
            old = float(torch.isin(answers, self.seen[~torch.isin(self.seen, y.unique())]).float().mean())
            cells = [f"task {self.task + 1:>2}: accuracy {float((answers == y).float().mean()):.3f}, old answers {old:.3f}"]
            for i, a in enumerate(acts):
                active = float(((a > 0).float().mean(0) > 0.01).float().mean())
                cells.append(f"hidden {i + 1}: active {active:.2f} mean {float(a.mean()):.3f} "
                             f"nearest-mean {nearest_mean_accuracy(a, y):.3f}")
            print(" | ".join(cells), flush=True)
            self.seen, self.task = torch.cat([self.seen, y.unique()]).unique(), self.task + 1

    return HiddenActivity()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stream", default="mnist-permuted20-class", choices=sorted(STREAMS))
    parser.add_argument("--methods", default="naive,ssr", help="comma-separated from naive, ssr")
    parser.add_argument("--config", default="{}", help="SSR keyword arguments over the library's defaults (JSON)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - {"naive", "ssr"}:
        parser.error(f"--methods: each of naive, ssr, got {args.methods!r}")
    from lightning_ssr.bench import runner
    from lightning_ssr.bench.command import quiet_warnings
    from lightning_ssr.bench.methods import METHODS, Method

    quiet_warnings()
    torch.set_flush_denormal(True)  # as the bench does for every method
    val, s = STREAMS[args.stream].validation()
    for name in methods:
        print(f"{args.stream}, {'plain training' if name == 'naive' else 'SSR ' + args.config}, seed {args.seed}",
              flush=True)
        method = METHODS["naive-lightning"] if name == "naive" else Method("ssr", "lightning", "SSR")
        r = runner.run_method(method, {} if name == "naive" else json.loads(args.config), val, s, args.seed,
                              extra_callbacks=[printer()])
        print(f"average accuracy {100 * r.average_accuracy:.1f} %, plasticity {100 * r.plasticity:.1f} %", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
