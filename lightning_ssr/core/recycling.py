"""Plasticity recovery: neurons no finished task needed are made new for the next one.

In long streams a network loses plasticity: units die or saturate, and protection leaves fewer
free ones each task. Continual backprop (Dohare et al. 2024), NISPA and CLNP recycle the least-used
units; AGS-CL (Jung et al. 2020) re-initializes unimportant nodes before each task and cuts their
connections into important ones, so that what they learn next cannot overwrite old outputs.

At the end of each task, every neuron of a tracked layer whose accumulated importance (its use
relative to its layer's mean, over all finished tasks) is below ``recycle_below`` gets:

* fresh incoming weights and bias, drawn as PyTorch initializes a Linear or Conv layer
  (uniform in ``+-1 / sqrt(fan_in)``), from a generator seeded by the task count and the layer,
  so every DDP replica and every resumed run draws the same numbers;
* its outgoing weights (its columns in the layer that consumes it) as they were
  (``recycle_outgoing="keep"``, the default), or zero (``"zero"``: the new unit starts with no
  effect on the network's output, and where the consumer is protected the zero is what is kept).
  A cut unit also gets no gradient into its fresh incoming weights until the zeros regrow, by about
  the learning rate a step: at Adam's ``lr=1e-4`` (Permuted MNIST class-incremental, validation)
  cutting left SSR at 38.7 % against 48.2 with the weights kept (10 tasks; plain training 36.5).

Where the tasks share one output head (every tracked layer feeds the same modules as at the last
task's end: domain- and class-incremental streams), recycling runs after the first task only
(``recycle_shared_head=False``, the default, chosen on validation: Split Fashion-MNIST
domain-incremental 85.4 % against 84.2 at the same plasticity, the other streams within 0.2), and
not even then where the first task left some of an output layer's units unused (a class-incremental
head, classes still to come: on validation Permuted MNIST 10 / 20 class-incremental 55.7 / 34.4 %
against 53.1 / 32.3 with that recycling, the other streams level); where each task feeds a new
head (task-incremental) it runs after every task (:meth:`Recycling.after_task`).

Its importance stays (below the threshold: the unit is free); the optimizer's running moments of
those weights are left to decay. No state of its own beyond the names of the modules the layers fed at the last task's end
(:attr:`Recycling.fed`, in the engine's state), a per-layer count for diagnostics and,
until the next recycling, the values it overwrote (:meth:`Recycling.undo_state`), so that a fit
resumed from a checkpoint saved after its task ended can continue that task from the weights as
they were (:meth:`Recycling.restore`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from lightning_ssr.core.layers import weight_rows
from lightning_ssr.core.state import LayerState
from lightning_ssr.core.validation import check_choice

__all__ = ["OUTGOING_RULES", "Recycling", "trained_apart"]

#: What ``recycle_outgoing`` may say a recycled neuron's outgoing weights become.
OUTGOING_RULES = ("keep", "zero")


class Recycling:
    """Re-initialize the neurons no finished task used, at each task's end.

    Args:
        below: ``recycle_below``, the importance (relative to the layer mean of 1) under which a
            neuron is recycled; ``0`` switches recycling off.
        outgoing: ``recycle_outgoing``: ``"keep"`` the recycled neuron's outgoing weights or set them
            to ``"zero"``.

    Example:
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> st = LayerState("0", net[0])
        >>> st.importance.copy_(torch.tensor([2.0, 0.0, 1.5, 0.5]))
        tensor([2.0000, 0.0000, 1.5000, 0.5000])
        >>> st.consumer = (net[2], 1)
        >>> before = net[2].weight.detach().clone()
        >>> Recycling(below=0.1).recycle([st], task=1)
        1
        >>> torch.equal(net[2].weight, before)  # the recycled neuron's outgoing weights are kept
        True
        >>> Recycling(below=0.1, outgoing="zero").recycle([st], task=2)
        1
        >>> net[2].weight[:, 1].abs().sum().item()  # ... or cut
        0.0
    """

    def __init__(self, below: float, outgoing: str = "keep") -> None:
        check_choice("recycle_outgoing", outgoing, OUTGOING_RULES)
        self.below = float(below)
        self.outgoing = outgoing
        #: Per tracked layer, the name of the module it fed at the last task's end (``None``: no task
        #: ended yet); a head shared by the tasks is fed again, a new head per task is not.
        self.fed: Optional[dict[str, str]] = None
        #: Per layer recycled at the last task's end: the indices and the values overwritten.
        self._undo: dict[str, dict[str, Any]] = {}

    @property
    def enabled(self) -> bool:
        return self.below > 0

    def free(self, st: LayerState) -> Tensor:
        """The indices of ``st``'s neurons under the threshold."""
        return torch.nonzero(st.importance < self.below).flatten()

    def after_task(self, layers: Iterable[LayerState], model: nn.Module, task: int, shared_too: bool,
                   outputs: Iterable[LayerState] = (), apart: bool = False) -> int:
        """Task ``task`` ended: recycle, unless the tasks share one head and this is not the first task,
        or this is the first task and an output layer it used has units it never used (a
        class-incremental head; a head it did not use at all, another task's, does not count).

        The tasks share a head when every tracked layer feeds the same modules (its consumer, by
        name) as at the last task's end (domain- and class-incremental); with a new head per task
        (task-incremental) the last layer feeds a new module each time. Where no consumer was found,
        nothing is known and recycling runs. A task trained ``apart`` (:func:`trained_apart`: its
        own block of one output layer, as task-incremental heads in one ``Linear``) counts as a new head.

        Args:
            layers: the tracked layers.
            model: the model (for the names of the modules the layers feed).
            task: the number of finished tasks.
            shared_too: ``recycle_shared_head``: recycle after every task whatever the head.
            outputs: the output layers' states (their units' importance), if sensed.
            apart: the task trained its own block of an output layer (:func:`trained_apart`, read
                before the task's counts were folded).

        Returns:
            How many neurons were recycled in all.
        """
        layers = list(layers)
        names = {m: n for n, m in model.named_modules()}
        fed = {st.name: names.get(st.consumer[0], "") for st in layers if st.consumer is not None}
        shared = task > 1 and bool(fed) and fed == self.fed
        self.fed = fed
        room = task == 1 and any(_partly_used(st) for st in outputs)  # a head with classes still to come
        if (shared or room) and not (shared_too or apart):
            self._undo = {}
            for st in layers:
                st.recycled = 0
            return 0
        return self.recycle(layers, task)

    def recycle(self, layers: Iterable[LayerState], task: int) -> int:
        """Recycle the free neurons of every layer after task ``task`` (``1`` for the first).

        Returns:
            How many neurons were recycled in all.
        """
        self._undo = {}
        if not self.enabled:
            return 0
        total = 0
        with torch.no_grad():
            for st in layers:
                if not st.module.weight.requires_grad:
                    st.recycled = 0
                    continue  # a frozen layer is never changed
                idx = self.free(st)
                st.recycled = int(idx.numel())
                if not idx.numel():
                    continue
                total += idx.numel()
                undo = self._undo[st.name] = {"idx": idx.cpu(), **self._reinit_incoming(st, idx, task)}
                if self.outgoing == "zero" and st.consumer is not None and st.consumer[0].weight.requires_grad:
                    undo["consumer"] = st.consumer[0]
                    undo["cols"] = _set_columns(st.consumer[0].weight, st.n, idx, 0.0)
        return total

    def undo_state(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        """What the last :meth:`recycle` overwrote, per layer: the recycled indices, the old incoming
        rows (and bias), and the old outgoing columns with the consumer's name in ``model``."""
        names = {m: n for n, m in model.named_modules()}
        out = {layer: dict(undo) for layer, undo in self._undo.items()}
        for entry in out.values():
            if "consumer" in entry:
                entry["consumer"] = names[entry["consumer"]]  # a name, as a checkpoint can hold it
        return out

    @staticmethod
    def restore(layers: dict[str, LayerState], model: nn.Module, undo: dict[str, dict[str, Any]]) -> None:
        """Write back what :meth:`undo_state` recorded: the weights as they were before recycling
        (a task resumed from a checkpoint saved after its end continues from them)."""
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, entry in undo.items():
                st = layers[name]
                _set_incoming(st, entry["idx"], entry["rows"], entry.get("bias"))
                if "consumer" in entry:
                    _set_columns(modules[entry["consumer"]].weight, st.n, entry["idx"], entry["cols"])

    @staticmethod
    def _reinit_incoming(st: LayerState, idx: Tensor, task: int) -> dict[str, Tensor]:
        """Fresh incoming rows (and bias) for ``idx``, drawn as PyTorch initializes the layer; returns the
        old values."""
        fan_in = weight_rows(st.module.weight, st.module).shape[1]
        bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
        gen = torch.Generator().manual_seed(zlib.crc32(f"{st.name}:{task}".encode()))
        fresh = (torch.rand((idx.numel(), fan_in), generator=gen) * 2 - 1) * bound
        bias = None
        if getattr(st.module, "bias", None) is not None:
            bias = (torch.rand(idx.numel(), generator=gen) * 2 - 1) * bound
        return _set_incoming(st, idx, fresh, bias)


def _set_incoming(st: LayerState, idx: Tensor, rows: Tensor, bias: Optional[Tensor]) -> dict[str, Tensor]:
    """Write ``rows`` (and ``bias``) as the incoming weights of ``st``'s neurons ``idx``; returns the old
    values, on the CPU."""
    mod = st.module
    view = weight_rows(mod.weight, mod)
    dev_idx = idx.to(view.device)
    old = {"rows": view[dev_idx].cpu()}  # indexing copies
    view[dev_idx] = rows.to(device=view.device, dtype=view.dtype)
    if mod.weight.data_ptr() != view.data_ptr() or not mod.weight.is_contiguous():
        mod.weight.copy_(view.view_as(mod.weight))  # reshape copied a non-contiguous weight
    if bias is not None:
        dev_idx = idx.to(mod.bias.device)
        old["bias"] = mod.bias[dev_idx].cpu()
        mod.bias[dev_idx] = bias.to(mod.bias)
    return old


def trained_apart(outputs: Iterable[LayerState]) -> bool:
    """Whether the task's loss gradient reached, on an output layer that counts its targets, exactly
    the units the task trained toward and not every unit: each task trains its own block of one
    output layer (task-incremental heads in one ``Linear``, the logits masked to the task's units).

    A class-incremental head also pushes the other classes' units down, a domain-incremental one
    trains toward every unit: neither counts. A head masked to the classes seen so far reads as
    apart on its first task only.

    Example:
        >>> from torch import nn
        >>> st = LayerState("head", nn.Linear(4, 6))
        >>> st.count_targets = True
        >>> st.targets[2:4], st.reached[2:4] = 0.5, 9.0  # the task trained units 2 and 3, reached no other
        >>> trained_apart([st])
        True
        >>> st.reached[0] = 1.0  # an old class's unit pushed down: class-incremental
        >>> trained_apart([st])
        False
    """
    for st in outputs:
        reached = st.reached > 0
        if st.count_targets and bool(reached.any()) and not bool(reached.all()) and torch.equal(reached, st.targets > 0):
            return True
    return False


def _partly_used(st: LayerState) -> bool:
    """Whether some but not all of an output layer's units were used by a finished task."""
    used = st.importance > 0
    return bool(used.any()) and not bool(used.all())


def _set_columns(weight: Tensor, n: int, idx: Tensor, value: Union[Tensor, float]) -> Tensor:
    """Write ``value`` into the consumer's input columns of the producer's neurons ``idx`` (for a Conv,
    every position of those channels); returns the old columns, on the CPU."""
    cols = weight if weight.shape[1] == n else weight.view(weight.shape[0], n, -1)  # channels x positions
    dev_idx = idx.to(cols.device)
    old = cols[:, dev_idx].cpu()  # indexing copies
    cols[:, dev_idx] = value if isinstance(value, float) else value.to(device=cols.device, dtype=cols.dtype)
    return old
