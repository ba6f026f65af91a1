"""Conversion of whole models: :func:`convert_batchnorm` and its inverse :func:`convert_ssrnorm_to_batchnorm`."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase

from lightning_ssr.norm.base import _SSRNorm
from lightning_ssr.norm.layers import SSRNorm1d, SSRNorm2d, SSRNorm3d, _SSRNormXd

__all__ = ["convert_batchnorm", "convert_ssrnorm_to_batchnorm"]

#: Arguments that :func:`convert_batchnorm` takes from each BatchNorm and never from the caller.
_STRUCTURAL = ("num_features", "eps", "affine", "track_running_stats", "device", "dtype", "bias")
#: SSRNorm's own arguments, which :func:`convert_batchnorm` passes on to every new layer.
_OWN = ("momentum", "activity", "set_point", "gain_rate", "max_change", "max_gain", "auto_update",
        "project_gradient", "grad_momentum", "process_group", "kernel")


def _own_kwargs(ssr_kwargs: dict[str, Any]) -> dict[str, Any]:
    taken = sorted(k for k in ssr_kwargs if k in _STRUCTURAL)
    if taken:
        raise TypeError(
            f"convert_batchnorm takes {taken} from each BatchNorm layer; pass only SSRNorm's own "
            f"arguments {list(_OWN)}"
        )
    unknown = sorted(k for k in ssr_kwargs if k not in _OWN)
    if unknown:
        raise TypeError(f"Unexpected keyword arguments: {unknown}; SSRNorm's own arguments are: {list(_OWN)}")
    return ssr_kwargs


def _factory(module: nn.Module) -> dict[str, Any]:
    for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {}


def convert_batchnorm(module: nn.Module, **ssr_kwargs: Any) -> nn.Module:
    r"""Replace every ``BatchNorm1d``/``2d``/``3d`` and ``SyncBatchNorm`` in a model by an SSR layer.

    Walks the tree with ``named_children`` like
    :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`. Each new layer takes ``num_features``,
    ``eps``, ``affine``, ``bias``, ``track_running_stats``, the device and the dtype from the old
    one; the affine parameters are copied under ``torch.no_grad()`` and the running mean, variance
    and ``num_batches_tracked`` become the initial state (a trained BatchNorm needs no warm start;
    a fresh one warm-starts on the first batch). ``momentum`` is not carried over: BatchNorm's
    momentum averages batch statistics for evaluation, SSRNorm's sets its slow time constant.
    ``SyncBatchNorm`` (whose input rank is unknown) becomes a layer that accepts any input of at
    least 2 dimensions, with its process group. A layer shared by two parents stays shared.
    Convert before building the optimizer: the new layers hold new parameters.

    Args:
        module: the model, or a single BatchNorm layer.
        **ssr_kwargs: SSRNorm's own arguments for every new layer (``momentum``, ``activity``,
            ``set_point``, ``gain_rate``, ``max_change``, ``max_gain``, ``auto_update``,
            ``project_gradient``, ``grad_momentum``, ``process_group``, ``kernel``).

    Returns:
        The model with its BatchNorm layers replaced (the same object unless ``module`` itself is
        a BatchNorm layer, in which case the new layer is returned).

    Examples::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> net = convert_batchnorm(net, momentum=0.02)
        >>> net[1]
        SSRNorm2d(8, eps=1e-05, momentum=0.02, affine=True, bias=True, track_running_stats=True,
                  activity='square', set_point=1.0, gain_rate=0.01, max_change=0.01, max_gain=10.0,
                  auto_update=True, project_gradient=True, grad_momentum=0.2, kernel='auto')
    """
    kwargs = _own_kwargs(dict(ssr_kwargs))
    return _convert_to_ssr(module, kwargs, {})


def _convert_to_ssr(module: nn.Module, kwargs: dict[str, Any], memo: dict[int, nn.Module]) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    output = module
    if isinstance(module, _LazyNormBase) and module.has_uninitialized_params():
        raise ValueError(
            f"cannot convert an uninitialized {type(module).__name__}: run one forward first so "
            "that its number of features is known"
        )
    if isinstance(module, _BatchNorm):
        if isinstance(module, nn.BatchNorm1d):
            cls: type[_SSRNorm] = SSRNorm1d
        elif isinstance(module, nn.BatchNorm2d):
            cls = SSRNorm2d
        elif isinstance(module, nn.BatchNorm3d):
            cls = SSRNorm3d
        else:
            cls = _SSRNormXd
        own = dict(kwargs)
        if isinstance(module, nn.SyncBatchNorm) and "process_group" not in own:
            own["process_group"] = module.process_group
        output = cls(
            module.num_features,
            module.eps,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            bias=module.bias is not None,
            **_factory(module),
            **own,
        )
        with torch.no_grad():
            if module.affine:
                output.weight.copy_(module.weight)
                output.weight.requires_grad_(module.weight.requires_grad)
                if module.bias is not None:
                    output.bias.copy_(module.bias)
                    output.bias.requires_grad_(module.bias.requires_grad)
            if module.track_running_stats and module.running_mean is not None:
                output.running_mean.copy_(module.running_mean)  # type: ignore[union-attr]
                output.running_var.copy_(module.running_var)  # type: ignore[union-attr]
                tracked = module.num_batches_tracked
                if tracked is not None and int(tracked) > 0:
                    output.num_batches_tracked.copy_(tracked)
                    output.initialized.fill_(True)
        output.train(module.training)
        if hasattr(module, "qconfig"):
            output.qconfig = module.qconfig
    memo[id(module)] = output
    for name, child in module.named_children():
        output.add_module(name, _convert_to_ssr(child, kwargs, memo))
    return output


def convert_ssrnorm_to_batchnorm(module: nn.Module, momentum: Optional[float] = 0.1) -> nn.Module:
    r"""The inverse of :func:`convert_batchnorm`: replace every SSR layer by a BatchNorm layer.

    ``SSRNorm1d``/``2d``/``3d`` become ``BatchNorm1d``/``2d``/``3d`` and a converted ``SyncBatchNorm``
    becomes a ``SyncBatchNorm`` again, with the same ``num_features``, ``eps``, ``affine``, ``bias``,
    running statistics and ``num_batches_tracked``. The homeostatic gain is folded in so that the
    new layer computes the same function in eval mode: into the weight when the layer is affine,
    else into the running variance. The homeostatic state itself is dropped. A layer kept with
    ``track_running_stats=False`` has no BatchNorm equivalent (BatchNorm would use batch
    statistics) and raises.

    Args:
        module: the model, or a single SSR layer.
        momentum: the momentum of the new BatchNorm layers. Default: ``0.1``

    Returns:
        The model with its SSR layers replaced (a new layer if ``module`` itself is one).

    Examples::

        >>> net = convert_batchnorm(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)))
        >>> convert_ssrnorm_to_batchnorm(net)[1]
        BatchNorm1d(8, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)
    """
    return _convert_to_bn(module, momentum, {})


def _convert_to_bn(module: nn.Module, momentum: Optional[float], memo: dict[int, nn.Module]) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    output = module
    if isinstance(module, _SSRNorm):
        if not module.track_running_stats:
            raise ValueError(
                f"cannot convert {type(module).__name__} with track_running_stats=False to BatchNorm: "
                "its scale lives in the homeostatic gain alone, and BatchNorm would use batch statistics"
            )
        factory = _factory(module)
        common = dict(eps=module.eps, momentum=momentum, affine=module.affine,
                      track_running_stats=True, bias=module.bias is not None, **factory)
        if isinstance(module, SSRNorm1d):
            bn: _BatchNorm = nn.BatchNorm1d(module.num_features, **common)
        elif isinstance(module, SSRNorm2d):
            bn = nn.BatchNorm2d(module.num_features, **common)
        elif isinstance(module, SSRNorm3d):
            bn = nn.BatchNorm3d(module.num_features, **common)
        else:
            bn = nn.SyncBatchNorm(module.num_features, process_group=module.process_group, **common)
        with torch.no_grad():
            gain = module.gain
            bn.running_mean.copy_(module.running_mean)  # type: ignore[union-attr,arg-type]
            bn.num_batches_tracked.copy_(module.num_batches_tracked)  # type: ignore[union-attr]
            if module.affine:
                bn.weight.copy_(module.weight * gain)
                bn.weight.requires_grad_(module.weight.requires_grad)
                bn.running_var.copy_(module.running_var)  # type: ignore[union-attr,arg-type]
                if module.bias is not None:
                    bn.bias.copy_(module.bias)
                    bn.bias.requires_grad_(module.bias.requires_grad)
            else:
                var = (module.running_var + module.eps) / gain.square() - module.eps  # type: ignore[operator]
                bn.running_var.copy_(var.clamp_(min=0.0))  # type: ignore[union-attr]
        bn.train(module.training)
        output = bn
    memo[id(module)] = output
    for name, child in module.named_children():
        output.add_module(name, _convert_to_bn(child, momentum, memo))
    return output
