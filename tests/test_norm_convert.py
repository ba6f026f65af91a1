"""Conversion of whole models (lightning_ssr.norm.convert): BatchNorm to SSRNorm and back."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.testing import assert_close

from lightning_ssr.norm import (
    SSRNorm1d,
    SSRNorm2d,
    SSRNorm3d,
    _SSRNorm,
    convert_batchnorm,
    convert_ssrnorm_to_batchnorm,
)

# ------------------------------------------------------------------------- conversion


class _Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        shared = nn.BatchNorm1d(6)
        self.features = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.volume = nn.Sequential(nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3, affine=False))
        self.heads = nn.ModuleDict({"a": nn.Sequential(nn.Linear(4, 6), shared), "b": shared})
        self.sync = nn.SyncBatchNorm(4, momentum=0.3)
        self.untracked = nn.BatchNorm1d(6, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean((2, 3))


def test_convert_a_nested_model() -> None:
    net = _Nested()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, _BatchNorm) and m.affine:
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    net.features[1](torch.randn(8, 4, 3, 3) * 2 + 1)  # a trained layer: running statistics to carry
    net.features[1].weight.requires_grad_(False)
    net.eval()
    reference = copy.deepcopy(net)
    out = convert_batchnorm(net, momentum=0.05, gain_rate=0.0)
    assert out is net
    assert not [m for m in out.modules() if isinstance(m, _BatchNorm)]
    assert type(out.features[1]) is SSRNorm2d and type(out.volume[1]) is SSRNorm3d
    assert type(out.heads["a"][1]) is SSRNorm1d and out.heads["a"][1] is out.heads["b"]  # sharing kept
    assert type(out.sync).__name__ == "_SSRNormXd" and out.sync.momentum == 0.05
    assert out.untracked.running_mean is None and out.volume[1].weight is None
    for name, new in out.named_modules():
        if isinstance(new, _SSRNorm):
            old = reference.get_submodule(name)
            assert new.num_features == old.num_features and new.eps == old.eps and not new.training
            assert new.gain_rate == 0.0
            if old.affine:
                assert isinstance(new.weight, nn.Parameter) and new.weight is not old.weight
                assert_close(new.weight, old.weight)
                assert_close(new.bias, old.bias)
                assert new.weight.requires_grad == old.weight.requires_grad
            if old.track_running_stats:
                assert_close(new.running_mean, old.running_mean)
                assert_close(new.running_var, old.running_var)
                assert bool(new.initialized) == (int(old.num_batches_tracked) > 0)
    # a converted trained layer computes what the BatchNorm computed in eval mode
    x = torch.randn(2, 4, 3, 3)
    assert_close(out.features[1](x), reference.features[1](x))
    # the root itself is replaced when it is a BatchNorm
    root = convert_batchnorm(nn.BatchNorm1d(3))
    assert type(root) is SSRNorm1d


def test_convert_torchvision_resnet18() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    names = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    out = convert_batchnorm(model)
    assert not [m for m in out.modules() if isinstance(m, _BatchNorm)]
    layers = {n: m for n, m in out.named_modules() if isinstance(m, SSRNorm2d)}
    assert set(layers) == set(names) and len(layers) == 20
    for n, w in names.items():
        assert_close(layers[n].weight, w)
    x = torch.randn(2, 3, 32, 32)
    out(x).sum().backward()
    assert all(m.weight.grad is not None for m in layers.values())
    assert out.eval()(x[:1]).shape == (1, 10)


def test_converted_resnet18_gives_the_same_output_in_train_and_eval_at_batch_1() -> None:
    """SSRNorm normalizes with its state, not the batch: one sample in training mode is normalized as
    in eval mode (each layer updates its state only after its output), to 1e-5."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = convert_batchnorm(torchvision.models.resnet18(num_classes=10))
    for _ in range(3):  # a state away from the warm start
        model(torch.randn(4, 3, 32, 32)).sum().backward()
    x = torch.randn(1, 3, 32, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    y_train = model.train()(x)
    model.load_state_dict(state)
    with torch.no_grad():
        y_eval = model.eval()(x)
    assert_close(y_train.detach(), y_eval, rtol=1e-5, atol=1e-5)
    model.train()(x)
    assert int(model.bn1.num_batches_tracked) == int(state["bn1.num_batches_tracked"]) + 1  # training updates it


@pytest.mark.parametrize("affine", [True, False])
def test_convert_back_to_batchnorm_computes_the_same_in_eval(affine: bool) -> None:
    net = nn.Sequential(nn.Linear(3, 4), SSRNorm1d(4, affine=affine), nn.Conv2d(1, 1, 1))
    net[1].load_state_dict({**net[1].state_dict(), "gain": torch.tensor([0.5, 1.0, 2.0, 1.5])})
    for _ in range(3):
        net[:2](torch.randn(8, 3))
    net.eval()
    x = torch.randn(5, 3)
    expected = net[:2](x)
    back = convert_ssrnorm_to_batchnorm(net)
    assert type(back[1]) is nn.BatchNorm1d and not back[1].training
    assert_close(back[:2](x), expected)
    assert type(convert_ssrnorm_to_batchnorm(SSRNorm3d(2))) is nn.BatchNorm3d
    xd = convert_batchnorm(nn.Sequential(nn.SyncBatchNorm(2)))
    assert type(convert_ssrnorm_to_batchnorm(xd)[0]) is nn.SyncBatchNorm


def test_conversion_errors() -> None:
    message = "convert_batchnorm takes ['affine', 'eps'] from each BatchNorm layer"
    with pytest.raises(TypeError, match=re.escape(message)):
        convert_batchnorm(nn.BatchNorm1d(2), affine=False, eps=1e-3)
    message = "Unexpected keyword arguments: ['gain']; SSRNorm's own arguments are: ['momentum'"
    with pytest.raises(TypeError, match=re.escape(message)):
        convert_batchnorm(nn.BatchNorm1d(2), gain=0.1)
    with pytest.raises(ValueError, match="`gain_rate` must be in"):
        convert_batchnorm(nn.Sequential(nn.BatchNorm1d(2)), gain_rate=-1.0)
    with pytest.raises(ValueError, match="cannot convert an uninitialized LazyBatchNorm2d: run one forward first"):
        convert_batchnorm(nn.Sequential(nn.LazyBatchNorm2d()))
    message = "cannot convert SSRNorm1d with track_running_stats=False to BatchNorm"
    with pytest.raises(ValueError, match=re.escape(message)):
        convert_ssrnorm_to_batchnorm(nn.Sequential(SSRNorm1d(2, track_running_stats=False)))
