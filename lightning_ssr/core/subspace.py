"""Input-subspace protection: keep each layer's drift off the directions its past inputs used.

A layer's output on an old task's input ``x`` is ``W x``; after later tasks it is ``(A + D) x``,
``A`` the weights at the last task's end (the anchors) and ``D = W - A`` the drift. The drift
changes the old outputs only through its component in the span of the old inputs. In the spirit of
Gradient Projection Memory (Saha et al. 2021), each anchored layer keeps an orthonormal basis ``U``
of the directions that carry ``energy`` of its past tasks' input energy (their uncentered second
moment), and after every optimizer step the drift is taken out of that span:

    W <- W - (W - A) U U^T

so old inputs see the weights they were learned with, while the directions no old input used (and
every synapse within them, whatever its neuron's importance) stay free for the next task. Below the
anchoring's reference learning rate (``anchor_lr``) the step removes only ``f = lr / anchor_lr`` of
that drift, ``W <- W - f (W - A) U U^T``, as the pull shrinks there: at a small learning rate the full
projection held a class-incremental stream's old output units up while the new ones grew too slowly. This is
what node importance cannot do where every neuron is shared: a neuron that no past task needed
(one protection leaves free) still cannot change its response to old inputs, which is how free
neurons made SSR forget (see the README, "What SSR does not do yet").

State: the basis, ``in_features x k`` per layer (``k <= in_features``), and, during a task, a
Nystrom sketch of the task's input moment ``S`` (Tropp, Yurtsever, Udell & Cevher 2017): ``S Omega``
for a fixed random ``Omega`` of ``sketch`` columns in the span no past input used, ``in_features x
sketch`` floats, with the exact input energy and the energy inside the basis beside it. The sketch
is linear in the inputs, so one sum across processes at the task's end merges it, and the state
stays ``O(in_features)`` per layer where the full moment would be ``in_features^2`` (nine times a
3x3 convolution's weight). From it, the task's leading new directions: at most ``sketch`` a task.
A convolution's inputs are its patches (``Conv2d`` with ``groups=1``); a layer of another type is
reported by :meth:`InputSubspace.check` and left out.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_ssr.core.state import LayerState

__all__ = ["InputSubspace", "supports", "input_rows", "nystrom_eigenpairs", "sketch_matrix"]


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


def sketch_matrix(size: int, width: int, basis: Optional[Tensor]) -> Tensor:
    """The sketch's ``Omega``: ``width`` orthonormal columns drawn with a fixed seed and taken out of
    the span of ``basis`` (``size x k``), float64 on the CPU; fewer columns where less room is left.

    The draw uses a generator of its own, so every replica and every resume draws the same matrix
    and the global random state is not touched.

    Example:
        >>> omega = sketch_matrix(5, 2, torch.eye(5, 1, dtype=torch.float64))
        >>> omega.shape, float(omega[0].abs().max()) < 1e-12  # orthogonal to the basis
        (torch.Size([5, 2]), True)
    """
    room = size - (0 if basis is None else basis.shape[1])
    width = max(0, min(width, room))
    if basis is None or not basis.shape[1]:
        return _orthonormal_draw(size, width).clone()
    draw, b = _draw(size, width), basis.double().cpu()
    draw = draw - b @ (b.T @ draw)
    draw = draw - b @ (b.T @ draw)  # twice: orthogonal to rounding
    return torch.linalg.qr(draw).Q


@functools.lru_cache(maxsize=64)
def _draw(size: int, width: int) -> Tensor:
    """The fixed Gaussian draw behind :func:`sketch_matrix` (seeded by ``size``), made once per shape:
    drawing it costs more than the rest of a task's ``Omega`` (never written to)."""
    return torch.randn(size, width, generator=torch.Generator().manual_seed(size), dtype=torch.float64)


@functools.lru_cache(maxsize=64)
def _orthonormal_draw(size: int, width: int) -> Tensor:
    """:func:`_draw` made orthonormal: a first task's ``Omega`` (no basis yet), made once per shape."""
    return torch.linalg.qr(_draw(size, width)).Q


def nystrom_eigenpairs(sketch: Tensor, omega: Tensor) -> tuple[Tensor, Tensor]:
    """Leading eigenvalues (descending, at least 0) and eigenvectors of a positive semi-definite
    ``S`` from its sketch ``Y = S Omega``: the stable Nystrom approximation of Tropp et al. (2017,
    algorithm 3), float64.

    Example:
        >>> s = torch.diag(torch.tensor([4.0, 1.0, 0.0, 0.0], dtype=torch.float64))
        >>> omega = sketch_matrix(4, 3, None)
        >>> values, vectors = nystrom_eigenpairs(s @ omega, omega)
        >>> values.round(decimals=4).tolist(), vectors[:, 0].abs().round(decimals=4).tolist()
        ([4.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0])
    """
    if omega.shape[1] == 0:
        return sketch.new_zeros(0), sketch.new_zeros((sketch.shape[0], 0))
    def shifted_core(shift: float) -> tuple[Tensor, Tensor]:  # Y + shift Omega, and Omega^T of it made symmetric
        shifted = sketch + shift * omega
        core = omega.T @ shifted
        return shifted, 0.5 * (core + core.T)

    # the sketch was summed in float32: a shift at its rounding keeps the core positive definite
    shift = torch.finfo(torch.float32).eps * max(float(torch.linalg.norm(sketch)), 1e-30) * sketch.shape[0] ** 0.5
    shifted, core = shifted_core(shift)
    chol, info = torch.linalg.cholesky_ex(core)
    if int(info) != 0:  # not positive definite to rounding: a larger shift
        shift += float(torch.linalg.eigvalsh(core)[0].abs()) + shift
        shifted, core = shifted_core(shift)
        chol = torch.linalg.cholesky(core)
    factor = torch.linalg.solve_triangular(chol, shifted.T, upper=False).T  # Y_shift C^-T
    vectors, singular, _ = torch.linalg.svd(factor, full_matrices=False)
    return (singular.square() - shift).clamp_min(0.0), vectors


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
        >>> sub.bases["0"].abs().flatten().round(decimals=6).tolist()  # the first input direction
        [1.0, 0.0, 0.0]
        >>> anchor = lin.weight.detach().clone()
        >>> with torch.no_grad():
        ...     _ = lin.weight.add_(1.0)
        >>> sub.project([st], lambda p: anchor)
        >>> drift = lin.weight - anchor  # along the old input removed, the rest kept
        >>> drift.abs().max(dim=0).values.round(decimals=4).tolist()
        [0.0, 1.0, 1.0]
    """

    def __init__(self, energy: float, rows: int = 32, sketch: int = 64) -> None:
        self.energy = float(energy)
        self.rows = int(rows)
        self.sketch = int(sketch)
        self.bases: dict[str, Tensor] = {}  # per layer name: (in, k), orthonormal columns
        self._sketches: dict[str, Tensor] = {}  # this task: sum of x^T (x Omega) over the rows read, (in, sketch)
        self._energies: dict[str, Tensor] = {}  # this task: sums of |x|^2 and of |x U|^2 (inside the basis)
        self._counts: dict[str, int] = {}
        self._omegas: dict[str, Tensor] = {}  # this task's Omega per layer (derived from the basis)
        #: The layers' keys (weight storage, anchor) and, per layer to project, what :meth:`project` uses.
        self._plan: Optional[tuple[list[tuple[int, Optional[Tensor]]], list[tuple]]] = None
        #: Per layer name: which units' incoming drift is projected (all where absent).
        self.units: dict[str, Tensor] = {}

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
        """A sensed training forward: add a few of the layer's input rows to this task's sketch."""
        name, module = st.name, st.module
        if not supports(module):
            return
        rows = input_rows(module, x, self.rows)
        with torch.autocast(rows.device.type, enabled=False):  # float32 sums under mixed precision too
            rows = torch.nan_to_num(rows, nan=0.0, posinf=0.0, neginf=0.0)  # a diverged value adds nothing
            omega = self._omegas.get(name)
            if omega is None or omega.device != rows.device:
                omega = self._omegas[name] = self._omega(name, rows.shape[1]).to(rows.device)
            basis = self.bases.get(name)
            flat = rows.flatten()
            if basis is not None and basis.shape[1]:
                if basis.device != rows.device or basis.dtype != rows.dtype:
                    basis = basis.to(device=rows.device, dtype=rows.dtype)
                along = (rows @ basis).flatten()
                energy = torch.stack([flat.dot(flat), along.dot(along)])
            else:
                energy = torch.stack([flat.dot(flat), flat.new_zeros(())])
            if name in self._sketches:
                self._sketches[name].addmm_(rows.T, rows @ omega)
                self._energies[name].add_(energy)
            else:
                self._sketches[name] = rows.T @ (rows @ omega)
                self._energies[name] = energy
        self._counts[name] = self._counts.get(name, 0) + rows.shape[0]

    def task_energies(self) -> tuple[list[str], Optional[Tensor]]:
        """This task's input energy so far, per layer with a basis: the layers' names and one flat
        float32 tensor of ``[total, inside the basis]`` per layer (``None`` where there is none yet),
        for :meth:`overlaps` once summed across processes.

        Example:
            >>> lin = nn.Linear(2, 1)
            >>> st, sub = LayerState("0", lin), InputSubspace(energy=0.5)
            >>> sub.observe(st, torch.tensor([[1.0, 0.0]]))
            >>> sub.consolidate([st], reduce_fn=None)
            >>> sub.observe(st, torch.tensor([[1.0, 1.0]]))  # half of its energy along the first input
            >>> sub.task_energies()
            (['0'], tensor([2., 1.]))
        """
        names = [n for n, basis in self.bases.items() if basis.shape[1] and n in self._energies]
        if not names:
            return [], None
        device = self._energies[names[0]].device
        return names, torch.cat([self._energies[n].to(device) for n in names]).float()

    def overlaps(self, names: list[str], energies: Tensor, power: float = 1.0) -> dict[str, float]:
        """Per layer, how far this task's inputs fall where the past tasks' inputs did: the share of their
        energy inside the basis over the share the basis was built to hold (``energy``), at most ``1``,
        to the power ``power``, rounded to two decimals (what it scales is derived again only when it
        moves); from :meth:`task_energies` (summed across processes).

        Example:
            >>> sub = InputSubspace(energy=0.6)
            >>> sub.overlaps(["a", "b", "c"], torch.tensor([10.0, 3.0, 10.0, 9.0, 0.0, 0.0]), power=3.0)
            {'a': 0.12, 'b': 1.0, 'c': 1.0}
        """
        pairs = energies.view(-1, 2).tolist()
        return {n: round((1.0 if total <= 0 else min(1.0, inside / total / self.energy)) ** power, 2)
                for n, (total, inside) in zip(names, pairs)}

    def _omega(self, name: str, size: int) -> Tensor:
        """This task's ``Omega`` for a layer of ``size`` inputs, outside its basis, in the float32 the
        sketch is summed with (so a resumed task rebuilds the very matrix its sketch used)."""
        return sketch_matrix(size, self.sketch, self.bases.get(name)).float()

    def consolidate(self, states: Iterable[LayerState], reduce_fn: Optional[Callable[[Tensor], Tensor]],
                    units: Optional[Mapping[str, Tensor]] = None) -> None:
        """End of a task: extend each layer's basis until it holds ``energy`` of the task's input
        energy (what the basis already holds counts), and start the next task's sketches.

        Args:
            states: the layers.
            reduce_fn: sums a flat tensor across processes (``None`` on one process).
            units: per layer name, which of its units (rows of the weight) have their incoming
                drift projected from now on (a boolean per unit); the layers not named project
                every unit. A unit beyond the mask's length (a head that grew) is left free.
        """
        if not self.enabled:
            return
        self.units = {n: m.detach().to("cpu", torch.bool).clone() for n, m in (units or {}).items()}
        names = [st.name for st in states if self._counts.get(st.name, 0) > 0]
        if names:
            flat = torch.cat([torch.cat([self._sketches[n].flatten(), self._energies[n]]) for n in names])
            if reduce_fn is not None:
                flat = reduce_fn(flat)  # one collective: the sketches are linear, so their sum is the sum's
            flat = flat.detach().double().cpu()
            offset = 0
            for n in names:
                size = self._sketches[n].numel()
                sketch = flat[offset:offset + size].view(self._sketches[n].shape)
                total, inside = (float(v) for v in flat[offset + size:offset + size + 2])
                offset += size + 2
                omega = (self._omegas[n] if n in self._omegas else self._omega(n, sketch.shape[0])).double().cpu()
                self.bases[n] = self._extend(self.bases.get(n), sketch, omega, total, inside)
        self._sketches, self._energies, self._counts, self._omegas = {}, {}, {}, {}
        self._plan = None

    def follow_targets(self, outputs: Mapping[str, LayerState], unused_outputs: bool = False) -> None:
        """During a task (``output_targets``): leave out of the projection the output units that finished
        tasks used and this task does not train toward (the old classes of a class-incremental task),
        as the gates and the pull leave them; those it trains toward (a shared head) stay projected.
        An output layer with no target counted yet keeps its mask; the plan is rebuilt only when a
        mask changed.

        Args:
            outputs: the output layers' states, with their ``importance`` and this task's ``targets``.
            unused_outputs: whether the units no finished task used are projected too
                (``subspace_unused_outputs``).

        Example:
            >>> st, sub = LayerState("out", nn.Linear(2, 3)), InputSubspace(energy=0.5)
            >>> st.importance[:2] = 1.0  # the first two classes were used by a finished task
            >>> st.targets[1:] = 4.0  # this task trains toward the last two
            >>> sub.follow_targets({"out": st})
            >>> sub.units["out"].tolist()  # the first class is not a target any more, the third is new
            [False, True, False]
        """
        if not self.enabled:
            return
        for name, st in outputs.items():
            if float(st.targets.sum()) <= 0:
                continue
            used = st.importance > 0
            projected = torch.ones_like(used) if unused_outputs else used
            mask = (projected & ((st.targets > 0) | ~used)).cpu()
            if name not in self.units or not torch.equal(self.units[name], mask):
                self.units[name] = mask
                self._plan = None

    def _extend(self, basis: Optional[Tensor], sketch: Tensor, omega: Tensor, total: float, inside: float) -> Tensor:
        """The basis with the task's leading new directions added until it holds ``energy`` of ``total``."""
        basis = sketch.new_zeros((sketch.shape[0], 0)) if basis is None else basis.detach().double().cpu()
        need = self.energy * total - inside
        if total <= 0 or need <= 0 or omega.shape[1] == 0:
            return basis.float()
        rest = sketch - basis @ (basis.T @ sketch)  # the sketch of the moment outside the basis (Omega lies there)
        values, vectors = nystrom_eigenpairs(rest, omega)
        found = int((values > values[:1].clamp_min(0.0) * 1e-9).sum()) if values.numel() else 0
        k = min(int((torch.cumsum(values, 0) < need).sum()) + 1, found)
        if k == 0:
            return basis.float()
        new = vectors[:, :k] - basis @ (basis.T @ vectors[:, :k])  # orthogonal to the basis to rounding
        return torch.cat([basis, torch.linalg.qr(new).Q], dim=1).float()

    def project(self, states: Iterable[LayerState], anchor_of: Callable[[nn.Parameter], Optional[Tensor]],
                factor_of: Optional[Callable[[nn.Parameter], float]] = None) -> None:
        """``W <- W - f (W - A) U U^T`` in place, for each layer with a basis and an anchor ``A`` of its weight
        (``f = factor_of(W)``, ``1`` without it: the whole drift along the old inputs is removed).

        Computed as ``W - (W U - A U) U^T`` with ``A U`` kept in a per-layer plan built on the first
        call after the anchors, the basis or the weight's storage change: one read of ``W`` and one
        fused update, the cost of two thin matrix products (``out x in x k``).
        """
        if not self.enabled:
            return
        states = list(states)
        key = [(st.module.weight.data_ptr(), anchor_of(st.module.weight)) for st in states]  # the plan holds both
        if self._plan is None or len(self._plan[0]) != len(key) or any(
                p != k[0] or a is not k[1] for (p, a), k in zip(self._plan[0], key)):
            self._plan = (key, self._make_plan(states, anchor_of))
        with torch.no_grad():
            for weight, w, basis, held, mask in self._plan[1]:
                f = 1.0 if factor_of is None else factor_of(weight)
                if w is not None:
                    drift = torch.addmm(held, w, basis, beta=-1.0)  # W U - A U in one call
                    w.addmm_(drift if mask is None else drift.mul_(mask), basis.T, alpha=-f)
                else:  # e.g. a channels_last convolution: the same update through a copy of its rows
                    drift = torch.addmm(held, weight.reshape(weight.shape[0], -1), basis, beta=-1.0)
                    weight.sub_(((drift if mask is None else drift.mul_(mask)) @ basis.T).view(weight.shape), alpha=f)

    def _make_plan(self, states: list[LayerState], anchor_of: Callable[[nn.Parameter], Optional[Tensor]]) -> list[tuple]:
        """Per layer to project: the weight, its ``(out, in)`` view (``None`` where it is not contiguous),
        the basis on the weight's device and dtype, ``A U`` and the unit mask."""
        plan = []
        for st in states:
            weight, basis = st.module.weight, self.bases.get(st.name)
            anchor = anchor_of(weight)
            if basis is None or basis.shape[1] == 0 or anchor is None or anchor.shape != weight.shape:
                continue
            if basis.device != weight.device or basis.dtype != weight.dtype:
                basis = self.bases[st.name] = basis.to(device=weight.device, dtype=weight.dtype)
            view = weight.view(weight.shape[0], -1) if weight.is_contiguous() else None
            held = anchor.to(weight.device).reshape(weight.shape[0], -1) @ basis
            plan.append((weight, view, basis, held, self._unit_weight(st.name, weight)))
        return plan

    def _unit_weight(self, name: str, weight: Tensor) -> Optional[Tensor]:
        """``units[name]`` as a ``(out, 1)`` tensor of 0 and 1 on the weight's device (``None``: every unit)."""
        units = self.units.get(name)
        if units is None:
            return None
        full = torch.zeros(weight.shape[0], 1, dtype=weight.dtype)
        n = min(units.numel(), weight.shape[0])
        full[:n, 0] = units[:n].to(weight.dtype)
        return full.to(weight.device)

    def nbytes(self) -> int:
        """Bytes held: the bases, this task's sketches and their ``Omega``, each layer's ``A U`` and the unit masks."""
        held = ([entry[3] for entry in self._plan[1]] if self._plan is not None else []) + list(self.units.values())
        tensors = [*self.bases.values(), *self._sketches.values(), *self._energies.values(), *self._omegas.values(), *held]
        return sum(t.numel() * t.element_size() for t in tensors)

    def state_dict(self) -> dict[str, Any]:
        return {"bases": {n: t.detach().cpu().clone() for n, t in self.bases.items()},
                "sketches": {n: t.detach().cpu().clone() for n, t in self._sketches.items()},
                "energies": {n: t.detach().cpu().clone() for n, t in self._energies.items()},
                "counts": dict(self._counts), "units": {n: t.clone() for n, t in self.units.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.bases = {n: t.clone() for n, t in state.get("bases", {}).items()}
        self._sketches = {n: t.clone() for n, t in state.get("sketches", {}).items()}
        self._energies = {n: t.clone() for n, t in state.get("energies", {}).items()}
        self._counts = {n: int(c) for n, c in state.get("counts", {}).items()}
        self.units = {n: t.to(torch.bool).clone() for n, t in state.get("units", {}).items()}
        self._omegas, self._plan = {}, None
