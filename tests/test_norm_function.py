"""The autograd function of the SSR layers (lightning_ssr.norm.function): the projected gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lightning_ssr.norm import SSRNorm1d, SSRNorm2d
from lightning_ssr.norm.function import gradient_moments, projection_coefficients, update_gradient_moments

# ------------------------------------------------------------------- the projected gradient

def test_gradient_is_batchnorms_on_the_first_batch_and_plain_in_eval() -> None:
    x = torch.randn(8, 3, 4, 4) * 2 + 1
    upstream = torch.randn(8, 3, 4, 4)
    bn, ssr = nn.BatchNorm2d(3, eps=1e-5), SSRNorm2d(3, eps=1e-5)
    xb, xs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (bn(xb) * upstream).sum().backward()
    (ssr(xs) * upstream).sum().backward()
    # the warm start makes the state equal the batch statistics, so the projected gradient is BatchNorm's
    assert_close(xs.grad, xb.grad, rtol=1e-3, atol=1e-4)
    assert_close(ssr.weight.grad, bn.weight.grad, rtol=1e-3, atol=1e-4)
    assert_close(ssr.bias.grad, bn.bias.grad)
    # in eval mode the state is a constant: the gradient is the per-channel scale
    ssr.eval()
    xe = x.clone().requires_grad_(True)
    (ssr(xe) * upstream).sum().backward()
    scale = ssr.weight * ssr.gain / torch.sqrt(ssr.running_var + ssr.eps)
    assert_close(xe.grad, upstream * scale.detach().view(1, 3, 1, 1))


def test_projection_can_be_switched_off() -> None:
    m = SSRNorm1d(3, project_gradient=False)
    x = torch.randn(16, 3, requires_grad=True)
    upstream = torch.randn(16, 3)
    m(torch.randn(16, 3))
    scale = (m.weight * m.gain / torch.sqrt(m.running_var + m.eps)).detach()
    (m(x) * upstream).sum().backward()
    assert_close(x.grad, upstream * scale)


def test_double_backward_is_refused() -> None:
    m = SSRNorm1d(3)
    x = torch.randn(8, 3, requires_grad=True)
    (g,) = torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


# ---------------------------------------------------------------- the projection's maths


def test_projection_coefficients_are_the_regression_of_the_gradient() -> None:
    """k and c remove from g its least-squares fit on (1, u), per channel."""
    g, u = torch.randn(64, 3, dtype=torch.float64), torch.randn(64, 3, dtype=torch.float64) * 2 + 1
    moments = gradient_moments(g.sum(0), (g * u).sum(0), 64, (u.mean(0), u.pow(2).mean(0)))
    k, c = projection_coefficients(moments, 0.0, torch.float64)
    for ch in range(3):
        design = torch.stack([torch.ones(64, dtype=torch.float64), u[:, ch]], 1)
        fit = torch.linalg.lstsq(design, g[:, ch:ch + 1]).solution.flatten()
        assert_close(torch.stack([c[ch], k[ch]]), fit)
    assert projection_coefficients(moments.float(), 1e-5, torch.float16)[0].dtype == torch.float16


def test_gradient_moments_are_averaged_and_restarted_on_a_new_shape() -> None:
    running, steps = update_gradient_moments(None, 0, torch.ones(4, 2), 0.5)
    assert steps == 1
    running, steps = update_gradient_moments(running, steps, torch.full((4, 2), 3.0), 0.5)
    assert steps == 2
    assert_close(running, torch.full((4, 2), 2.0))
    running, steps = update_gradient_moments(running, steps, torch.full((4, 3), 5.0), 0.5)
    assert steps == 1 and running.shape == (4, 3)
