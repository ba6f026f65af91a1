"""One homeostatic update for every SSR layer of a model, with one collective for all."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lightning_ssr.core import ReduceFn
from lightning_ssr.norm.base import _SSRNorm

__all__ = ["homeostatic_step"]


def homeostatic_step(module: nn.Module, reduce_fn: Optional[ReduceFn] = None) -> int:
    """Apply the pending update of every SSR layer in ``module``, with one collective for all.

    For drivers of layers built with ``auto_update=False`` (such as a Lightning callback after
    each optimizer step): the statistics of all layers travel in one flat float32 tensor, reduced
    by ``reduce_fn``, else by the first layer's :meth:`~_SSRNorm.reduce_statistics` (one
    ``all_reduce`` when ``torch.distributed`` is initialized). Every process must call it.

    Args:
        module: the model holding SSR layers.
        reduce_fn: sums or averages a flat float32 tensor across processes. Default: ``None``

    Returns:
        The number of layers updated.

    Examples::

        >>> from lightning_ssr.norm import SSRNorm1d
        >>> net = nn.Sequential(nn.Linear(4, 8), SSRNorm1d(8, auto_update=False))
        >>> _ = net(torch.randn(16, 4))
        >>> int(net[1].num_batches_tracked), homeostatic_step(net), int(net[1].num_batches_tracked)
        (0, 1, 1)
    """
    layers = [m for m in module.modules() if isinstance(m, _SSRNorm)]
    if not layers:
        return 0
    with torch.no_grad():
        pending = [m._pending() for m in layers]
        device = layers[0].gain.device
        flat = torch.cat([p.to(device) for p in pending])
        if reduce_fn is not None:
            flat = reduce_fn(flat)
        else:
            flat = layers[0].reduce_statistics(flat)
        sizes = [p.numel() for p in pending]
        ends = torch.tensor(sizes).cumsum(0).sub_(1).tolist()
        counts = flat[ends].tolist()  # one host synchronization for all layers
        updated = 0
        for m, part, count in zip(layers, flat.split(sizes), counts):
            m._sums, m._count = None, 0.0
            if count > 0:
                m._apply_pooled(part[:-1].to(m.gain.device), count)
                updated += 1
    return updated
