"""Protection of important neurons' synapses on the update path (part 5, gradient side).

Every gated parameter gets one broadcastable gate: a tracked layer's incoming weights and bias by
its neurons' plasticity ``1 / (1 + lambda * importance)``; a tracked consumer's input columns by
its producer's neurons; the output layer's synapses by the importance of both their ends. The
gate multiplies either the gradient (``protection="gradient"``) or the optimizer's update
(``protection="update"``: ``p <- old + gate * (p - old)``, which also holds under Adam).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
from torch import Tensor, nn

from lightning_ssr.core import rules
from lightning_ssr.core.capacity import adaptive_strength
from lightning_ssr.core.config import SSRConfig
from lightning_ssr.core.state import LayerState

__all__ = ["GateView", "Protection", "as_view"]

#: How one gate acts on a parameter: ``("rows" | "cols" | "hebb", producer, output layer)``.
GateView = tuple[str, LayerState, Optional[LayerState]]


class Protection:
    """The gates on the parameters of one engine's model, and their application each step.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> st = LayerState("0", net[0])
        >>> st.importance.fill_(1.0)
        tensor([1., 1.])
        >>> prot = Protection(SSRConfig(consolidation=1.0, protection="gradient", min_plasticity=0.0))
        >>> prot.refresh({"0": st}, {}, consolidated=set(), protecting=True)
        >>> net(torch.ones(1, 3)).sum().backward()
        >>> g = net[0].weight.grad.clone()
        >>> prot.before_step()
        >>> torch.allclose(net[0].weight.grad, g / 2)
        True
    """

    def __init__(self, config: SSRConfig) -> None:
        self.config = config
        self._snapshots: dict[int, Tensor] = {}  # reused buffers: large fresh CPU allocations page-fault
        self._snapped: list[tuple[nn.Parameter, Optional[tuple[int, ...]], Tensor]] = []  # this step's entries
        #: Per gated parameter: its view shape and combined gate, rebuilt only when gates change.
        self._cache: list[tuple[nn.Parameter, Optional[tuple[int, ...]], Tensor]] = []
        self.gated: list[tuple[nn.Parameter, list[GateView]]] = []

    def refresh(self, layers: dict[str, LayerState], outputs: dict[str, LayerState],
                consolidated: set[int], protecting: bool) -> None:
        """New importance: recompute every neuron's gate, then the gated parameters."""
        cfg = self.config
        for st in layers.values():
            st.strength = adaptive_strength(st.importance, cfg.consolidation, cfg.min_plasticity)
            st.gate = rules.protection_gate(st.importance, st.strength)
        self.build(layers, outputs, consolidated, protecting)

    def build(self, layers: dict[str, LayerState], outputs: dict[str, LayerState],
              consolidated: set[int], protecting: bool) -> None:
        """List, per parameter, the gates acting on it, and cache each combined gate.

        A tracked layer's incoming weights and bias are gated by its neurons (``rows``); the
        weights of a tracked consumer by its producer's neurons too (``cols``); the output layer's
        weights (``protect_output``) by pre- and post-synaptic importance together (``hebb``), so
        that synapses into output units that past tasks never used (new classes) stay plastic.
        Parameters created after the last consolidation (not in ``consolidated``: a new task's
        head) are never gated.
        """
        groups: dict[int, tuple[nn.Parameter, list[GateView]]] = {}

        def add(p: Optional[nn.Parameter], kind: str, st: LayerState, other: Optional[LayerState] = None) -> None:
            if p is None or not p.requires_grad:
                return
            groups.setdefault(id(p), (p, []))[1].append((kind, st, other))

        tracked = {id(st.module): st for st in layers.values()}
        outs = {id(st.module): st for st in outputs.values()}
        for st in layers.values():
            add(st.module.weight, "rows", st)
            add(getattr(st.module, "bias", None), "rows", st)
            if st.consumer is None or not self.config.gate_outgoing:
                continue
            cons = st.consumer[0]
            if id(cons.weight) not in consolidated:
                continue
            if id(cons) in tracked:
                add(cons.weight, "cols", st)
            elif id(cons) in outs:
                add(cons.weight, "hebb", st, outs[id(cons)])
        self.gated = list(groups.values())
        self._cache = []
        if protecting and all(st.gate is not None for st in layers.values()):
            for p, views in self.gated:
                shape, gate = self.gate_of(p, views)
                self._cache.append((p, shape, gate.to(device=p.device, dtype=p.dtype)))

    def gate_of(self, p: nn.Parameter, views: list[GateView]) -> tuple[Optional[tuple[int, ...]], Tensor]:
        """One combined gate for ``p``, and the shape to view ``p`` as for it to broadcast (``None``:
        the gate broadcasts over ``p`` itself, which then needs no view, so a non-contiguous weight
        such as a ``channels_last`` convolution's works as is)."""
        if all(kind == "rows" for kind, _, _ in views):
            st = views[0][1]
            return None, st.gate.view(st.n, *([1] * (p.dim() - 1)))
        producer = next(st for kind, st, _ in views if kind != "rows")
        gate = torch.ones((p.shape[0], producer.n, 1), dtype=torch.float32, device=producer.gate.device)
        for kind, st, other in views:
            if kind == "rows":
                gate = gate * st.gate.view(-1, 1, 1)
            elif kind == "cols":
                gate = gate * st.gate.view(1, -1, 1)
            else:  # hebb: a synapse between an important output unit and an important neuron
                post = other.importance
                if self.config.output_targets and float(other.targets.sum()) > 0:
                    # protected only as much as the current task trains toward the unit
                    post = post * (other.targets / other.targets.max())
                post = post.view(-1, 1, 1)
                gate = gate / (1.0 + st.strength * post * st.importance.view(1, -1, 1))
        if p.dim() >= 2 and p.shape[1] == producer.n:  # one input channel per producer neuron
            return None, gate.view(p.shape[0], producer.n, *([1] * (p.dim() - 2)))
        return (p.shape[0], producer.n, -1), gate  # inputs are the producer's channels x positions

    def refresh_output_gates(self) -> None:
        """New target shares on the output layer (``output_targets``): recompute only the gates of
        the synapses into it (the other gates depend on importance, which changes at task ends)."""
        for i, (p, views) in enumerate(self.gated if self._cache else ()):
            if any(kind == "hebb" for kind, _, _ in views):
                shape, gate = self.gate_of(p, views)
                self._cache[i] = (p, shape, gate.to(device=p.device, dtype=p.dtype))

    @property
    def cache(self) -> list[tuple[nn.Parameter, Optional[tuple[int, ...]], Tensor]]:
        """Per gated parameter: its view shape (``None``: none needed) and combined gate (empty while
        not protecting)."""
        return self._cache

    def moved(self) -> bool:
        """Whether the model moved to another device since the gates were cached."""
        return any(gate.device != p.device for p, _, gate in self._cache)

    def before_step(self) -> None:
        """Gradients final: divide protected gradients, or snapshot the weights to be updated."""
        with torch.no_grad():
            if self.config.protection == "gradient":
                for p, shape, gate in self._cache:
                    if p.grad is not None:
                        as_view(p.grad, shape).mul_(gate)
            elif self.config.protection == "update":
                self._snapped = []
                for entry in self._cache:
                    p = entry[0]
                    if p.grad is None:
                        continue
                    buf = self._snapshots.get(id(p))
                    if buf is None or buf.shape != p.shape or buf.device != p.device or buf.dtype != p.dtype:
                        buf = self._snapshots[id(p)] = torch.empty_like(p, memory_format=torch.contiguous_format)
                    buf.copy_(p.detach())
                    self._snapped.append(entry)

    def after_step(self) -> None:
        """``p <- old + gate * (p - old)`` in one fused ``lerp`` per snapshotted parameter."""
        if not self._snapped:
            return
        with torch.no_grad():
            for p, shape, gate in self._snapped:
                old = self._snapshots[id(p)]
                torch.lerp(as_view(old, shape), as_view(p, shape), gate, out=as_view(p, shape))
        self._snapped = []

    def release(self) -> None:
        """Drop the snapshot buffers (when the engine detaches)."""
        self._snapshots.clear()
        self._snapped = []

    def parameters(self) -> Iterable[nn.Parameter]:
        """The parameters whose gradients or updates are gated."""
        return (p for p, _ in self.gated)


def as_view(t: Tensor, shape: Optional[tuple[int, ...]]) -> Tensor:
    """``t`` viewed as ``shape`` for a gate to broadcast, or ``t`` itself when ``shape`` is ``None``.

    Example:
        >>> as_view(torch.zeros(2, 6), (2, 3, -1)).shape, as_view(torch.zeros(2, 6), None).shape
        (torch.Size([2, 3, 2]), torch.Size([2, 6]))
    """
    return t if shape is None else t.view(shape)
