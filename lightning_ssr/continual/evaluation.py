"""Evaluate a module on every test experience of a stream and turn the counts into rows and results.

Evaluation is a plain loop under ``torch.no_grad()`` that calls ``module.predict_step(batch,
batch_idx)`` (it must return logits ``[N, C]``; :class:`~lightning_ssr.continual.ClassifierModule`'s
does) on the strategy's root device, inside the precision plugin's predict context. Under DDP each
process evaluates a disjoint shard of every test experience (no padding, no duplicates) and the
counts of correct predictions are summed across processes by
:class:`~lightning_ssr.continual.ExperienceAccuracy`, so every process holds the same, exact matrix.

The runner keeps the counts as ``rows``: ``{"correct": [...], "total": [...], "train_time_s":
[...], "eval_time_s": [...]}`` with one entry per finished training experience;
:func:`_accuracy`, :func:`_log_row` and :func:`_stream_result` read them.

Example:
    >>> rows = {"correct": [[3, 0], [2, 4]], "total": [[4, 0], [4, 8]]}
    >>> _accuracy(rows)
    [[0.75, nan], [0.5, 0.5]]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_ssr.continual.accuracy import ExperienceAccuracy
from lightning_ssr.continual.metrics import (
    StreamResult,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    plasticity,
)
from lightning_ssr.continual.module import unpack_batch
from lightning_ssr.continual.streams import _adapt, _dataset_of, _phase, _Shard

__all__ = ["_accuracy", "_evaluate", "_log_row", "_stream_result"]


@torch.no_grad()
def _evaluate(module: pl.LightningModule, test_stream: Sequence[Any], trainer: pl.Trainer, eval_batch_size: int,
              num_workers: int) -> tuple[list[int], list[int]]:
    """Evaluate ``module`` on every test experience; counts summed across processes.

    Returns:
        The number of correct predictions and of samples for each test experience.
    """
    device = trainer.strategy.root_device
    rank, world = trainer.global_rank, trainer.world_size
    if world > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(
            f"fit_stream evaluates in the processes that train: with world_size={world} it needs the "
            "process group of a strategy that runs the script in every process (strategy='ddp'), "
            f"got {type(trainer.strategy).__name__} with no process group here (e.g. 'ddp_spawn')"
        )
    was_training = module.training
    module.eval()
    module.to(device)
    metric = ExperienceAccuracy(len(test_stream), sync_on_compute=False).to(device)
    context = trainer.precision_plugin.predict_step_context
    try:
        for j, exp in enumerate(test_stream):
            _adapt(module, [exp])  # as Avalanche's eval: each experience's heads just before its loader
            module.to(device)
            ds = _phase(_dataset_of(exp, f"test experience {j}"), "eval")
            loader = DataLoader(
                ds, batch_size=eval_batch_size, sampler=_Shard(len(ds), rank, world),
                num_workers=num_workers, collate_fn=getattr(ds, "collate_fn", None),
                pin_memory=device.type == "cuda",
            )
            for batch_idx, batch in enumerate(loader):
                batch = trainer.strategy.batch_to_device(batch, device)
                with context():
                    logits = module.predict_step(batch, batch_idx)
                if not isinstance(logits, Tensor) or logits.dim() != 2:
                    raise ValueError(
                        f"{type(module).__name__}.predict_step must return logits [N, C] for a batch "
                        f"(x, y, task_labels), got {type(logits).__name__}"
                        + (f" of shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else "")
                    )
                metric.update(logits, unpack_batch(batch)[1], j)
        with metric.sync_context(should_sync=world > 1):
            correct, total = metric.correct.tolist(), metric.total.tolist()
    finally:
        module.train(was_training)
    return correct, total


def _accuracy(rows: Mapping[str, list]) -> list[list[float]]:
    """The accuracy matrix of ``rows``' counts: ``nan`` for an empty test experience."""
    return [[c / t if t else math.nan for c, t in zip(cr, tr)] for cr, tr in zip(rows["correct"], rows["total"])]


def _log_row(loggers: Sequence[Logger], i: int, rows: Mapping[str, list], step: int) -> None:
    """Log the ``stream/...`` metrics after training experience ``i`` at ``step``, from global rank 0."""
    if not loggers:
        return
    acc = _accuracy(rows)
    metrics = {f"stream/acc_exp{j}": v for j, v in enumerate(acc[-1])}
    metrics.update({
        "stream/experience": float(i),
        "stream/average_accuracy": average_accuracy(acc),
        "stream/average_accuracy_seen": average_accuracy(acc, seen_only=True),
        "stream/average_forgetting": average_forgetting(acc),
        "stream/backward_transfer": backward_transfer(acc),
        "stream/plasticity": plasticity(acc),
        "stream/train_time_s": rows["train_time_s"][-1],
    })
    if rank_zero_only.rank == 0:
        for lg in loggers:
            lg.log_metrics(metrics, step=step)
            lg.save()


def _stream_result(rows: Mapping[str, list], wall: float, *, method: str, n_experiences: int,
                   extra_state_bytes: int, config: dict[str, Any], method_config: dict[str, Any]) -> StreamResult:
    """The :class:`~lightning_ssr.continual.StreamResult` of ``rows`` (copied) and the run's description."""
    return StreamResult(
        method=method,
        accuracy=_accuracy(rows),
        correct=[list(r) for r in rows["correct"]],
        total=[list(r) for r in rows["total"]],
        n_experiences=n_experiences,
        train_time_s=list(rows["train_time_s"]),
        train_cpu_s=list(rows.get("train_cpu_s", [])),
        eval_time_s=list(rows["eval_time_s"]),
        wall_time_s=wall,
        extra_state_bytes=extra_state_bytes,
        config=config,
        method_config=method_config,
    )
