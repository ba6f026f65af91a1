"""Training time with the SynapticScaling callback over training time without it.

Same model, data and Trainer settings; runs with and without the callback are interleaved in one
process so that machine noise hits both alike; the ratio of medians is printed, for wall time and
for this process's CPU time (the steadier of the two when other work shares the machine). Two SSR settings:
``task 1`` (sensing + homeostatic scaling + synaptic-total homeostasis) and ``task 2`` (the same,
plus protection of the neurons consolidated after task 1: the most expensive path).

Usage::

    python benchmarks/callback_overhead.py                 # MLP 2x400 and the small CNN, CPU
    python benchmarks/callback_overhead.py --accelerator gpu --steps 400
    python benchmarks/callback_overhead.py --protection update   # the earlier default
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ssr import SynapticScaling


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(), nn.Linear(400, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def _fit(net: nn.Module, loader: DataLoader, steps: int, callbacks: list, accelerator: str) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds of one ``fit``."""
    trainer = L.Trainer(
        max_steps=steps, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    model = Classifier(net)
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, loader)
    if accelerator != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def measure(name: str, make, steps: int, repeats: int, batch: int, accelerator: str,
            protection: str | None = None) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(steps * batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (steps * batch,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    ssr = dict(scaling_rate=0.01, norm_rate=0.01, set_point="self", warmup_steps=5, log_diagnostics=False)
    if protection is not None:
        ssr["protection"] = protection
    base_net = make()
    # a callback that has consolidated one task: protection is active from the first step
    task2 = SynapticScaling(consolidation=1.0, **ssr)
    _fit(base_net, loader, 10, [task2], accelerator)
    times: dict[str, list[tuple[float, float]]] = {"none": [], "task 1": [], "task 2": []}
    _fit(make(), loader, 10, [], accelerator)  # warm-up
    for _ in range(repeats):
        times["none"].append(_fit(make(), loader, steps, [], accelerator))
        times["task 1"].append(_fit(make(), loader, steps, [SynapticScaling(**ssr)], accelerator))
        times["task 2"].append(_fit(base_net, loader, steps, [task2], accelerator))
    out = {}
    for i, clock in enumerate(("wall", "cpu")):
        base = statistics.median(t[i] for t in times["none"])
        out[f"{clock} seconds"] = base
        for k in ("task 1", "task 2"):
            out[f"{clock} {k}"] = statistics.median(t[i] for t in times[k]) / base
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per timed fit")
    parser.add_argument("--protection", default=None, choices=["anchor", "update", "gradient"],
                        help="SSR's protection (default: the library's)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (median taken)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if args.accelerator in ("gpu", "cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"callback overhead: {args.steps} steps x {args.repeats} interleaved repeats, batch {args.batch_size}, "
          f"{device}, protection {args.protection or 'default'}")
    print(f"{'model':<10} {'clock':<5} {'fit without (s)':>16} {'task 1 ratio':>13} {'task 2 ratio':>13}")
    for name, make in (("MLP 2x400", mlp), ("small CNN", cnn)):
        r = measure(name, make, args.steps, args.repeats, args.batch_size, args.accelerator, args.protection)
        for clock in ("wall", "cpu"):
            print(f"{name:<10} {clock:<5} {r[clock + ' seconds']:>16.3f} {r[clock + ' task 1']:>13.3f} "
                  f"{r[clock + ' task 2']:>13.3f}")


if __name__ == "__main__":
    main()
