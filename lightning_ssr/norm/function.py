"""The autograd function of the SSR layers, and the maths of its projected gradient.

:class:`_StateNorm` normalizes with the layer's state as a constant; in training mode its
backward removes from the input gradient its regression on ``(1, x - running_mean)``, as
BatchNorm's backward does, with running averages of the four moments of that regression
(:func:`gradient_moments`, :func:`update_gradient_moments`, :func:`projection_coefficients`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from lightning_ssr.core import rules

if TYPE_CHECKING:
    from lightning_ssr.norm.base import _SSRNorm

__all__ = ["gradient_moments", "projection_coefficients", "update_gradient_moments"]


class _StateNorm(torch.autograd.Function):
    """``y = (x - shift) * scale * weight + bias`` with ``shift`` and ``scale`` constants (the state).

    The same arithmetic as BatchNorm's eval mode, but the effective weight ``weight * scale`` is
    formed outside autograd, which keeps CPU kernels on their fast path. In training mode the
    gradient to the input is projected as in BatchNorm's backward, with running averages of the
    gradient statistics in place of the batch's (see :meth:`_SSRNorm._gradient_projection`).
    """

    @staticmethod
    def forward(ctx: Any, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], shift: Tensor,
                scale: Tensor, ones: Tensor, layer: Optional[_SSRNorm]) -> Tensor:
        w = scale if weight is None else weight * scale
        ctx.save_for_backward(input, w, shift, scale, ones)
        ctx.layer = layer
        ctx.moments = None if layer is None else layer._last_moments
        return F.batch_norm(input, shift, ones, w, bias, False, 0.0, 0.0)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        input, w, shift, scale, ones = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        layer = ctx.layer
        project = layer is not None and need_input
        grad_input, grad_w, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad, input, w, shift, ones, None, None, False, 0.0,
            [need_input and not project, need_weight or project, need_bias or project],
        )
        if project:
            # grad_w = sum(g * (x - shift)), grad_bias = sum(g) per channel
            k, c = layer._gradient_projection(grad_bias, grad_w, input.numel() // input.shape[1], ctx.moments)
            shape = [1, -1] + [1] * (input.dim() - 2)
            # dx = w * (g - c - k * (x - shift)): the x-term as one fast eval-mode batch_norm pass
            grad_input = F.batch_norm(input, shift, ones, (w * k).neg_(), (w * c).neg_(), False, 0.0, 0.0)
            grad_input.addcmul_(grad, w.view(shape))
        grad_weight = grad_w * scale if need_weight else None
        return (grad_input, grad_weight, grad_bias if need_bias else None, None, None, None, None)


def gradient_moments(grad_sum: Tensor, grad_dev_sum: Tensor, count: int, moments: tuple[Tensor, Tensor]) -> Tensor:
    """The four moments of one batch's gradient regression, stacked in float32.

    Args:
        grad_sum: ``sum(g)`` per channel.
        grad_dev_sum: ``sum(g * u)`` per channel, ``u = x - m`` the input centered by the running mean.
        count: the number of elements per channel.
        moments: ``mean(u)`` and ``mean(u^2)`` per channel.

    Returns:
        A ``(4, C)`` tensor: ``mean(g)``, ``mean(g u)``, ``mean(u)``, ``mean(u^2)``.

    Examples::

        >>> gradient_moments(torch.tensor([2.0]), torch.tensor([4.0]), 2, (torch.zeros(1), torch.ones(1)))
        tensor([[1.],
                [2.],
                [0.],
                [1.]])
    """
    return torch.stack([grad_sum.float() / count, grad_dev_sum.float() / count,
                        moments[0].float(), moments[1].float()])


def update_gradient_moments(
    running: Optional[Tensor], steps: int, moments: Tensor, grad_momentum: float
) -> tuple[Tensor, int]:
    """Average ``moments`` into the running gradient moments (bias-corrected, weight ``grad_momentum``).

    ``running`` is updated in place; a missing one, or one of another shape or device, is
    replaced by ``moments``.

    Args:
        running: the running moments, or ``None`` before the first projected backward.
        steps: the number of batches averaged into ``running`` so far.
        moments: this batch's :func:`gradient_moments`.
        grad_momentum: the weight of one batch once the first ``1 / grad_momentum`` are averaged.

    Returns:
        The running moments and the new number of batches averaged into them.

    Examples::

        >>> running, steps = update_gradient_moments(None, 0, torch.ones(4, 1), 0.5)
        >>> update_gradient_moments(running, steps, torch.full((4, 1), 3.0), 0.5)[0].flatten()
        tensor([2., 2., 2., 2.])
    """
    steps += 1
    if running is None or running.shape != moments.shape or running.device != moments.device:
        return moments, 1
    rules.ema_update(running, moments, steps, 1.0 / grad_momentum)
    return running, steps


def projection_coefficients(moments: Tensor, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The per-channel ``k`` and ``c`` of the projected input gradient ``w * (g - c - k * u)``.

    The regression of the gradient ``g`` on ``(1, u)``: ``k = cov(g, u) / (var(u) + eps)`` and
    ``c = mean(g) - k * mean(u)``, from the moments of :func:`gradient_moments`.

    Examples::

        >>> projection_coefficients(torch.tensor([[1.0], [2.0], [0.0], [1.0]]), 0.0, torch.float32)
        (tensor([2.]), tensor([1.]))
    """
    mean_g, mean_gu, mean_u, mean_uu = moments
    k = (mean_gu - mean_u * mean_g) / (mean_uu - mean_u * mean_u).clamp_(min=0.0).add_(eps)
    c = mean_g - k * mean_u
    return k.to(dtype), c.to(dtype)
