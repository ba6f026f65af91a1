"""The per-channel statistics of the SSR layers (lightning_ssr.norm.statistics), as pure functions."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lightning_ssr.core import rules
from lightning_ssr.norm.statistics import (
    all_reduce_statistics,
    batch_moments,
    batch_variance,
    channel_statistics,
    constant_like,
    needs_collective,
    pending_statistics,
    pooled_statistics,
    state_transform,
    unit_rms_gain,
    weighted_sums,
)

SHAPES = [(6, 5), (6, 5, 7), (6, 5, 4, 3), (6, 5, 3, 2, 2)]


def _reduce(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


@pytest.mark.parametrize("shape", SHAPES)
def test_batch_moments_are_the_per_channel_mean_and_mean_square(shape) -> None:
    x = torch.randn(shape) * 2 + 1
    mean, mean_sq, count = batch_moments(x)
    assert_close(mean, x.mean(_reduce(x)))
    assert_close(mean_sq, x.pow(2).mean(_reduce(x)))
    assert count == x.numel() // 5 and mean.shape == (5,)
    assert_close(batch_variance(mean, mean_sq), x.var(_reduce(x), unbiased=False), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batch_moments_of_low_precision_input_are_float32(dtype) -> None:
    mean, mean_sq, _ = batch_moments(torch.randn(4, 3).to(dtype))
    assert mean.dtype == mean_sq.dtype == torch.float32


def test_warm_start_values() -> None:
    assert_close(batch_variance(torch.tensor([3.0]), torch.tensor([8.0])), torch.tensor([0.0]))  # clamped
    gain = unit_rms_gain(torch.tensor([4.0, 1e6, 1e-6]), 1e-5, 10.0)
    assert_close(gain, torch.tensor([4.0 ** -0.5, 0.1, 10.0]), rtol=1e-4, atol=0)


def test_state_transform_returns_fresh_tensors() -> None:
    mean, var, gain = torch.tensor([1.0, -1.0]), torch.tensor([4.0, 0.25]), torch.tensor([1.0, 2.0])
    shift, scale = state_transform(mean, var, gain, 1e-5)
    assert_close(scale, gain / torch.sqrt(var + 1e-5))
    shift.add_(1)
    assert_close(mean, torch.tensor([1.0, -1.0]))  # the state is untouched by changes to the shift


def test_constant_like_is_cached_per_device_and_dtype() -> None:
    like = torch.zeros(3)
    ones = constant_like(None, like, 1.0)
    assert constant_like(ones, like, 1.0) is ones
    assert constant_like(ones, like.double(), 1.0).dtype == torch.float64


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("centered", [True, False])
def test_channel_statistics_match_their_definition(shape, centered: bool) -> None:
    x = torch.randn(shape) * 2 + 1
    shift = torch.randn(5) if centered else torch.zeros(5)
    scale = torch.rand(5) + 0.5
    view = [1, -1] + [1] * (x.dim() - 2)
    z = (x - shift.view(view)) * scale.view(view)
    mean, second, act = channel_statistics(x, batch_moments(x), shift, scale, centered, None)
    assert_close(mean, x.mean(_reduce(x)))
    u = x - shift.view(view) if centered else x
    assert_close(second, u.pow(2).mean(_reduce(x)), rtol=1e-4, atol=1e-5)
    assert_close(act, z.pow(2).mean(_reduce(x)), rtol=1e-4, atol=1e-5)  # the square from the moments
    _, _, act_abs = channel_statistics(x, batch_moments(x), shift, scale, centered, torch.abs)
    assert_close(act_abs, rules.neuron_activity(z, torch.abs, channel_dim=1))


def test_pending_and_pooled_statistics_round_trip() -> None:
    mean, second, act = torch.randn(4), torch.rand(4), torch.rand(4)
    sums = weighted_sums([mean, second, act], 8)
    flat = pending_statistics(sums, 8.0, 12, "cpu")
    assert flat.shape == (13,) and flat[-1] == 8
    pooled = pooled_statistics(flat[:-1], float(flat[-1]), 4, True)
    for got, expected in zip(pooled, (mean, second, act)):
        assert_close(got, expected)
    assert pooled_statistics(weighted_sums([act], 3), 3.0, 4, False)[:2] == (None, None)
    assert_close(pending_statistics(None, 0.0, 12, "cpu"), torch.zeros(13))


def test_without_a_process_group_nothing_is_reduced() -> None:
    statistics = torch.randn(7)
    assert not needs_collective(None)
    assert all_reduce_statistics(statistics, None) is statistics
