"""Partial batches: an optimizer step on fewer samples counts in proportion to them.

A data set whose size is not a multiple of the batch size ends each epoch on a smaller batch
(``drop_last=False``, the default of PyTorch's ``DataLoader`` and of Avalanche's strategies). Adam
moves every weight by about the learning rate whatever the batch size, so one step on 8 images is as
large as one on 128 and 16 times as noisy. Under protection the new task sits in a narrow space
near the anchors, and such a step undoes part of it: on Permuted Fashion-MNIST (10 tasks, 5,000
images a task at batch 128, so every task ends on 8 images) one extra step on 8 images costs the
task just learned 4.5 points under SSR and 1.1 under plain training, and the step's gradient in
Adam's running moments costs the tasks after it about as much again.

With ``scale_partial_batches`` a step on ``n`` samples, where the current task's largest step had
``N``, counts as ``f = n / N`` of one: its gradients are multiplied by ``f`` before the step (so
they enter the optimizer's running moments with that weight, as a loss normalized by the full
batch would) and the optimizer's change to every parameter is multiplied by ``f`` after it
(``p <- old + f * (p - old)``, which also holds under Adam). Only partial steps pay: one copy of
the trainable parameters, taken and released within the step. Under gradient accumulation the
samples of all the step's batches count together.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from lightning_ssr.core.config import SSRConfig

__all__ = ["PartialBatches", "refuse_double_scaling"]


class PartialBatches:
    """Scale the optimizer step of a batch smaller than the current task's largest.

    Front ends report each training batch's size with :meth:`observe`; the engine calls
    :meth:`before_step` and :meth:`after_step` around every optimizer step, and :meth:`new_task`
    at each task's end. Without :meth:`observe` (a front end that does not report batch sizes)
    every step is left as it is.

    Args:
        enabled: ``scale_partial_batches``; ``False`` leaves every step as it is.

    Example:
        >>> lin = nn.Linear(2, 1, bias=False)
        >>> opt = torch.optim.SGD(lin.parameters(), lr=1.0)
        >>> partial = PartialBatches(enabled=True)
        >>> def step(n):
        ...     partial.observe(n)
        ...     lin.weight.grad = torch.ones_like(lin.weight)
        ...     partial.before_step(lin.parameters())
        ...     opt.step()
        ...     partial.after_step()
        ...     return lin.weight.detach().clone()
        >>> with torch.no_grad():
        ...     _ = lin.weight.zero_()
        >>> step(8)  # the first step sets the task's full batch
        tensor([[-1., -1.]])
        >>> step(2)  # a quarter of the samples: a quarter of the gradient, a quarter of the step
        tensor([[-1.0625, -1.0625]])
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = bool(enabled)
        self.full = 0  # the current task's largest step, in samples
        self.samples = 0  # samples of the step being accumulated
        self.scaled = 0  # partial steps scaled so far (diagnostics)
        self._factor = 1.0
        self._snapshot: list[tuple[Tensor, Tensor]] = []

    def observe(self, samples: int) -> None:
        """A training batch of ``samples`` went into the coming optimizer step."""
        self.samples += int(samples)

    def before_step(self, params: Iterable[nn.Parameter]) -> None:
        """Gradients are final: if the step is partial, scale them by ``n / N`` and snapshot the
        trainable ``params`` that have one (frozen parameters are left out)."""
        samples, self.samples = self.samples, 0
        self._snapshot = []
        if not self.enabled or samples <= 0:
            return
        self.full = max(self.full, samples)
        if samples >= self.full:
            return
        self._factor = samples / self.full
        with torch.no_grad():
            for p in params:
                if p.grad is None or not p.requires_grad:
                    continue
                p.grad.mul_(self._factor)
                self._snapshot.append((p, p.detach().clone()))
        self.scaled += 1

    def after_step(self) -> None:
        """Right after the step: ``p <- old + f * (p - old)`` on the parameters snapshotted."""
        if not self._snapshot:
            return
        with torch.no_grad():
            for p, old in self._snapshot:
                torch.lerp(old, p, self._factor, out=p)  # as Protection's update gating does
        self._snapshot = []

    def new_task(self) -> None:
        """A task ended: the next task sets its own full batch."""
        self.full = 0

    def state_dict(self) -> dict[str, int]:
        return {"full": self.full, "samples": self.samples, "scaled": self.scaled}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; an older state without it starts the task afresh."""
        self.full = int(state.get("full", 0))
        self.samples = int(state.get("samples", 0))
        self.scaled = int(state.get("scaled", 0))


def refuse_double_scaling(others: Iterable[object], argument: str, owner: str, other: str) -> None:
    """Raise if one of ``others`` is an SSR front end that already scales partial batches.

    A standalone front end of :class:`PartialBatches` beside ``SynapticScaling`` or ``SSRPlugin``
    with ``scale_partial_batches=True`` would scale the step twice. The SSR front ends are
    recognized by their :class:`~lightning_ssr.core.config.SSRConfig`.

    Args:
        others: the callbacks or plugins beside ``owner``.
        argument: their argument's name in the error (``"callbacks"``, ``"plugins"``).
        owner: the standalone front end's name.
        other: the SSR front end it must not sit beside, with its article (``"a SynapticScaling"``).

    Example:
        >>> class Front:
        ...     config = SSRConfig()
        >>> refuse_double_scaling([Front()], "plugins", "PartialBatchPlugin", "an SSRPlugin")
        Traceback (most recent call last):
        ...
        ValueError: `plugins` must not hold PartialBatchPlugin beside an SSRPlugin with `scale_partial_batches=True` ...
    """
    if any(isinstance(getattr(o, "config", None), SSRConfig) and o.config.scale_partial_batches for o in others):
        raise ValueError(
            f"`{argument}` must not hold {owner} beside {other} with `scale_partial_batches=True` (it already "
            f"scales partial batches: the step would be scaled twice), got both; drop {owner} or pass "
            "`scale_partial_batches=False`"
        )
