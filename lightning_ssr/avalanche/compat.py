"""Fixes for Avalanche baselines that SSR is compared against."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["fix_synaptic_intelligence"]

_FIXED_FLAG = "_lightning_ssr_fixed"


def _si_keeps_views() -> bool:
    """Whether ``SynapticIntelligencePlugin.extract_weights`` stores views of the live weights."""
    from avalanche.training.plugins import SynapticIntelligencePlugin as SI
    from avalanche.training.utils import ParamData

    layer = nn.Linear(2, 2)
    target = {name: ParamData(name, p.flatten().shape) for name, p in layer.named_parameters()}
    SI.extract_weights(layer, target, set())
    before = target["weight"].data.clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    return not torch.equal(target["weight"].data, before)


def fix_synaptic_intelligence() -> bool:
    """Make Avalanche's ``SynapticIntelligencePlugin`` measure importance on CPU.

    In avalanche-lib 0.6, ``SynapticIntelligencePlugin.extract_weights`` stores
    ``param.detach().cpu().flatten()``, which on CPU is a *view* of the live parameter, not a
    copy. The "old" weights then move with the model, every weight change it measures is zero,
    every importance is zero, and SI trains exactly like Naive (on CUDA, ``.cpu()`` copies and
    SI works). This replaces ``extract_weights`` by the same function with a ``.clone()``.

    Call it once before building SI strategies. It checks the behaviour first and patches only
    when the bug is present; calling it again does nothing.

    Returns:
        ``True`` if this call patched Avalanche, ``False`` if nothing needed patching.

    Example:
        >>> fix_synaptic_intelligence() in (True, False)
        True
        >>> fix_synaptic_intelligence()
        False
    """
    from avalanche.training.plugins import SynapticIntelligencePlugin as SI

    if getattr(SI.extract_weights, _FIXED_FLAG, False) or not _si_keeps_views():
        return False

    @torch.no_grad()
    def extract_weights(model: nn.Module, target: Any, excluded_parameters: Any) -> None:
        for name, param in SI.allowed_parameters(model, excluded_parameters):
            target[name].data = param.detach().cpu().flatten().clone()

    setattr(extract_weights, _FIXED_FLAG, True)
    SI.extract_weights = staticmethod(extract_weights)
    return True
