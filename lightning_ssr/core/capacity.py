"""Capacity-adaptive protection: the strength on a layer follows how much of it is already taken.

One fixed ``consolidation`` strength cannot fit both kinds of stream: where each task uses its own
few neurons (Split), most of a layer stays free and strong protection of the few costs nothing;
where every task uses every neuron (Permuted), the same strength freezes the whole layer and new
tasks are learned poorly. In the spirit of AdaHAT (Wang et al. 2024), which scales its strength by
the capacity left, each layer's strength here is the largest ``lambda' <= consolidation`` for which
the layer keeps, on average over its neurons, at least ``min_plasticity`` of its plasticity:

    mean_i 1 / (1 + lambda' * importance_i) >= min_plasticity

A layer whose importance sits on few neurons keeps the full strength; a layer whose every neuron
is important gets a weaker one. Derived from the importance alone (no state of its own), so a
restored checkpoint recomputes it exactly.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from lightning_ssr.core import rules

__all__ = ["mean_plasticity", "adaptive_strength"]


def mean_plasticity(importance: Tensor, strength: float) -> float:
    """The mean gate ``1 / (1 + strength * importance)`` over a layer's neurons.

    Example:
        >>> import torch
        >>> mean_plasticity(torch.tensor([0.0, 0.0, 0.0, 3.0]), 1.0)
        0.8125
    """
    return float(rules.protection_gate(importance.float(), strength).mean())


def adaptive_strength(importance: Tensor, strength: float, min_plasticity: float, iters: int = 40) -> float:
    """The largest strength ``<= strength`` that leaves the layer ``min_plasticity`` on average.

    Args:
        importance: the layer's per-neuron importance (non-negative).
        strength: the configured ``consolidation`` (the ceiling).
        min_plasticity: the mean gate the layer must keep, in ``[0, 1)``; ``0`` returns ``strength``.
        iters: bisection steps (the mean gate falls monotonically with the strength).

    Returns:
        The strength for this layer.

    Example:
        >>> import torch
        >>> concentrated = torch.tensor([5.0, 0.0, 0.0, 0.0, 0.0])  # one neuron used
        >>> spread = torch.ones(5)  # every neuron used
        >>> adaptive_strength(concentrated, 10.0, 0.5)
        10.0
        >>> round(adaptive_strength(spread, 10.0, 0.5), 4)  # 1 / (1 + s) = 0.5
        1.0
    """
    if min_plasticity <= 0.0 or strength <= 0.0:
        return float(strength)
    imp = importance.detach().double().cpu().numpy()  # one copy: no device sync, no torch call per bisection step

    def keeps(s: float) -> bool:
        return float(np.mean(rules.protection_gate(imp, s))) >= min_plasticity

    if keeps(float(strength)):
        return float(strength)
    low, high = 0.0, float(strength)
    for _ in range(iters):
        mid = 0.5 * (low + high)
        if keeps(mid):
            low = mid
        else:
            high = mid
    return low
