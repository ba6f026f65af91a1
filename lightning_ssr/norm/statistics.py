"""The per-channel statistics of an SSR layer, as pure functions of tensors.

What one training forward measures (:func:`batch_moments`, :func:`channel_statistics`), how the
state turns into the shift and scale of the normalization (:func:`state_transform`), how a fresh
state is warm-started (:func:`batch_variance`, :func:`unit_rms_gain`), and how the statistics of
one update travel: weighted by element counts into one flat float32 tensor
(:func:`weighted_sums`, :func:`pending_statistics`), combined across processes
(:func:`all_reduce_statistics`) and divided out again (:func:`pooled_statistics`). The layer
(:class:`~lightning_ssr.norm.base._SSRNorm`) owns the state; these functions only compute.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_ssr.core import rules

__all__ = [
    "all_reduce_statistics",
    "batch_moments",
    "batch_variance",
    "channel_statistics",
    "constant_like",
    "needs_collective",
    "pending_statistics",
    "pooled_statistics",
    "state_transform",
    "unit_rms_gain",
    "weighted_sums",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def batch_moments(input: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and mean square of the batch (float32 at least), and the element count.

    Two plain reductions, as ``flax.linen.BatchNorm``'s fast variance (cheaper than Welford);
    the variance loses precision only where a channel's mean exceeds its spread ~1000-fold.

    Args:
        input: a batch with channels in dimension 1.

    Returns:
        The mean and the mean square over every dimension but 1, and the number of elements
        per channel.

    Examples::

        >>> batch_moments(torch.tensor([[1.0, -2.0], [3.0, 2.0]]))
        (tensor([2., 0.]), tensor([5., 4.]), 2)
    """
    x = input.float() if input.dtype in _LOW_PRECISION else input
    dims = [0, *range(2, x.dim())]
    return x.mean(dims), torch.mul(x, x).mean(dims), x.numel() // x.shape[1]


def batch_variance(mean: Tensor, mean_sq: Tensor) -> Tensor:
    """The variance ``E[x^2] - E[x]^2`` from the moments, clamped at zero (a warm start's).

    Examples::

        >>> batch_variance(torch.tensor([2.0, 0.0]), torch.tensor([5.0, 4.0]))
        tensor([1., 4.])
    """
    return torch.addcmul(mean_sq, mean, mean, value=-1).clamp_(min=0.0)


def unit_rms_gain(mean_sq: Tensor, eps: float, max_gain: float) -> Tensor:
    """The gain that scales each channel to unit root mean square, in ``[1 / max_gain, max_gain]``.

    Examples::

        >>> unit_rms_gain(torch.tensor([4.0, 1e-4]), 0.0, 10.0)
        tensor([ 0.5000, 10.0000])
    """
    gain = torch.rsqrt(mean_sq + eps)
    return gain.clamp_(1.0 / max_gain, max_gain)


def state_transform(running_mean: Tensor, running_var: Tensor, gain: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The running state as a per-channel shift and scale ``gain / sqrt(running_var + eps)``.

    Fresh tensors, because autograd keeps them for the backward while the state is updated in
    place after the forward.

    Examples::

        >>> state_transform(torch.tensor([1.0]), torch.tensor([4.0]), torch.tensor([3.0]), 0.0)
        (tensor([1.]), tensor([1.5000]))
    """
    shift = running_mean.clone()
    scale = torch.rsqrt(running_var + eps).mul_(gain)
    return shift, scale


def constant_like(cached: Optional[Tensor], like: Tensor, value: float) -> Tensor:
    """``cached`` if it matches ``like``'s device and dtype, else a new tensor full of ``value``.

    Examples::

        >>> ones = constant_like(None, torch.zeros(2), 1.0)
        >>> ones, constant_like(ones, torch.zeros(2), 1.0) is ones
        (tensor([1., 1.]), True)
    """
    if cached is None or cached.device != like.device or cached.dtype != like.dtype:
        cached = torch.full_like(like, value)
    return cached


def channel_statistics(
    input: Tensor,
    moments: tuple[Tensor, Tensor, int],
    shift: Tensor,
    scale: Tensor,
    centered: bool,
    phi: Optional[Callable[[Tensor], Tensor]],
) -> tuple[Tensor, Tensor, Tensor]:
    """What the channel carried in this batch: its mean, its mean square around the running
    mean, and its activity (``phi`` of the normalized output ``z``, averaged).

    Args:
        input: the batch, channels in dimension 1.
        moments: the batch's :func:`batch_moments`.
        shift: the per-channel shift of the normalization (the running mean).
        scale: the per-channel scale of the normalization.
        centered: whether the layer keeps running statistics; without them the second moment is
            the plain mean square.
        phi: the activity function on ``z``, or ``None`` for the square, which follows from the
            moments without another pass over the input.

    Returns:
        The per-channel mean, second moment and activity.

    Examples::

        >>> x = torch.tensor([[1.0], [3.0]])
        >>> one = torch.ones(1)
        >>> channel_statistics(x, batch_moments(x), one, one, True, None)
        (tensor([2.]), tensor([2.]), tensor([2.]))
    """
    mean, mean_sq, _ = moments
    if centered:
        # E[(x - m)^2] = E[x^2] - m (2 E[x] - m)
        second = torch.addcmul(mean_sq, shift, torch.mul(mean, 2.0).sub_(shift), value=-1).clamp_(min=0.0)
    else:
        second = mean_sq
    if phi is None:
        # z = scale * (x - m) is affine in x, so its mean square follows from the moments.
        act = torch.mul(scale, scale).mul_(second)
    else:
        shape = [1, -1] + [1] * (input.dim() - 2)
        z = (input - shift.view(shape)) * scale.view(shape)
        act = rules.neuron_activity(z, phi, channel_dim=1)
    return mean, second, act


def weighted_sums(stats: Sequence[Tensor], count: int) -> Tensor:
    """One batch's statistics as a flat float32 tensor, weighted by its element count.

    Examples::

        >>> weighted_sums([torch.tensor([1.0]), torch.tensor([0.5])], 4)
        tensor([4., 2.])
    """
    return torch.cat([p.float() for p in stats]).mul_(float(count))


def pending_statistics(sums: Optional[Tensor], count: float, size: int, device: Any) -> Tensor:
    """The pending statistics as one flat float32 tensor: sums weighted by element counts,
    then the count (zeros when nothing is pending, so every replica contributes).

    Examples::

        >>> pending_statistics(torch.tensor([4.0, 2.0]), 4.0, 2, "cpu")
        tensor([4., 2., 4.])
        >>> pending_statistics(None, 0.0, 2, "cpu")
        tensor([0., 0., 0.])
    """
    if sums is None or count == 0:
        return torch.zeros(size + 1, device=device)
    return torch.cat([sums, sums.new_tensor([count])])


def pooled_statistics(
    sums: Tensor, count: float, num_features: int, centered: bool
) -> tuple[Optional[Tensor], Optional[Tensor], Tensor]:
    """The pooled per-channel mean, second moment and activity from summed statistics.

    Without running statistics (``centered=False``) the sums hold the activity alone, and the
    mean and second moment are ``None``.

    Examples::

        >>> pooled_statistics(torch.tensor([4.0, 2.0, 8.0]), 4.0, 1, True)
        (tensor([1.]), tensor([0.5000]), tensor([2.]))
    """
    stats = sums.div(count)
    if centered:
        mean, second, act = stats.split(num_features)
        return mean, second, act
    return None, None, stats


def needs_collective(process_group: Any) -> bool:
    """Whether ``torch.distributed`` is initialized with more than one process in the group.

    Examples::

        >>> needs_collective(None)  # no process group initialized
        False
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    group = process_group if process_group is not None else dist.group.WORLD
    return dist.get_world_size(group) > 1


def all_reduce_statistics(statistics: Tensor, process_group: Any) -> Tensor:
    """Sum ``statistics`` in place over ``process_group`` (``None``: the whole world) with one
    ``all_reduce`` when :func:`needs_collective`; else return it unchanged.

    Examples::

        >>> all_reduce_statistics(torch.tensor([4.0, 2.0]), None)
        tensor([4., 2.])
    """
    if needs_collective(process_group):
        group = process_group if process_group is not None else dist.group.WORLD
        dist.all_reduce(statistics, group=group)
    return statistics
