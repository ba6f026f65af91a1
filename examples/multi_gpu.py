"""A continual-learning stream with Synaptic Scaling under DDP: several processes, GPUs or nodes.

Split digits (scikit-learn's 8x8 digits, embedded, no download) in 5 tasks through
``fit_stream``: one fresh ``Trainer`` per task, every one under the same DDP strategy and process
group, with the same ``SynapticScaling`` callback, whose per-neuron activity is averaged across
processes before every update, so all replicas stay identical. Each process trains on its shard of
each task and evaluates its shard of every test task; the correct counts are summed, so the
accuracy matrix is exact. Only the global-zero process logs and prints.

The defaults run anywhere (two CPU processes over gloo):

    python examples/multi_gpu.py
    python examples/multi_gpu.py --accelerator gpu --devices 4                  # one node, 4 GPUs
    WANDB_MODE=offline python examples/multi_gpu.py --wandb                     # one W&B run, on disk
    python examples/multi_gpu.py --norm ssr                                     # with SSRNorm1d layers

Several nodes: start the same command on every node, with Lightning's variables (``MASTER_ADDR``,
``MASTER_PORT``, ``NODE_RANK``; Lightning starts the processes of each node), or under ``torchrun``
or SLURM's ``srun`` (one task per GPU), which start every process themselves:

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/multi_gpu.py --accelerator gpu --devices 4 --num-nodes 2
    srun --nodes 2 --ntasks-per-node 4 --gpus-per-node 4 \\
        python examples/multi_gpu.py --accelerator gpu --devices 4 --num-nodes 2
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Union

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_ssr import SynapticScaling  # noqa: E402
from lightning_ssr.continual import ClassifierModule, fit_stream  # noqa: E402
from lightning_ssr.data import make_benchmark  # noqa: E402


class MultiHeadMLP(nn.Module):
    """An MLP with one output block per task, picked by each sample's task label: ``model(x, t)``."""

    def __init__(self, body: nn.Module, hidden: int, n_out: int, n_tasks: int) -> None:
        super().__init__()
        self.n_out, self.n_tasks = n_out, n_tasks
        self.body = body
        self.heads = nn.Linear(hidden, n_out * n_tasks)

    def forward(self, x: torch.Tensor, task_labels: torch.Tensor) -> torch.Tensor:
        out = self.heads(self.body(x)).view(x.shape[0], self.n_tasks, self.n_out)
        return out[torch.arange(x.shape[0], device=x.device), task_labels]


def make_model(bench: Any, hidden: int, norm: str) -> nn.Module:
    """An MLP 2 x ``hidden`` for the benchmark; ``norm="ssr"`` puts an SSRNorm1d after each hidden Linear."""

    def block(n_in: int) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Linear(n_in, hidden)]
        if norm == "ssr":
            from lightning_ssr.norm import SSRNorm1d

            layers.append(SSRNorm1d(hidden))
        return [*layers, nn.ReLU()]

    body = nn.Sequential(nn.Flatten(), *block(bench.input_size), *block(hidden))
    if bench.multi_head:
        return MultiHeadMLP(body, hidden, bench.n_classes, bench.n_tasks)
    return nn.Sequential(*body, nn.Linear(hidden, bench.n_classes))


def _devices(value: str) -> Union[int, str]:
    """``--devices``: a count, ``auto``/``-1``, or a comma-separated list of device indices."""
    return int(value) if value.lstrip("-").isdigit() else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu", help="cpu, gpu, cuda, mps, auto")
    parser.add_argument("--devices", type=_devices, default=2, help="processes (devices) per node, or 'auto'")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--strategy", default="ddp",
                        help="ddp (also under torchrun and SLURM), or auto for one device; SynapticScaling refuses "
                             "strategies that shard the model (FSDP, DeepSpeed)")
    parser.add_argument("--precision", default=None, help="e.g. bf16-mixed, 16-mixed (default: Lightning's)")
    parser.add_argument("--scenario", default="domain", choices=["task", "domain", "class"])
    parser.add_argument("--epochs", type=int, default=2, help="epochs per task")
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--norm", default="none", choices=["none", "ssr"], help="SSRNorm1d after each hidden Linear")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ckpt-dir", default=None, help="write a stream checkpoint after each task")
    parser.add_argument("--resume", action="store_true",
                        help="continue from --ckpt-dir (with any number of processes, also one)")
    parser.add_argument("--wandb", action="store_true", help="log the stream to Weights & Biases as one run")
    parser.add_argument("--wandb-project", default="lightning-ssr")
    parser.add_argument("--save-dir", default="runs", help="where W&B writes (SAVE_DIR/wandb)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the same stream without SSR (run by default, to print the two side by side)")
    return parser


def main(argv: Union[list[str], None] = None) -> None:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if args.accelerator == "cpu":
        torch.set_num_threads(1)  # one thread per process: the processes share the cores

    bench = make_benchmark("digits", "split", args.scenario, seed=args.seed)
    torch.manual_seed(args.seed)
    module = ClassifierModule(make_model(bench, args.hidden, args.norm), lr=args.lr, task_labels=bench.multi_head)
    ssr = SynapticScaling()
    callbacks: list[Any] = [ssr]
    logger = None
    if args.wandb:
        from lightning_ssr.loggers import SSRWandbHistograms, StreamWandbLogger

        Path(args.save_dir).mkdir(parents=True, exist_ok=True)
        logger = StreamWandbLogger(
            project=args.wandb_project, name=f"multi-gpu-{args.scenario}", save_dir=args.save_dir,
            config={"launch": {"accelerator": args.accelerator, "devices": args.devices,
                               "num_nodes": args.num_nodes, "strategy": args.strategy}},
        )
        callbacks.append(SSRWandbHistograms(ssr, every_n_steps=20))
    trainer_kwargs: dict[str, Any] = {
        "accelerator": args.accelerator, "devices": args.devices, "num_nodes": args.num_nodes,
        "strategy": args.strategy, "log_every_n_steps": 10,
    }
    if args.precision:
        trainer_kwargs["precision"] = args.precision
    result = fit_stream(
        module, bench, callbacks=callbacks, logger=logger, epochs=args.epochs, batch_size=args.batch_size,
        seed=args.seed, ckpt_dir=args.ckpt_dir, resume=args.resume, method="ssr", trainer_kwargs=trainer_kwargs,
    )
    if logger is not None:
        logger.finalize_stream(result)  # the table and heatmap are logged; this finishes the run
    baseline = None
    if not args.no_baseline:  # the same stream, model initialization and settings, without SSR
        torch.manual_seed(args.seed)
        plain = ClassifierModule(make_model(bench, args.hidden, args.norm), lr=args.lr, task_labels=bench.multi_head)
        baseline = fit_stream(plain, bench, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                              method="naive", trainer_kwargs=trainer_kwargs)
    if rank_zero_only.rank == 0:  # set by the strategy: the global rank, on every node
        print(
            f"\nSplit digits, {args.scenario}-incremental, {args.devices} device(s) x {args.num_nodes} node(s) "
            f"({args.accelerator}, {args.strategy}):\n{result.format()}\n"
            f"train time {sum(result.train_time_s):.1f} s, wall time {result.wall_time_s:.1f} s"
        )
        if baseline is not None:
            print(f"average accuracy: with SSR {100 * result.average_accuracy:.1f} %, without SSR "
                  f"{100 * baseline.average_accuracy:.1f} % (plasticity {100 * result.plasticity:.1f} vs "
                  f"{100 * baseline.plasticity:.1f} %)")


if __name__ == "__main__":
    main()
