"""Input-subspace protection: keep each layer's drift off the directions its past inputs used.

A layer's output on an old task's input ``x`` is ``W x``; after later tasks it is ``(A + D) x``,
``A`` the weights at the last task's end (the anchors) and ``D = W - A`` the drift. The drift
changes the old outputs only through its component in the span of the old inputs. In the spirit of
Gradient Projection Memory (Saha et al. 2021), each anchored layer keeps an orthonormal basis ``U``
of the directions that carry ``energy`` of its past tasks' input energy (their uncentered second
moment), and after every optimizer step the drift is taken out of that span:

    W <- W - (W - A) U U^T

so old inputs see the weights they were learned with, while the directions no old input used (and
every synapse within them, whatever its neuron's importance) stay free for the next task. This is
what node importance cannot do where every neuron is shared: a neuron that no past task needed
(one protection leaves free) still cannot change its response to old inputs, which is how free
neurons made SSR forget (see the README, "What SSR does not do yet").

State: the basis, ``in_features x k`` per layer (``k <= in_features``), and, during a task, the sum
of ``x x^T`` over a few input rows of each sensed step (``in_features^2``; reduced across processes
once, at the task's end). A convolution's inputs are its patches (``Conv2d`` with ``groups=1``);
a layer of another type is reported by :meth:`InputSubspace.unsupported` and left out.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_ssr.core.state import LayerState

__all__ = ["InputSubspace", "supports", "input_rows", "top_eigenpairs"]


def supports(module: nn.Module) -> bool:
    """Whether the inputs of ``module`` can be read as rows of its weight's columns: a ``Linear``, or a
    ``Conv2d`` with one group (its patches)."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def input_rows(module: nn.Module, x: Tensor, rows: int) -> Tensor:
    """At most ``rows`` inputs of ``module`` as a float32 ``(n, in)`` matrix whose columns match the
    weight viewed as ``(out, in)`` (a convolution's patches, spread over the batch and positions).

    Example:
        >>> input_rows(nn.Linear(3, 2), torch.ones(5, 3), rows=2).shape
        torch.Size([2, 3])
        >>> input_rows(nn.Conv2d(2, 4, 3, padding=1), torch.ones(1, 2, 5, 5), rows=8).shape
        torch.Size([8, 18])
    """
    x = x.detach()
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        x = x[: max(1, rows // 4)]  # a few images: their patches give the rows
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        x = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        step = max(1, x.shape[0] // rows)
        return x[::step][:rows].float()
    return x.reshape(-1, x.shape[-1])[:rows].float()


def top_eigenpairs(matrix: Tensor, need: float, width: int = 32, power: int = 2) -> tuple[Tensor, Tensor]:
    """Leading eigenvalues (descending, at least 0) and eigenvectors of a symmetric positive
    semi-definite ``matrix``, enough of them that the values sum to ``need`` where they can.

    A randomized subspace iteration (Halko, Martinsson & Tropp 2011) on ``width`` columns, doubled
    until the leading values reach ``need``, and a full eigendecomposition once ``2 * width``
    reaches the size: the few directions a task's inputs concentrate in cost ``size^2 * width``
    instead of ``size^3``. The Ritz values never exceed the true ones, so the directions chosen
    from them hold at least the energy asked for. The start is drawn from a generator of its
    own with a fixed seed: the result is the same on every replica and after a resume, and the
    global random state is not touched.

    Example:
        >>> m = torch.diag(torch.tensor([4.0, 1.0, 0.0, 0.0], dtype=torch.float64))
        >>> values, vectors = top_eigenpairs(m, need=3.0, width=1)  # one direction holds 3 of 5
        >>> values.round(decimals=2).tolist(), vectors[:, 0].abs().round(decimals=2).tolist()  # approximate
        ([4.0], [1.0, 0.0, 0.0, 0.0])
        >>> top_eigenpairs(m, need=5.0, width=1)[0].tolist()  # all of it: the full decomposition
        [4.0, 1.0, 0.0, 0.0]
    """
    size = matrix.shape[0]
    generator = torch.Generator().manual_seed(0)
    while 2 * width < size:
        start = torch.randn(size, width, generator=generator, dtype=matrix.dtype).to(matrix.device)
        span = torch.linalg.qr(matrix @ start).Q
        for _ in range(power):
            span = torch.linalg.qr(matrix @ span).Q
        values, small = torch.linalg.eigh(span.T @ matrix @ span)
        values, vectors = values.flip(0).clamp_min(0.0), span @ small.flip(1)
        if float(values.sum()) >= need:
            return values, vectors
        width *= 2
    values, vectors = torch.linalg.eigh(matrix)
    return values.flip(0).clamp_min(0.0), vectors.flip(1)


class InputSubspace:
    """Per anchored layer, the basis of its past inputs, and the projection of its drift off it.

    Args:
        energy: the share of each past task's input energy whose directions are protected, in
            ``[0, 1)``; ``0`` switches the part off.
        rows: input rows read per layer on each sensed step.

    Example:
        >>> lin = nn.Linear(3, 2, bias=False)
        >>> st, sub = LayerState("0", lin), InputSubspace(energy=0.9)
        >>> sub.observe(st, torch.tensor([[1.0, 0.0, 0.0]] * 4))
        >>> sub.consolidate([st], reduce_fn=None)
        >>> sub.bases["0"].abs().flatten().tolist()  # the first input direction
        [1.0, 0.0, 0.0]
        >>> anchor = lin.weight.detach().clone()
        >>> with torch.no_grad():
        ...     _ = lin.weight.add_(1.0)
        >>> sub.project([st], lambda p: anchor)
        >>> drift = lin.weight - anchor  # along the old input removed, the rest kept
        >>> drift.abs().max(dim=0).values.round(decimals=4).tolist()
        [0.0, 1.0, 1.0]
    """

    def __init__(self, energy: float, rows: int = 32) -> None:
        self.energy = float(energy)
        self.rows = int(rows)
        self.bases: dict[str, Tensor] = {}  # per layer name: (in, k), orthonormal columns
        self._sums: dict[str, Tensor] = {}  # this task: sum of x x^T over the rows read
        self._counts: dict[str, int] = {}
        self._held: dict[str, tuple[Tensor, Tensor, Tensor]] = {}  # per layer: anchor, basis, A U
        #: Per layer name: which units' incoming drift is projected (all where absent).
        self.units: dict[str, Tensor] = {}
        self._unit_weights: dict[str, Tensor] = {}  # the masks as (out, 1) weights on the weight's device

    @property
    def enabled(self) -> bool:
        return self.energy > 0

    def check(self, states: Iterable[LayerState]) -> None:
        """Warn, naming them, about the layers whose inputs this part cannot read (left to anchoring alone)."""
        left = [st.name for st in states if not supports(st.module)]
        if self.enabled and left:
            warnings.warn(f"subspace_energy: layers {left} are neither Linear nor one-group Conv2d; their drift "
                          "is not projected (node-importance anchoring still holds them)", stacklevel=3)

    def observe(self, st: LayerState, x: Tensor) -> None:
        """A sensed training forward: add a few of the layer's input rows to this task's sum."""
        name, module = st.name, st.module
        if not supports(module):
            return
        rows = input_rows(module, x, self.rows)
        outer = rows.T @ rows
        if name in self._sums:
            self._sums[name].add_(outer)
        else:
            self._sums[name] = outer
        self._counts[name] = self._counts.get(name, 0) + rows.shape[0]

    def consolidate(self, states: Iterable[LayerState], reduce_fn: Optional[Callable[[Tensor], Tensor]],
                    units: Optional[Mapping[str, Tensor]] = None) -> None:
        """End of a task: extend each layer's basis until it holds ``energy`` of the task's input
        energy (what the basis already holds counts), and start the next task's sums.

        Args:
            states: the layers.
            reduce_fn: sums a flat tensor across processes (``None`` on one process).
            units: per layer name, which of its units (rows of the weight) have their incoming
                drift projected from now on (a boolean per unit); the layers not named project
                every unit. A unit beyond the mask's length (a head that grew) is left free.
        """
        self.units = {n: m.detach().to("cpu", torch.bool).clone() for n, m in (units or {}).items()}
        names = [st.name for st in states if st.name in self._sums and self._counts[st.name] > 0]
        if names:
            means = [self._sums[n] / self._counts[n] for n in names]
            flat = torch.cat([m.flatten() for m in means])
            if reduce_fn is not None:
                flat = reduce_fn(flat)  # one collective: every replica extends the same bases
            offset = 0
            for n, m in zip(names, means):
                second = flat[offset:offset + m.numel()].view_as(m).detach().double().cpu()
                offset += m.numel()
                self.bases[n] = self._extend(self.bases.get(n), second)
        self._sums, self._counts, self._held, self._unit_weights = {}, {}, {}, {}

    def _extend(self, basis: Optional[Tensor], second: Tensor) -> Tensor:
        total = float(torch.trace(second))
        if basis is None:
            basis = second.new_zeros((second.shape[0], 0))
        basis = basis.double()
        need = self.energy * total - float(torch.trace(basis.T @ second @ basis))
        if total <= 0 or need <= 0 or basis.shape[1] == second.shape[0]:
            return basis.float()
        rest = second - basis @ (basis.T @ second)
        rest = rest - (rest @ basis) @ basis.T  # the second moment outside the basis
        values, vectors = top_eigenpairs(0.5 * (rest + rest.T), need)
        k = int((torch.cumsum(values, 0) < need).sum()) + 1
        k = min(k, values.shape[0], second.shape[0] - basis.shape[1])
        new = vectors[:, :k] - basis @ (basis.T @ vectors[:, :k])  # orthogonal to the basis to rounding
        return torch.cat([basis, torch.linalg.qr(new).Q], dim=1).float()

    def project(self, states: Iterable[LayerState], anchor_of: Callable[[nn.Parameter], Optional[Tensor]]) -> None:
        """``W <- W - (W - A) U U^T`` in place, for each layer with a basis and an anchor ``A`` of its weight.

        Computed as ``W - (W U - A U) U^T`` with ``A U`` kept from the first call after the anchors
        or the basis change: one read of ``W`` and one fused update, the cost of two thin matrix
        products (``out x in x k``).
        """
        if not self.enabled:
            return
        with torch.no_grad():
            for st in states:
                weight, basis = st.module.weight, self.bases.get(st.name)
                anchor = anchor_of(weight)
                if basis is None or basis.shape[1] == 0 or anchor is None or anchor.shape != weight.shape:
                    continue
                if basis.device != weight.device or basis.dtype != weight.dtype:
                    basis = self.bases[st.name] = basis.to(device=weight.device, dtype=weight.dtype)
                held = self._held.get(st.name)
                if held is None or held[0] is not anchor or held[1] is not basis:
                    held = self._held[st.name] = (anchor, basis, anchor.reshape(weight.shape[0], -1) @ basis)
                mask = self._unit_weight(st.name, weight)
                if weight.is_contiguous():
                    w = weight.view(weight.shape[0], -1)
                    drift = w @ basis - held[2]
                    w.addmm_(drift if mask is None else drift.mul_(mask), basis.T, alpha=-1.0)
                else:  # e.g. a channels_last convolution: the same update through a copy of its rows
                    w = weight.reshape(weight.shape[0], -1)
                    drift = w @ basis - held[2]
                    weight.sub_(((drift if mask is None else drift.mul_(mask)) @ basis.T).view(weight.shape))

    def _unit_weight(self, name: str, weight: Tensor) -> Optional[Tensor]:
        """``units[name]`` as a ``(out, 1)`` tensor of 0 and 1 on the weight's device (``None``: every unit)."""
        units = self.units.get(name)
        if units is None:
            return None
        cached = self._unit_weights.get(name)
        if cached is None or cached.shape[0] != weight.shape[0] or cached.device != weight.device or cached.dtype != weight.dtype:
            full = torch.zeros(weight.shape[0], 1, dtype=weight.dtype)
            n = min(units.numel(), weight.shape[0])
            full[:n, 0] = units[:n].to(weight.dtype)
            cached = self._unit_weights[name] = full.to(weight.device)
        return cached

    def nbytes(self) -> int:
        """Bytes held: the bases, this task's sums, each layer's ``A U`` and the unit masks."""
        held = [h[2] for h in self._held.values()] + list(self.units.values())
        return sum(t.numel() * t.element_size() for t in [*self.bases.values(), *self._sums.values(), *held])

    def state_dict(self) -> dict[str, Any]:
        return {"bases": {n: t.detach().cpu().clone() for n, t in self.bases.items()},
                "sums": {n: t.detach().cpu().clone() for n, t in self._sums.items()},
                "counts": dict(self._counts), "units": {n: t.clone() for n, t in self.units.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.bases = {n: t.clone() for n, t in state.get("bases", {}).items()}
        self._sums = {n: t.clone() for n, t in state.get("sums", {}).items()}
        self._counts = {n: int(c) for n, c in state.get("counts", {}).items()}
        self.units = {n: t.to(torch.bool).clone() for n, t in state.get("units", {}).items()}
        self._held, self._unit_weights = {}, {}
