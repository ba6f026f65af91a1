"""Set points and homeostatic scaling: parts 2, 3 and 4 of the mechanism.

Each neuron's set point (a float, its own long-run activity after the warm-up, or its layer's
mean), and the multiplicative update of its incoming weights toward it: activity scaling
(``scaling_rate``) and synaptic-total homeostasis (``norm_rate``), one bounded factor per neuron
applied in place under ``torch.no_grad()``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_ssr.core import rules
from lightning_ssr.core.config import SSRConfig
from lightning_ssr.core.layers import weight_rows
from lightning_ssr.core.state import LayerState

__all__ = ["Homeostasis"]


class Homeostasis:
    """Set points and the scaling of incoming weights, for the layers of one engine.

    Switched off by ``scaling_rate=0`` and ``norm_rate=0`` (set points are still measured, for
    diagnostics).

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(3, 2)
        >>> st = LayerState("0", lin)
        >>> st.activity.fill_(0.5)
        tensor([0.5000, 0.5000])
        >>> h = Homeostasis(SSRConfig(set_point=0.1, scaling_rate=1.0, max_change=0.02, scale_down=True))
        >>> w = lin.weight.detach().clone()
        >>> with torch.no_grad():
        ...     h.step(st, warm=True)
        >>> torch.allclose(lin.weight, 0.98 * w)
        True
    """

    def __init__(self, config: SSRConfig) -> None:
        self.config = config

    @property
    def scales(self) -> bool:
        """Whether any weight is rescaled (activity scaling or synaptic totals)."""
        return self.config.scaling_rate > 0 or self.config.norm_rate > 0

    def step(self, st: LayerState, warm: bool, scale: bool = True) -> None:
        """After the long-run activity was updated: fix the set point, then (past the warm-up)
        rescale the layer's incoming weights; before it, the factor reads 1."""
        set_point = self.set_point(st, warm)
        scale = scale and st.module.weight.requires_grad  # a frozen layer is sensed but never changed
        if scale and self.scales and warm:
            st.factor = self.scale(st, set_point)
        elif scale and self.scales:
            st.factor.fill_(1.0)

    def current_set_point(self, st: LayerState) -> Tensor:
        """The set point now in force, without measuring one (NaN while not yet measured)."""
        if self.config.set_point == "layer_mean":
            return st.activity.mean().expand_as(st.activity)
        return st.set_point

    def statistics(self, st: LayerState) -> dict[str, Tensor]:
        """Per-neuron float32 CPU copies: activity, set point, their difference, factor, importance."""
        activity = st.activity.detach().float().cpu()
        set_point = self.current_set_point(st).detach().float().cpu()
        return {
            "activity": activity,
            "set_point": set_point,
            "activity_minus_set_point": activity - set_point,
            "factor": st.factor.detach().float().cpu(),
            "importance": st.importance.detach().float().cpu(),
        }

    def summary(self, st: LayerState) -> dict[str, Tensor]:
        """0-dim summaries of the layer: mean activity, mean ``|activity - set point|``, factors."""
        return {
            "activity": st.activity.mean(),
            "deviation": (st.activity - self.current_set_point(st)).abs().mean(),
            "factor_mean": st.factor.mean(),
            "factor_min": st.factor.min(),
            "factor_max": st.factor.max(),
        }

    def set_point(self, st: LayerState, warm: bool) -> Tensor:
        """The set point, measured from the long-run activity at the end of the warm-up
        (``"self"``), filled in from the float, or the layer mean."""
        sp = self.config.set_point
        if sp == "layer_mean":
            return st.activity.mean().expand_as(st.activity)
        if sp == "self":
            if warm and not st.has_set_point:
                st.set_point.copy_(st.activity)
                st.has_set_point = True
            return st.set_point
        if not st.has_set_point:
            st.set_point.fill_(float(sp))
            st.has_set_point = True
        return st.set_point

    def scale(self, st: LayerState, set_point: Tensor) -> Tensor:
        """Multiply each neuron's incoming weights (and bias) by its bounded factor, in place.

        Returns:
            The per-neuron factors applied.
        """
        cfg = self.config
        mod = st.module
        w = mod.weight
        factor = torch.ones_like(st.activity)
        if cfg.scaling_rate > 0 and (st.has_set_point or cfg.set_point == "layer_mean"):
            factor = rules.scaling_factor(st.activity, set_point, cfg.scaling_rate, cfg.max_change, cfg.scale_down)
        if cfg.norm_rate > 0:
            norms = weight_rows(w.detach(), mod).float().norm(dim=1)
            if not st.has_norm_target:
                st.norm_target.copy_(norms)
                st.has_norm_target = True
            factor = factor * rules.norm_factor(norms, st.norm_target, cfg.norm_rate, cfg.max_change, cfg.eps)
            factor.clamp_(1.0 - cfg.max_change, 1.0 + cfg.max_change)
        w.mul_(factor.to(w.dtype).view(st.n, *([1] * (w.dim() - 1))))  # broadcast: any memory format
        bias = getattr(mod, "bias", None)
        if cfg.scale_bias and bias is not None:
            bias.mul_(factor.to(bias.dtype))
        return factor

    def new_task(self, st: LayerState) -> None:
        """End of a task: forget ``"self"`` set points (with ``remeasure_set_points``) and take
        the synaptic totals the task left as the new norm set points."""
        cfg = self.config
        if cfg.set_point == "self" and cfg.remeasure_set_points:
            st.set_point.fill_(math.nan)
            st.has_set_point = False
        if cfg.norm_rate > 0:
            st.norm_target.copy_(weight_rows(st.module.weight.detach(), st.module).float().norm(dim=1))
            st.has_norm_target = True
