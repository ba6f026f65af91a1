"""Which layer consumes each tracked layer's neurons, found from the order modules run in."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_ssr.core.layers import DEFAULT_LAYER_TYPES, input_groups
from lightning_ssr.core.state import LayerState

__all__ = ["ConsumerFinder"]


class ConsumerFinder:
    """Records the order in which Linear/Conv modules run on the next training forward, then
    gives every tracked layer its consumer: the first later layer whose input columns line up
    with its neurons (its outgoing weights).

    Args:
        model: the model whose modules are watched.
        enabled: ``False`` never records (nothing needs the consumers: ``gate_outgoing=False``).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> layers = {"0": LayerState("0", net[0])}
        >>> finder = ConsumerFinder(net)
        >>> finder.record()
        >>> _ = net(torch.randn(2, 4))
        >>> finder.resolve(layers.values())
        True
        >>> layers["0"].consumer == (net[2], 1)
        True
    """

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        self.model = model
        self.enabled = enabled
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._order: list[nn.Module] = []

    @property
    def recording(self) -> bool:
        return bool(self._hooks)

    def record(self) -> None:
        """Hook every Linear/Conv module to note the order of the next training forward."""
        if self._hooks or not self.enabled:
            return
        self._order.clear()

        def pre(module: nn.Module, inputs: Any) -> None:
            if module.training:
                self._order.append(module)

        for m in self.model.modules():
            if isinstance(m, DEFAULT_LAYER_TYPES):
                self._hooks.append(m.register_forward_pre_hook(pre))

    def stop(self) -> None:
        """Remove the recording hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def resolve(self, layers: Iterable[LayerState]) -> bool:
        """Set ``consumer`` on every layer once an order was recorded.

        Returns:
            Whether consumers were (re)assigned: ``False`` while nothing is recorded yet.
        """
        if not self._hooks or not self._order:
            return False
        self.stop()
        order = self._order
        for st in layers:
            st.consumer = None
            if st.module not in order:
                continue
            i = next(k for k, m in enumerate(order) if m is st.module)
            for m in order[i + 1:]:
                groups = input_groups(m, st.n)
                if groups is not None:
                    st.consumer = (m, groups)
                    break
        self._order = []
        return True
