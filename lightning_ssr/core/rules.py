"""The SSR update rules as pure functions on per-neuron tensors (no module, no state).

Every front end (the Lightning callback, the Avalanche plugin, :class:`~lightning_ssr.SSRNorm`)
computes its updates with these functions, so the maths lives in one place and is tested once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "activity_function",
    "neuron_activity",
    "winner_counts",
    "ema_update",
    "scaling_factor",
    "target_counts",
    "gradient_reach",
    "norm_factor",
    "relative_importance",
    "protection_gate",
]

#: What :func:`protection_gate` takes and returns alike.
GateInput = TypeVar("GateInput", Tensor, np.ndarray)

_PHI: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "abs": torch.abs,
    "square": torch.square,
}


def activity_function(activity: str | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """Resolve the firing-rate proxy ``phi`` from its name, or return the callable as is.

    Example:
        >>> activity_function("relu")(torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
    """
    if callable(activity):
        return activity
    if activity not in _PHI:
        raise ValueError(f"`activity` must be one of {sorted(_PHI)} or a callable, got {activity!r}")
    return _PHI[activity]


def neuron_activity(output: Tensor, phi: Callable[[Tensor], Tensor], channel_dim: int) -> Tensor:
    """Mean of ``phi(output)`` per neuron, in float32, over every dimension but ``channel_dim``.

    A Linear layer's neurons are its last dimension (``channel_dim=-1``); a convolution's are its
    channels (``channel_dim=1``), averaged over the batch and all spatial positions.

    Example:
        >>> z = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
        >>> neuron_activity(z, torch.relu, channel_dim=-1)
        tensor([2., 2.])
    """
    a = phi(output.detach().float())
    if channel_dim in (-1, a.dim() - 1):
        return a.reshape(-1, a.shape[-1]).mean(0)
    dims = [d for d in range(a.dim()) if d != channel_dim]
    return a.mean(dim=dims)


def winner_counts(output: Tensor, channel_dim: int) -> Tensor:
    """How often each unit along ``channel_dim`` wins the argmax, per position, in float32: an
    output unit "fires" when it wins (the mean of a one-hot of the argmax, without building it).

    Example:
        >>> winner_counts(torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]]), -1)
        tensor([0.5000, 0.5000, 0.0000])
    """
    z = output.detach()
    cdim = channel_dim % z.dim()
    n = z.shape[cdim]
    wins = z.argmax(cdim).flatten()
    return torch.bincount(wins, minlength=n).float().div_(max(wins.numel(), 1))


def target_counts(grad: Tensor, channel_dim: int) -> Tensor:
    """How often each unit along ``channel_dim`` is the target, per position, in float32: the units
    where the loss gradient at the output is negative. Under cross-entropy, ``dL/dz = p - y`` is
    negative exactly at each sample's label, so no label is needed.

    Example:
        >>> z, y = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]]), torch.tensor([2, 2])
        >>> g = torch.autograd.functional.jacobian(lambda t: torch.nn.functional.cross_entropy(t, y), z)
        >>> target_counts(g, -1)
        tensor([0., 0., 1.])
    """
    g = grad.detach()
    return _unit_counts(g < 0, channel_dim).div_(max(g.numel() // g.shape[channel_dim % g.dim()], 1))


def gradient_reach(grad: Tensor, channel_dim: int) -> Tensor:
    """Which units along ``channel_dim`` the loss gradient reached (nonzero anywhere), as float32 0/1:
    a head masked to the current task's units (task-incremental heads in one layer) gives the other
    units exactly zero.

    Example:
        >>> z, y = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]]), torch.tensor([1, 0])
        >>> masked = lambda t: torch.nn.functional.cross_entropy(t[:, :2], y)  # unit 2 is another task's
        >>> gradient_reach(torch.autograd.functional.jacobian(masked, z), -1)
        tensor([1., 1., 0.])
    """
    return _unit_counts(grad.detach() != 0, channel_dim).clamp_(max=1.0)


def _unit_counts(mask: Tensor, channel_dim: int) -> Tensor:
    """How many entries of a boolean ``mask`` are true per unit along ``channel_dim``, in float32."""
    cdim = channel_dim % mask.dim()
    return mask.sum(dim=[d for d in range(mask.dim()) if d != cdim]).float()


def ema_update(average: Tensor, value: Tensor, steps_seen: int, tau: float) -> Tensor:
    """One step of a bias-corrected exponential moving average, in place.

    The weight of the new value is ``max(1 / tau, 1 / steps_seen)``: the first value is taken
    as is, the first ``tau`` values are averaged uniformly, and after that the average forgets
    with time constant ``tau`` steps.

    Example:
        >>> avg = torch.zeros(2)
        >>> ema_update(avg, torch.tensor([4.0, 2.0]), steps_seen=1, tau=10.0)
        tensor([4., 2.])
        >>> ema_update(avg, torch.tensor([0.0, 0.0]), steps_seen=2, tau=10.0)
        tensor([2., 1.])
    """
    weight = max(1.0 / tau, 1.0 / max(steps_seen, 1))
    return average.lerp_(value, weight)


def scaling_factor(activity: Tensor, set_point: Tensor, rate: float, max_change: float, down: bool = True) -> Tensor:
    """The proposal's multiplicative factor ``f_i = 1 + rate * (s_i - a_i)``, bounded.

    Too active (``a > s``): ``f < 1``, the neuron's incoming weights shrink; too quiet: they grow.
    The result lies in ``[1 - max_change, 1 + max_change]``; with ``down=False`` in ``[1, 1 +
    max_change]``: only neurons below their set point are scaled (up).

    Example:
        >>> scaling_factor(torch.tensor([0.3, 0.0]), torch.tensor([0.1, 0.1]), 0.5, 0.02)
        tensor([0.9800, 1.0200])
        >>> scaling_factor(torch.tensor([0.12]), torch.tensor([0.1]), 0.5, 0.02)
        tensor([0.9900])
        >>> scaling_factor(torch.tensor([0.3, 0.0]), torch.tensor([0.1, 0.1]), 0.5, 0.02, down=False)
        tensor([1.0000, 1.0200])
    """
    f = 1.0 + rate * (set_point - activity)
    return f.clamp_(1.0 if not down else 1.0 - max_change, 1.0 + max_change)


def norm_factor(norms: Tensor, target: Tensor, rate: float, max_change: float, eps: float) -> Tensor:
    """Factor that moves each neuron's incoming-weight norm toward its set point, bounded.

    ``g_i = 1 + rate * (target_i / norm_i - 1)``: when the total strength of a neuron's synapses
    grew, all of them shrink in proportion (relative strengths are kept).

    Example:
        >>> norm_factor(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0]), 0.1, 0.5, 1e-8)
        tensor([0.9500, 1.0000])
    """
    g = 1.0 + rate * (target / norms.clamp_min(eps) - 1.0)
    return g.clamp_(1.0 - max_change, 1.0 + max_change)


def relative_importance(values: Tensor, eps: float) -> Tensor:
    """Per-neuron values divided by their layer mean (a neuron of average use scores 1).

    Example:
        >>> relative_importance(torch.tensor([1.0, 3.0]), 1e-8)
        tensor([0.5000, 1.5000])
    """
    return values / values.mean().clamp_min(eps)


def protection_gate(importance: GateInput, strength: float) -> GateInput:
    """Per-neuron plasticity ``1 / (1 + strength * importance)``: 1 for a free neuron (a tensor, or a
    numpy array for capacity adaptation's bisection on the CPU).

    Example:
        >>> protection_gate(torch.tensor([0.0, 1.0, 3.0]), 1.0)
        tensor([1.0000, 0.5000, 0.2500])
    """
    return 1.0 / (1.0 + strength * importance)
