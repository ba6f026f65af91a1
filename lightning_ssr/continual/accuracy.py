"""Top-1 accuracy per test experience, as torchmetrics state that DDP sums across processes.

:class:`ExperienceAccuracy` counts correct predictions and samples per test experience as
torchmetrics state with ``dist_reduce_fx="sum"``, so that under DDP, where each process sees a
shard of the test set, the counts are summed across processes before the division.
"""

from __future__ import annotations

import math
from typing import Any, Union

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["ExperienceAccuracy"]


class ExperienceAccuracy(Metric):
    """Top-1 accuracy on each of ``num_experiences`` test experiences, summed across processes.

    State: ``correct`` and ``total``, two int64 vectors of length ``num_experiences``, reset to
    zeros and reduced with ``sum`` across processes (each process may see any shard of each test
    experience). ``compute()`` returns ``correct / total`` as float64, NaN where an experience
    received no sample.

    A prediction is correct when the arg-max of its scores equals the target (ties resolve to the
    first maximum, as in ``torch.argmax`` and Avalanche's ``Accuracy``); integer predictions are
    compared as they are.

    Args:
        num_experiences: number of test experiences (columns of the accuracy matrix), ``>= 1``.
        **kwargs: torchmetrics ``Metric`` options (``sync_on_compute``, ``process_group``, ...);
            anything else is rejected.

    Example:
        >>> metric = ExperienceAccuracy(num_experiences=2)
        >>> metric.update(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]), experience=0)
        >>> metric.update(torch.tensor([1, 1, 0]), torch.tensor([1, 1, 1]), experience=1)
        >>> metric.compute()
        tensor([0.5000, 0.6667], dtype=torch.float64)
        >>> metric.correct, metric.total
        (tensor([1, 2]), tensor([2, 3]))
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    total: Tensor

    def __init__(self, num_experiences: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(num_experiences, bool) or not isinstance(num_experiences, int):
            raise TypeError(f"`num_experiences` must be an int >= 1, got {num_experiences!r}")
        if num_experiences < 1:
            raise ValueError(f"`num_experiences` must be >= 1, got {num_experiences}")
        self.num_experiences = num_experiences
        self.add_state("correct", torch.zeros(num_experiences, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_experiences, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, experience: Union[int, Tensor]) -> None:  # type: ignore[override]
        """Count the correct predictions of one batch.

        Args:
            preds: scores ``[N, C]`` (logits or probabilities) or predicted labels ``[N]``.
            target: true labels ``[N]``.
            experience: the test experience of the whole batch (an int), or of each sample
                (an int tensor ``[N]``), in ``[0, num_experiences)``.

        Raises:
            ValueError: for mismatched shapes or an experience index out of range.
        """
        if preds.dim() == 2:
            preds = preds.argmax(dim=1)
        elif preds.dim() != 1:
            raise ValueError(f"`preds` must be scores [N, C] or labels [N], got shape {tuple(preds.shape)}")
        if target.dim() != 1 or target.shape[0] != preds.shape[0]:
            raise ValueError(
                f"`target` must be labels [N] with N = {preds.shape[0]} (the batch of `preds`), "
                f"got shape {tuple(target.shape)}"
            )
        hits = (preds == target).long()
        if isinstance(experience, Tensor) and experience.dim() > 0:
            if experience.shape != target.shape:
                raise ValueError(
                    f"`experience` must be an int or a tensor of shape {tuple(target.shape)}, "
                    f"got shape {tuple(experience.shape)}"
                )
            index = experience.to(device=self.correct.device, dtype=torch.long)
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_experiences):
                raise ValueError(
                    f"`experience` must be in [0, {self.num_experiences}), got values in "
                    f"[{int(index.min())}, {int(index.max())}]"
                )
            self.correct.index_add_(0, index, hits.to(self.correct.device))
            self.total.index_add_(0, index, torch.ones_like(index))
            return
        j = int(experience)
        if not 0 <= j < self.num_experiences:
            raise ValueError(f"`experience` must be in [0, {self.num_experiences}), got {j}")
        self.correct[j] += hits.sum().to(self.correct.device)
        self.total[j] += target.shape[0]

    def compute(self) -> Tensor:
        """Accuracy of each experience, float64 ``[num_experiences]``; NaN where nothing was counted."""
        total = self.total.double()
        return torch.where(total > 0, self.correct.double() / total.clamp_min(1), torch.full_like(total, math.nan))
