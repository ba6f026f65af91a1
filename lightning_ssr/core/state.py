"""The per-neuron state of one tracked layer, and how it is saved and restored."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_ssr.core.layers import channel_dim, num_neurons

__all__ = ["LayerState", "STATE_FIELDS", "TARGET_FIELDS"]

#: Per-neuron tensors every tracked layer keeps; all O(neurons), float32.
STATE_FIELDS = ("acc", "activity", "set_point", "norm_target", "task_activity", "task_grad",
                "importance", "anchor", "factor")
#: Per-unit tensors of output layers that count targets (``output_targets``) on top.
TARGET_FIELDS = ("target_acc", "targets", "reach_acc", "reached")
_COUNTERS = ("acc_count", "seen", "task_steps")
_FLAGS = ("has_set_point", "has_norm_target")


class LayerState:
    """The O(neurons) state of one tracked layer.

    Attributes:
        acc: sum of batch activities since the last update.
        activity: long-run activity (bias-corrected moving average, time constant ``tau``).
        set_point: per-neuron target activity (NaN until measured).
        norm_target: per-neuron set point of the incoming-weight norm (NaN until measured).
        task_activity / task_grad: sums over the current task, for importance.
        target_acc / targets: output layers with ``output_targets``: each unit's share of the
            targets since the last flush, and over the current task (reduced across processes).
        reach_acc / reached: the same layers: on how many sensed steps the loss gradient reached
            each unit, since the last flush and over the current task.
        importance: accumulated importance over finished tasks.
        anchor: mean activity on the last finished task (the penalty's reference).
        factor: the last combined scale factor applied (for diagnostics).

    Example:
        >>> st = LayerState("0", nn.Linear(4, 3))
        >>> st.n, st.cdim, st.activity.dtype
        (3, -1, torch.float32)
        >>> sorted(st.state_dict()) == sorted(STATE_FIELDS + ("acc_count", "seen", "task_steps",
        ...                                                   "has_set_point", "has_norm_target"))
        True
    """

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.n = num_neurons(module)
        self.cdim = channel_dim(module)
        dev = module.weight.device
        zeros = lambda: torch.zeros(self.n, dtype=torch.float32, device=dev)  # noqa: E731
        nans = lambda: torch.full((self.n,), math.nan, dtype=torch.float32, device=dev)  # noqa: E731
        self.acc, self.activity, self.task_activity, self.task_grad = zeros(), zeros(), zeros(), zeros()
        self.importance, self.anchor = zeros(), zeros()
        #: Output layers with ``output_targets``: how often each unit was the target, since the last
        #: flush (``target_acc``) and over the current task so far (``targets``, reduced across processes).
        self.target_acc, self.targets = zeros(), zeros()
        #: The same layers: on how many sensed steps the loss gradient reached each unit (nonzero), since
        #: the last flush and over the current task: a head masked to each task's own units reaches no other.
        self.reach_acc, self.reached = zeros(), zeros()
        self.count_targets = False
        self.set_point, self.norm_target = nans(), nans()
        self.factor = torch.ones(self.n, dtype=torch.float32, device=dev)
        self.acc_count = 0
        self.seen = 0
        self.task_steps = 0
        self.has_set_point = False
        self.has_norm_target = False
        self.gate: Optional[Tensor] = None
        #: The protection strength in force on this layer (``consolidation``, or less under
        #: ``min_plasticity``); derived from ``importance``, so not saved.
        self.strength = 0.0
        #: Neurons re-initialized at the last task's end (``recycle_below``), for diagnostics.
        self.recycled = 0
        self.consumer: Optional[tuple[nn.Module, int]] = None
        self.live: Optional[Tensor] = None

    @property
    def device(self) -> torch.device:
        return self.acc.device

    def to(self, device: torch.device) -> None:
        """Move every per-neuron tensor (and the gate) to ``device``."""
        for f in STATE_FIELDS + TARGET_FIELDS:
            setattr(self, f, getattr(self, f).to(device))
        if self.gate is not None:
            self.gate = self.gate.to(device)

    def check_width(self, model: Optional[nn.Module] = None) -> None:
        """Raise if the layer's width changed since its state was made, or (given the ``model``) if the
        model's module of that name was replaced by another."""
        current = model.get_submodule(self.name) if model is not None and self.name else self.module
        if current is not self.module:
            raise ValueError(
                f"SSR tracks layer {self.name!r}, which was replaced by another module since ({type(current).__name__}, "
                f"{num_neurons(current) if hasattr(current, 'weight') else '?'} neurons): use a new SynapticScaling "
                "(or SSREngine) for the changed model")
        width = num_neurons(self.module)
        if width != self.n:
            raise ValueError(
                f"SSR recorded {self.n} neurons for layer {self.name!r}, which now has {width}: a tracked layer's "
                "width cannot change under SSR; use a new SynapticScaling (or SSREngine) for the resized model")

    def tensors(self) -> dict[str, Tensor]:
        """The per-neuron tensors by name (live references, not copies)."""
        return {f: getattr(self, f) for f in STATE_FIELDS + (TARGET_FIELDS if self.count_targets else ())}

    def state_dict(self) -> dict[str, Any]:
        """Copies of every tensor, counter and flag: what resuming needs."""
        return {**{k: v.detach().clone() for k, v in self.tensors().items()},
                **{k: getattr(self, k) for k in _COUNTERS + _FLAGS}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` onto this layer's device, in float32.

        Raises:
            ValueError: the saved state is for a layer of another width (names the layer and both widths).
        """
        fields = tuple(self.tensors())
        state = {**{f: torch.zeros(self.n) for f in TARGET_FIELDS}, **state}  # saved without output_targets
        for f in fields:
            if tuple(state[f].shape) != (self.n,):
                raise ValueError(f"SSR state for layer {self.name!r} holds {state[f].numel()} values of {f!r}, but "
                                 f"the layer has {self.n} neurons: the state is from a model of another width")
        for f in fields:
            setattr(self, f, state[f].detach().clone().to(device=self.device, dtype=torch.float32))
        for k in _COUNTERS:
            setattr(self, k, int(state[k]))
        for k in _FLAGS:
            setattr(self, k, bool(state[k]))
