"""The stream's data: experiences and datasets, Avalanche's transforms and model adaptation, DDP shards.

A benchmark is an object with ``train_stream`` and ``test_stream`` (an Avalanche benchmark, a
:class:`~lightning_ssr.data.ContinualBenchmark`) or a ``(train, test)`` pair of sequences of
experiences or map-style datasets; :func:`_as_streams` checks it and returns the two lists.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> data = [TensorDataset(torch.zeros(5, 2), torch.zeros(5, dtype=torch.long)) for _ in range(2)]
    >>> train, test = _as_streams((data, data))
    >>> len(train), len(test), _dataset_of(train[0], "training experience 0") is data[0]
    (2, 2, True)
    >>> list(_Shard(5, rank=1, world=2))
    [1, 3]
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

__all__ = ["_Shard", "_adapt", "_as_streams", "_dataset_of", "_phase"]


def _dataset_of(item: Any, where: str) -> Dataset:
    """The dataset of an experience (``item.dataset``) or ``item`` itself when it is one."""
    ds = getattr(item, "dataset", item)
    if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
        raise TypeError(
            f"{where} must be an experience with a `.dataset` or a map-style Dataset, got {type(item).__name__}"
        )
    return ds


def _as_streams(benchmark: Any) -> tuple[list[Any], list[Any]]:
    """The training and test experiences of ``benchmark``, checked (see the module's docstring)."""
    if hasattr(benchmark, "train_stream") and hasattr(benchmark, "test_stream"):
        train, test = benchmark.train_stream, benchmark.test_stream
    elif isinstance(benchmark, (tuple, list)) and len(benchmark) == 2:
        train, test = benchmark
    else:
        raise TypeError(
            "`benchmark` must have `train_stream` and `test_stream` (an Avalanche benchmark or a "
            "lightning_ssr.data.ContinualBenchmark) or be a (train, test) pair of sequences of "
            f"experiences or datasets, got {type(benchmark).__name__}"
        )
    try:
        train, test = list(train), list(test)
    except TypeError as err:
        raise TypeError(f"`benchmark`'s train and test streams must be iterable, got {type(train).__name__}") from err
    if not train or not test:
        raise ValueError(
            f"`benchmark` must have non-empty streams, got {len(train)} train and {len(test)} test experiences"
        )
    if len(train) > len(test):
        raise ValueError(
            f"`benchmark` must have at least as many test experiences as training experiences (test "
            f"experience i belongs to training experience i), got {len(train)} train and {len(test)} test"
        )
    for i, item in enumerate(train):
        _dataset_of(item, f"training experience {i}")
    for j, item in enumerate(test):
        _dataset_of(item, f"test experience {j}")
    return train, test


def _phase(ds: Dataset, phase: str) -> Dataset:
    """An Avalanche dataset switched to its train or eval transforms (others unchanged)."""
    switch = getattr(ds, phase, None)
    if callable(switch) and callable(getattr(ds, "eval" if phase == "train" else "train", None)) \
        and not isinstance(ds, nn.Module):
        return switch()
    return ds


def _adapt(module: nn.Module, experiences: Sequence[Any]) -> None:
    """Avalanche's model adaptation (new heads, grown classifiers) for each experience, if any applies.

    Avalanche strategies adapt the model before training on an experience (in train mode) and
    before evaluating on one (in eval mode); the caller sets the mode.
    """
    dynamic = sys.modules.get("avalanche.models.dynamic_modules")
    if dynamic is None or not any(isinstance(m, dynamic.DynamicModule) for m in module.modules()):
        return
    for experience in experiences:
        if hasattr(experience, "dataset"):
            dynamic.avalanche_model_adaptation(module, experience)


class _Shard(torch.utils.data.Sampler):
    """Indices ``rank, rank + world, ...``: disjoint shards that cover the dataset exactly once."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = range(rank, n, world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
