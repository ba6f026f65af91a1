"""Node-importance anchoring: pull synapses back toward their values at the last task's end.

Gating an update (``protection="update"``) slows every synapse of an important neuron, so where
every neuron serves every task (Permuted streams) a new task is learned slowly. Anchoring, in the
spirit of UCL (Ahn et al. 2019), lets the optimizer move every synapse at full speed and, after
each step, pulls it back toward where the finished tasks left it, by a fraction that grows with the
importance of the neurons it connects:

    p <- p + anchor_rate * (1 - gate) * (anchor - p)

where ``gate = 1 / (1 + lambda * importance)`` is the same per-synapse plasticity that update
gating uses (so incoming, outgoing and output synapses are weighted as there). A synapse settles
where the task's gradient and the pull balance, as under a quadratic penalty, but the pull is
applied in place after the step (decoupled, as AdamW decouples weight decay), so it also works
where the front end cannot change the loss. It costs one copy of the gated weights (half of EWC's
state), saved in the engine's ``state_dict``.

Adam moves a weight by about the learning rate per step, so a synapse settles about
``lr / (anchor_rate * (1 - gate))`` from its anchor: at a small learning rate a fixed pull holds the
new task's learning ever closer to the old weights. Below a reference learning rate (``anchor_lr``)
the pull therefore shrinks in proportion to the learning rate, as AdamW's decoupled weight decay
does; at or above it the pull stays ``anchor_rate``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_ssr.core.protection import as_view

__all__ = ["Anchoring", "lr_factor"]

#: ``(parameter, view shape or None, combined gate)`` as :class:`~lightning_ssr.core.protection.Protection` caches it.
CacheEntry = tuple[nn.Parameter, Optional[tuple[int, ...]], Tensor]


def lr_factor(lr: float, reference_lr: float) -> float:
    """How much of ``anchor_rate`` the pull keeps at learning rate ``lr``: ``min(lr / reference_lr, 1)``.

    Example:
        >>> lr_factor(1e-4, 1e-3), lr_factor(3e-3, 1e-3)
        (0.1, 1.0)
    """
    return min(lr / reference_lr, 1.0)


class Anchoring:
    """One anchor per gated parameter, and the pull toward it after every optimizer step.

    Args:
        rate: ``anchor_rate``, the fraction of the distance to the anchor removed per step from a
            fully protected synapse (gate 0); ``0`` switches anchoring off.
        reference_lr: ``anchor_lr``: below this learning rate the pull shrinks in proportion
            (``rate * lr / reference_lr``); at or above it the pull is ``rate``. ``None``: ``rate``
            whatever the learning rate.

    Example:
        >>> lin = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = lin.weight.fill_(1.0)
        >>> cache = [(lin.weight, (1, -1), torch.tensor([[0.5]]))]
        >>> anchoring = Anchoring(rate=0.2)
        >>> anchoring.set_anchors([lin.weight])
        >>> with torch.no_grad():
        ...     _ = lin.weight.fill_(2.0)
        >>> anchoring.pull(cache)
        >>> lin.weight  # 2 + 0.2 * (1 - 0.5) * (1 - 2)
        Parameter containing:
        tensor([[1.9000, 1.9000]], requires_grad=True)
    """

    def __init__(self, rate: float, reference_lr: Optional[float] = None) -> None:
        self.rate = float(rate)
        self.reference_lr = None if reference_lr is None else float(reference_lr)
        self._anchors: dict[int, Tensor] = {}
        self._scales: dict[int, float] = {}  # per parameter id, a factor on its pull (1 where absent)
        #: Per parameter id, ``min(lr / reference_lr, 1)`` of its group at the last pull (1 where absent).
        self.lr_factors: dict[int, float] = {}
        #: What :meth:`pull` was derived from (the steps and the learning-rate factors), and per cached
        #: parameter its storage, gate and scale, and its view, its anchor's view and its pull weights.
        self._plan: Optional[tuple[tuple[int, tuple[float, ...]], list[Any], list[Any]]] = None

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def set_anchors(self, params: Iterable[nn.Parameter]) -> None:
        """End of a task: the gated parameters' current values become their anchors."""
        if not self.enabled:
            return
        self._anchors = {id(p): p.detach().clone(memory_format=torch.contiguous_format) for p in params}
        self._plan = None

    def set_scales(self, scales: Mapping[int, float]) -> None:
        """Scale the pull of each parameter (by ``id``) by a factor ``s`` in ``[0, 1]`` (``1`` for those not
        named), e.g. by its layer's input overlap (``overlap_power``); :meth:`pull` derives a
        parameter's weights again only when its own factor changed.

        Below ``reference_lr``, where input-subspace protection's projection also removes only
        ``f = lr / reference_lr`` of the drift per step, the scale lifts the pull only as far:
        ``s + (1 - f) (1 - s)`` (``s`` at or above it, ``1`` as ``f`` goes to 0)."""
        self._scales = {i: float(v) for i, v in scales.items() if float(v) != 1.0}

    def pull(self, cache: Iterable[CacheEntry], optimizer: Optional[torch.optim.Optimizer] = None,
             steps: int = 1) -> None:
        """After an optimizer step: ``p <- p + rate * factor * scale * (1 - gate) * (anchor - p)``, in place
        (``scale`` from :meth:`set_scales`, lifted less below ``reference_lr``).

        Args:
            cache: the gated parameters with their gates.
            optimizer: with a ``reference_lr``, the optimizer that took the step: each parameter's
                ``factor = min(lr / reference_lr, 1)`` from its parameter group, so below the
                reference the pull shrinks with the learning rate as AdamW's decoupled weight decay
                does, and above it stays ``rate``. Without a ``reference_lr``, ``factor = 1``.
            steps: how many steps' pulls this one applies (``protect_every``): the fraction
                removed is ``1 - (1 - w) ** steps`` for a per-step fraction ``w``, the distance
                that many pulls in a row remove.

        Raises:
            ValueError: with a ``reference_lr`` but no ``optimizer``.
        """
        if not self.enabled or not self._anchors:
            return
        self.check(optimizer)
        cache = list(cache)
        # the learning rates enter through their factors only: a schedule above ``reference_lr`` derives nothing again
        settings = (steps, () if self.reference_lr is None else
                    tuple(lr_factor(float(g["lr"]), self.reference_lr) for g in optimizer.param_groups))
        if self._plan is None or self._plan[0] != settings or len(self._plan[1]) != len(cache):
            self._plan = (settings, [None] * len(cache), [None] * len(cache))
        keys, entries = self._plan[1], self._plan[2]
        for i, (p, shape, gate) in enumerate(cache):  # derive again only what changed (the output gates, a scale)
            scale = self._scales.get(id(p), 1.0)
            if keys[i] is None or keys[i][0] != p.data_ptr() or keys[i][1] is not gate or keys[i][2] != scale:
                keys[i], entries[i] = (p.data_ptr(), gate, scale), self._entry(p, shape, gate, optimizer, steps)
        with torch.no_grad():
            for entry in entries:
                if entry is not None:
                    entry[0].lerp_(entry[1], entry[2])

    def _entry(self, p: nn.Parameter, shape: Optional[tuple[int, ...]], gate: Tensor,
               optimizer: Optional[torch.optim.Optimizer], steps: int) -> Optional[tuple[Tensor, Tensor, Tensor]]:
        """``p``'s view for its gate, its anchor's view (on ``p``'s device) and its pull weights
        ``1 - (1 - rate * factor * scale * (1 - gate)) ** steps`` (``None`` where ``p`` has no anchor);
        records ``factor`` in :attr:`lr_factors`."""
        anchor = self._anchors.get(id(p))
        if anchor is None:
            return None
        if anchor.device != p.device:
            anchor = self._anchors[id(p)] = anchor.to(p.device)
        factor = 1.0
        if self.reference_lr is not None:
            group = next((g for g in optimizer.param_groups if any(q is p for q in g["params"])), None)
            lr = self.reference_lr if group is None else float(group["lr"])
            factor = lr_factor(lr, self.reference_lr)  # the factor the plan's settings hold for p's group
        self.lr_factors[id(p)] = factor
        scale = self._scales.get(id(p), 1.0)
        scale += (1.0 - factor) * (1.0 - scale)  # below the reference the projection acts less: so does the lift
        w = (self.rate * factor * scale) * (1.0 - gate)
        return as_view(p, shape), as_view(anchor, shape), w if steps == 1 else 1.0 - (1.0 - w) ** steps

    def check(self, optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Refuse a missing ``optimizer`` where the pull needs its learning rates (the engine checks on
        every step, also those that do not pull, so the error comes at the first protected step).

        Raises:
            ValueError: with a ``reference_lr`` and anchors set but no ``optimizer``.
        """
        if self.enabled and self._anchors and self.reference_lr is not None and optimizer is None:
            raise ValueError(
                f"`anchor_lr={self.reference_lr:g}` scales the anchoring pull with the learning rate, but no "
                "optimizer was given: call SSREngine.after_step(optimizer), or set SSRConfig(anchor_lr=None) "
                "for a pull of anchor_rate per step whatever the learning rate"
            )

    def lr_factor_of(self, p: nn.Parameter) -> float:
        """``min(lr / reference_lr, 1)`` of ``p``'s group at the last pull (``1`` before any, or without a
        ``reference_lr``): input-subspace protection scales its projection by it as the pull is scaled."""
        return self.lr_factors.get(id(p), 1.0)

    def anchor_of(self, p: nn.Parameter) -> Optional[Tensor]:
        """The anchor of ``p`` (``None`` where it has none)."""
        return self._anchors.get(id(p))

    def nbytes(self) -> int:
        """Bytes held by the anchors (one copy of the gated weights)."""
        return sum(t.numel() * t.element_size() for t in self._anchors.values())

    def state_dict(self, names: Mapping[int, str]) -> dict[str, Tensor]:
        """The anchors by parameter name (``names`` maps ``id(p)`` to the model's name for ``p``)."""
        return {names[i]: t.detach().clone() for i, t in self._anchors.items() if i in names}

    def load_state_dict(self, state: Mapping[str, Any], params: Mapping[str, nn.Parameter]) -> None:
        """Restore anchors saved by :meth:`state_dict` onto the parameters named in ``params``."""
        missing = sorted(set(state) - set(params))
        if missing:
            raise ValueError(f"SSR anchors saved for parameters {missing}, which this model does not have")
        self._anchors = {id(params[n]): t.detach().clone().to(device=params[n].device, dtype=params[n].dtype)
                         for n, t in state.items()}
        self._plan = None
