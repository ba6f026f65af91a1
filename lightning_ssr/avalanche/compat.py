"""Fixes for Avalanche baselines that SSR is compared against."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["fix_mas_zero_loss", "fix_synaptic_intelligence"]

_FIXED_FLAG = "_lightning_ssr_fixed"


def _patch_once(owner: type, name: str, buggy: Callable[[], bool], replacement: Callable[..., Any],
                wrap: Callable[[Any], Any] = lambda f: f) -> bool:
    """Replace ``owner.name`` by ``replacement`` (wrapped by ``wrap``, e.g. ``staticmethod``) unless
    it was replaced already or ``buggy()`` finds the bug absent; whether it was replaced now."""
    if getattr(getattr(owner, name), _FIXED_FLAG, False) or not buggy():
        return False
    setattr(replacement, _FIXED_FLAG, True)
    setattr(owner, name, wrap(replacement))
    return True


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

    @torch.no_grad()
    def extract_weights(model: nn.Module, target: Any, excluded_parameters: Any) -> None:
        for name, param in SI.allowed_parameters(model, excluded_parameters):
            target[name].data = param.detach().cpu().flatten().clone()

    return _patch_once(SI, "extract_weights", _si_keeps_views, extract_weights, wrap=staticmethod)


def _mas_refuses_zero_loss() -> bool:
    """Whether ``MASPlugin.before_backward`` takes a loss of exactly zero for a missing one."""
    from types import SimpleNamespace

    from avalanche.training.plugins import MASPlugin

    plugin = MASPlugin()
    layer = nn.Linear(1, 1)
    plugin.importance = {"weight": torch.zeros(1, 1)}
    plugin.params = {"weight": torch.zeros(1, 1)}
    probe = SimpleNamespace(clock=SimpleNamespace(train_exp_counter=1), model=layer,
                            loss=torch.zeros((), requires_grad=True))
    try:
        plugin.before_backward(probe)
    except ValueError:
        return True
    return False


def fix_mas_zero_loss() -> bool:
    """Let Avalanche's ``MASPlugin`` train through a batch whose loss is exactly zero.

    In avalanche-lib 0.6, ``MASPlugin.before_backward`` checks ``if not strategy.loss`` to find a
    missing loss, so a cross-entropy that underflows to exactly ``0.0`` (a model that is certain of
    every sample of a batch, common late in an easy experience) stops training with ``ValueError:
    Loss is not available`` (avalanche#1676). This wraps ``before_backward``: on a loss of exactly
    zero it adds the smallest normal float before Avalanche's check and subtracts it after the
    penalty was added, so the loss, its gradient and the penalty are unchanged.

    Call it once before building MAS strategies. It checks the behaviour first and patches only
    when the bug is present; calling it again does nothing.

    Returns:
        ``True`` if this call patched Avalanche, ``False`` if nothing needed patching.

    Example:
        >>> fix_mas_zero_loss() in (True, False)
        True
        >>> fix_mas_zero_loss()
        False
    """
    from avalanche.training.plugins import MASPlugin

    original = MASPlugin.before_backward

    def before_backward(self: Any, strategy: Any, **kwargs: Any) -> Any:
        loss = strategy.loss
        if not (isinstance(loss, Tensor) and loss.numel() == 1 and loss.is_floating_point() and not bool(loss)):
            return original(self, strategy, **kwargs)
        tiny = torch.finfo(loss.dtype).tiny
        strategy.loss = loss + tiny  # non-zero, so Avalanche sees a loss
        try:
            return original(self, strategy, **kwargs)
        finally:
            strategy.loss = strategy.loss - tiny

    return _patch_once(MASPlugin, "before_backward", _mas_refuses_zero_loss, before_backward)
