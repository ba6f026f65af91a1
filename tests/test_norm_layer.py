"""The SSR layers (lightning_ssr.norm.base and .layers): the BatchNorm contract, normalization
from the layer's own state, the homeostatic feedback, state dicts and argument errors."""

from __future__ import annotations

import math
import re
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.testing import assert_close

from lightning_ssr.norm import SSRNorm1d, SSRNorm2d, SSRNorm3d

# class, batchnorm class, input shapes it accepts
DIMS = [
    (SSRNorm1d, nn.BatchNorm1d, [(6, 5), (6, 5, 7)]),
    (SSRNorm2d, nn.BatchNorm2d, [(6, 5, 4, 3)]),
    (SSRNorm3d, nn.BatchNorm3d, [(6, 5, 3, 2, 2)]),
]
CASES = [(cls, shape) for cls, _, shapes in DIMS for shape in shapes]
STATE = ("running_mean", "running_var", "num_batches_tracked", "gain", "running_activity", "initialized")


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _channel_mean_square(z: torch.Tensor) -> torch.Tensor:
    dims = [0, *range(2, z.dim())]
    return z.pow(2).mean(dims)


# ------------------------------------------------------------- the BatchNorm contract


@pytest.mark.parametrize("cls,shape", CASES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_shape_dtype_parameters_and_buffers(cls, shape, affine: bool, track: bool) -> None:
    m = cls(5, affine=affine, track_running_stats=track)
    x = torch.randn(shape, requires_grad=True)
    for mode in (True, False):
        m.train(mode)
        y = m(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        y.pow(2).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        x.grad = None
    assert {n for n, _ in m.named_parameters()} == ({"weight", "bias"} if affine else set())
    assert (m.weight is None) == (not affine) and (m.bias is None) == (not affine)
    assert (m.running_mean is None) == (not track) and (m.running_var is None) == (not track)
    buffers = {n for n, b in m.named_buffers()}
    assert buffers == {k for k in STATE if track or not k.startswith("running_") or k == "running_activity"}
    assert int(m.num_batches_tracked) == 1 and bool(m.initialized)


def test_factory_kwargs_and_bias_flag() -> None:
    m = SSRNorm2d(3, device="cpu", dtype=torch.float64, bias=False)
    assert m.weight.dtype == torch.float64 and m.bias is None
    assert m.running_mean.dtype == m.gain.dtype == m.running_activity.dtype == torch.float64
    assert m.num_batches_tracked.dtype == torch.long and m.initialized.dtype == torch.bool
    y = m(torch.randn(4, 3, 2, 2, dtype=torch.float64))
    assert y.dtype == torch.float64
    meta = SSRNorm1d(4, device="meta")
    assert meta.weight.device.type == "meta" and meta.gain.device.type == "meta"
    moved = SSRNorm1d(4).double()  # Module._apply converts every floating point buffer
    assert moved.running_mean.dtype == moved.gain.dtype == torch.float64
    moved(torch.randn(3, 4, dtype=torch.float64))
    assert moved.to(torch.float32)(torch.randn(3, 4)).dtype == torch.float32


def test_extra_repr_and_resets() -> None:
    m = SSRNorm1d(4, momentum=0.05, set_point="layer_mean")
    text = repr(m)
    assert text.startswith("SSRNorm1d(4, eps=1e-05, momentum=0.05, affine=True, bias=True, "
                           "track_running_stats=True")
    assert "set_point='layer_mean'" in text and "gain_rate=0.01" in text
    m(torch.randn(8, 4) * 3 + 1)
    nn.init.constant_(m.weight, 2.0)
    m.reset_running_stats()
    assert_close(m.running_mean, torch.zeros(4))
    assert_close(m.running_var, torch.ones(4))
    assert int(m.num_batches_tracked) == 0 and not bool(m.initialized)
    assert_close(m.weight, torch.full((4,), 2.0))
    m.reset_parameters()
    assert_close(m.weight, torch.ones(4))


def test_not_a_batchnorm_so_sync_batchnorm_conversion_leaves_it_alone() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), SSRNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    assert not isinstance(net[1], _BatchNorm)
    out = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert type(out[1]) is SSRNorm2d and type(out[3]) is nn.SyncBatchNorm


# ---------------------------------------------------- normalization from its own state


def test_warm_start_normalizes_the_first_batch() -> None:
    m = SSRNorm2d(3)
    x = torch.randn(16, 3, 5, 5) * torch.tensor([1.0, 4.0, 0.1]).view(1, 3, 1, 1) + 5.0
    y = m(x)
    assert bool(m.initialized)
    assert_close(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    assert_close(y, nn.BatchNorm2d(3)(x), atol=1e-3, rtol=1e-3)  # what BatchNorm outputs in training


@pytest.mark.parametrize("cls,shape", CASES)
def test_batch_size_one_trains(cls, shape) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(cls(5), nn.ReLU())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(30):
        x = torch.randn(1, *shape[1:]) * 2 + 1
        x.requires_grad_(True)
        loss = (net(x) - 0.5).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(x.grad).all()
        opt.step()
    layer = net[0]
    assert int(layer.num_batches_tracked) == 30
    # a variance from the spread between single samples, even with one value per channel per step
    assert (layer.running_var > 0.5).all() and torch.isfinite(layer.running_var).all()
    assert x.grad.abs().sum() > 0 and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cls,shape", CASES)
def test_output_does_not_depend_on_the_rest_of_the_batch(cls, shape) -> None:
    m = cls(5)
    m(torch.randn(shape) * 2 + 1)  # warm start
    state = _state(m)
    x = torch.randn(shape)
    y_batch = m(x)
    m.load_state_dict(state)
    y_alone = m(x[:1])
    assert_close(y_alone, y_batch[:1])


@pytest.mark.parametrize("cls,shape", CASES)
@pytest.mark.parametrize("track", [True, False])
def test_train_and_eval_agree_for_the_same_state(cls, shape, track: bool) -> None:
    m = cls(5, track_running_stats=track)
    for _ in range(3):
        m(torch.randn(shape) * 2 + 1)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1, 1)
    state = _state(m)
    x = torch.randn(shape)
    y_train = m.train()(x)
    assert int(m.num_batches_tracked) == 4  # the train forward updated the state after the output
    m.load_state_dict(state)
    y_eval = m.eval()(x)
    assert_close(y_train, y_eval)
    assert_close(_state(m)["num_batches_tracked"], state["num_batches_tracked"])  # eval changes nothing


def test_state_moves_slowly_with_the_configured_time_constant() -> None:
    m = SSRNorm1d(2, momentum=0.1)
    m(torch.zeros(4, 2))  # warm start and the first update (weight 1): mean 0, variance 0
    m.num_batches_tracked.fill_(100)  # a long history: the weight of an update is now the momentum
    m(torch.full((4, 2), 10.0))
    assert_close(m.running_mean, torch.full((2,), 1.0))  # one step moves it 10 %, not all the way
    # the variance: the mean square deviation from the running mean that normalized the batch
    assert_close(m.running_var, torch.full((2,), 0.1 * 100.0))


# ----------------------------------------------------------------- homeostatic feedback


def test_gain_feedback_moves_channel_activity_toward_the_set_point() -> None:
    """Feedback alone (no running statistics): after the input grows 3-fold, the gain pulls each
    channel's mean square back toward the set point 1; with the gain switched off it stays at 9."""
    result = {}
    for rate in (0.0, 0.05):
        torch.manual_seed(0)
        m = SSRNorm2d(4, momentum=0.05, gain_rate=rate, max_change=0.05, track_running_stats=False)
        m(torch.randn(8, 4, 4, 4))  # warm start: unit root mean square
        start = _channel_mean_square(m(torch.randn(8, 4, 4, 4) * 3.0).detach())
        for _ in range(300):
            m(torch.randn(8, 4, 4, 4) * 3.0)
        end = _channel_mean_square(m.eval()(torch.randn(64, 4, 4, 4) * 3.0).detach())
        result[rate] = ((start - 1).abs().mean().item(), (end - 1).abs().mean().item(), m.gain.clone())
    assert result[0.05][0] > 6 and result[0.05][1] < 0.1 * result[0.05][0]
    assert result[0.0][1] > 0.9 * result[0.0][0]
    assert_close(result[0.05][2], torch.full((4,), 1 / 3), rtol=0.05, atol=0)


def test_gain_feedback_removes_the_lag_of_the_running_statistics() -> None:
    """While the input grows 1 % per step the slow running variance lags behind and the output's
    mean square settles near 2; the gain's integral feedback brings it back to the set point."""
    result = {}
    for rate in (0.0, 0.01):
        torch.manual_seed(0)
        m = SSRNorm2d(4, momentum=0.02, gain_rate=rate, max_change=0.05)
        dev = []
        for t in range(400):
            y = m(torch.randn(8, 4, 4, 4) * 1.01**t).detach()
            dev.append((_channel_mean_square(y) - 1).mean().item())
        result[rate] = sum(dev[-50:]) / 50
    assert result[0.0] > 0.7
    assert abs(result[0.01]) < 0.2 * result[0.0]


def test_layer_mean_set_point_balances_channels() -> None:
    torch.manual_seed(0)
    m = SSRNorm1d(3, momentum=0.001, set_point="layer_mean", gain_rate=0.05, max_change=0.05,
                  track_running_stats=False)
    m(torch.randn(32, 3))
    spread = torch.tensor([0.5, 1.0, 2.0])
    before = _channel_mean_square(m(torch.randn(32, 3) * spread).detach())
    for _ in range(400):
        m(torch.randn(32, 3) * spread)
    after = _channel_mean_square(m.eval()(torch.randn(512, 3) * spread).detach())
    assert after.std() < 0.3 * before.std()


def test_gain_is_a_multiplicative_synapse_like_gain_and_never_writes_gamma_beta() -> None:
    """The gain multiplies the channel's whole (centered) input, as scaling all its incoming synapses
    would; the learned gamma and beta are left to the optimizer."""
    m = SSRNorm2d(3, gain_rate=0.5, max_change=0.1)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    learned = [p.clone() for p in m.parameters()]
    for _ in range(20):
        m(torch.randn(4, 3, 3, 3) * torch.tensor([1.0, 3.0, 0.3]).view(1, 3, 1, 1))
    assert not torch.allclose(m.gain, torch.ones(3))
    for before, after in zip(learned, m.parameters()):
        assert_close(after, before)
    x = torch.randn(2, 3, 3, 3)
    y = m.eval()(x)
    gain = m.gain.clone()
    m.gain.fill_(1.0)
    y1 = m(x)
    beta = m.bias.view(1, 3, 1, 1)
    assert_close(y - beta, (y1 - beta) * gain.view(1, 3, 1, 1))


def test_gain_is_bounded_by_max_change_and_max_gain() -> None:
    m = SSRNorm1d(2, gain_rate=10.0, max_change=0.02, max_gain=1.05)
    m(torch.randn(16, 2))
    before = m.gain.clone()
    m(torch.randn(16, 2) * 100)
    assert_close(m.gain, before * 0.98)  # far too active, yet one update changes the gain by 2 % at most
    for _ in range(20):
        m(torch.randn(16, 2) * 100)
    assert_close(m.gain, m.gain.new_full((2,), 1 / 1.05))


# ------------------------------------------------------------------------ state dicts


@pytest.mark.parametrize("track", [True, False])
def test_state_dict_round_trip(track: bool) -> None:
    m = SSRNorm2d(3, track_running_stats=track)
    for _ in range(4):
        m(torch.randn(4, 3, 2, 2) * 2 + 1)
    sd = m.state_dict()
    assert sd._metadata[""]["version"] == 3  # type: ignore[attr-defined]
    fresh = SSRNorm2d(3, track_running_stats=track)
    fresh.load_state_dict(sd)
    for k, v in sd.items():
        assert_close(fresh.state_dict()[k], v)
    x = torch.randn(4, 3, 2, 2)
    assert_close(fresh.eval()(x), m.eval()(x))
    # training resumes from the loaded state rather than warm-starting again
    fresh.train()(x)
    assert int(fresh.num_batches_tracked) == 5


def test_loads_a_batchnorm_checkpoint_and_an_older_version() -> None:
    bn = nn.BatchNorm2d(3)
    bn(torch.randn(8, 3, 2, 2) * 2 + 1)
    sd = bn.state_dict()  # version 2: BatchNorm's layout
    m = SSRNorm2d(3)
    m.load_state_dict(sd)
    assert_close(m.running_mean, bn.running_mean)
    assert_close(m.running_var, bn.running_var)
    assert_close(m.gain, torch.ones(3))
    assert bool(m.initialized) and int(m.num_batches_tracked) == 1
    # version 1: no num_batches_tracked either; a fresh state warm-starts on its first batch
    old = OrderedDict((k, v) for k, v in SSRNorm2d(3).state_dict().items()
                      if k in ("weight", "bias", "running_mean", "running_var"))
    old._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    m.load_state_dict(old)
    assert int(m.num_batches_tracked) == 0 and not bool(m.initialized)
    assert_close(m.running_activity, torch.ones(3))
    # the current version is loaded strictly
    current = SSRNorm2d(3).state_dict()
    del current["gain"]
    with pytest.raises(RuntimeError, match="Missing key.*gain"):
        SSRNorm2d(3).load_state_dict(current)


# ------------------------------------------------------------------------------ errors

@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"num_features": 0}, ValueError, "`num_features` must be >= 1, got 0"),
        ({"num_features": 2.5}, TypeError, "`num_features` must be an int, got 2.5 of type float"),
        ({"eps": 0.0}, ValueError, "`eps` must be in (0.0, 1.0], got 0.0"),
        ({"momentum": 1.5}, ValueError, "`momentum` must be in (0.0, 1.0], got 1.5"),
        ({"momentum": 0}, ValueError, "`momentum` must be in (0.0, 1.0], got 0"),
        ({"affine": 1}, TypeError, "`affine` must be a bool, got 1 of type int"),
        ({"track_running_stats": "yes"}, TypeError, "`track_running_stats` must be a bool, got 'yes'"),
        ({"bias": None}, TypeError, "`bias` must be a bool, got None"),
        ({"auto_update": 0}, TypeError, "`auto_update` must be a bool, got 0"),
        ({"project_gradient": "no"}, TypeError, "`project_gradient` must be a bool, got 'no'"),
        ({"activity": "sigmoid"}, ValueError,
         "`activity` must be one of ['square', 'abs', 'relu'] or a callable, got 'sigmoid'"),
        ({"set_point": "mean"}, ValueError,
         "`set_point` must be a number in [0, inf) or one of ['layer_mean'], got 'mean'"),
        ({"set_point": -1.0}, ValueError, "`set_point` must be in [0.0, inf], got -1.0"),
        ({"gain_rate": -0.1}, ValueError, "`gain_rate` must be in [0.0, 10.0], got -0.1"),
        ({"gain_rate": "fast"}, TypeError, "`gain_rate` must be a number, got 'fast' of type str"),
        ({"max_change": 1.0}, ValueError, "`max_change` must be in (0.0, 1.0), got 1.0"),
        ({"max_gain": 0.5}, ValueError, "`max_gain` must be in [1.0, inf), got 0.5"),
        ({"max_gain": math.inf}, ValueError, "`max_gain` must be finite, got inf"),
        ({"grad_momentum": 0.0}, ValueError, "`grad_momentum` must be in (0.0, 1.0], got 0.0"),
    ],
)
def test_construction_errors(kwargs, error, message) -> None:
    args = {"num_features": 4, **kwargs}
    with pytest.raises(error, match=re.escape(message)):
        SSRNorm2d(**args)


@pytest.mark.parametrize(
    "cls,shape,message",
    [
        (SSRNorm1d, (2, 3, 4, 5), "expected 2D or 3D input (got 4D input)"),
        (SSRNorm1d, (3,), "expected 2D or 3D input (got 1D input)"),
        (SSRNorm2d, (2, 3, 4), "expected 4D input (got 3D input)"),
        (SSRNorm3d, (2, 3, 4, 5), "expected 5D input (got 4D input)"),
        (SSRNorm2d, (2, 5, 4, 4), "expected input with 3 channels in dimension 1 (got 5 channels)"),
    ],
)
def test_input_errors(cls, shape, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        cls(3)(torch.randn(shape))
    with pytest.raises(ValueError, match=re.escape(message)):
        cls(3).eval()(torch.randn(shape))
