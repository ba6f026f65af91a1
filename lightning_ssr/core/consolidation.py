"""Importance and consolidation: part 5 of the mechanism, what a finished task leaves behind.

While a task trains, each neuron's use is summed (its activity, or its incoming ``|w * grad|``);
at the task's end the sums become a per-neuron importance relative to the layer, folded into what
earlier tasks left (summed or saturating at the maximum). The penalty form of protection lives
here too: a loss term that keeps important neurons' activity near what past tasks saw.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
from torch import Tensor

from lightning_ssr.core import rules
from lightning_ssr.core.config import SSRConfig
from lightning_ssr.core.layers import weight_rows
from lightning_ssr.core.state import LayerState

__all__ = ["Consolidation"]


class Consolidation:
    """Per-neuron importance over tasks, and the loss-side penalty.

    Switched off by ``consolidation=0`` (importance is still measured, nothing is protected).

    Example:
        >>> from torch import nn
        >>> st = LayerState("0", nn.Linear(3, 2))
        >>> st.task_activity.copy_(torch.tensor([3.0, 1.0])); st.task_steps = 2
        tensor([3., 1.])
        >>> Consolidation(SSRConfig()).fold(st, by_grad=False)
        >>> st.importance, st.anchor
        (tensor([1.5000, 0.5000]), tensor([1.5000, 0.5000]))
    """

    def __init__(self, config: SSRConfig) -> None:
        self.config = config

    @property
    def by_gradient(self) -> bool:
        return self.config.importance == "activity_grad"

    def observe_gradients(self, layers: Iterable[LayerState]) -> None:
        """With ``importance="activity_grad"``: add each neuron's incoming ``|w * grad|``."""
        if not self.by_gradient:
            return
        with torch.no_grad():
            for st in layers:
                g = st.module.weight.grad
                if g is not None:
                    w = st.module.weight
                    st.task_grad.add_(weight_rows(w.detach() * g, st.module).abs().sum(1).float())

    def fold(self, st: LayerState, by_grad: bool) -> None:
        """End of a task: fold the task's use into ``importance`` and reset the task's sums."""
        cfg = self.config
        if st.task_steps > 0:
            use = st.task_grad if by_grad else st.task_activity
            if st.count_targets and float(st.targets.sum()) > 0:
                use = st.targets  # an output unit's use is being the target (``output_targets``)
            rel = rules.relative_importance(use / st.task_steps, cfg.eps)
            if cfg.accumulate == "sum":
                st.importance.add_(rel)
            else:
                torch.maximum(st.importance, rel, out=st.importance)
            st.anchor.copy_(st.task_activity / st.task_steps)
        st.task_activity.zero_()
        st.task_grad.zero_()
        st.targets.zero_()
        st.reached.zero_()
        st.task_steps = 0
        st.seen = 0

    def penalty(self, layers: Iterable[LayerState]) -> Optional[Tensor]:
        """``consolidation * sum_i importance_i * (a_i - anchor_i)^2`` (mean per layer) over the
        live activity of the last training forward; ``None`` when no layer has one."""
        total: Optional[Tensor] = None
        for st in layers:
            if st.live is None:
                continue
            term = (st.importance.to(st.live.device) * (st.live - st.anchor) ** 2).mean()
            total = term if total is None else total + term
            st.live = None
        return None if total is None else self.config.consolidation * total
