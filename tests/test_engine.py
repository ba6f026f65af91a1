"""The SSR engine in plain PyTorch: maths against hand-computed values, and each part's direction."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from conftest import FunctionalMLP, tiny_cnn, tiny_mlp
from lightning_ssr.core import NonFiniteActivityWarning, SSRConfig, SSREngine, find_layers
from lightning_ssr.core import rules


def _train_steps(engine: SSREngine, net: nn.Module, steps: int, x: torch.Tensor, lr: float = 0.0) -> None:
    """Run forward/backward/step cycles the way a front end drives the engine."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        net(x).sum().backward()
        engine.before_step()
        opt.step()
        engine.after_step(opt)


# ------------------------------------------------------------------ rules


def test_scaling_factor_hand_computed() -> None:
    a = torch.tensor([0.5, 0.1, 0.0])
    s = torch.tensor([0.1, 0.1, 0.1])
    # 1 + 0.1 * (s - a) = [0.96, 1.0, 1.01], bounded to +-0.02
    assert_close(rules.scaling_factor(a, s, 0.1, 0.02), torch.tensor([0.98, 1.0, 1.01]))


def test_ema_update_bias_corrected_then_time_constant() -> None:
    avg = torch.zeros(1)
    for k, v in enumerate([2.0, 4.0, 6.0], start=1):
        rules.ema_update(avg, torch.tensor([v]), steps_seen=k, tau=2.0)
    # weights 1, 1/2, then 1/2 (tau): 2 -> 3 -> 4.5
    assert_close(avg, torch.tensor([4.5]))


def test_norm_factor_and_gate_and_importance() -> None:
    assert_close(rules.norm_factor(torch.tensor([4.0]), torch.tensor([2.0]), 0.5, 0.9, 1e-8), torch.tensor([0.75]))
    assert_close(rules.protection_gate(torch.tensor([2.0]), 0.5), torch.tensor([0.5]))
    assert_close(rules.relative_importance(torch.tensor([0.0, 2.0, 4.0]), 1e-8), torch.tensor([0.0, 1.0, 2.0]))


@pytest.mark.parametrize("name", ["relu", "abs", "square"])
def test_neuron_activity_linear_and_conv(name: str) -> None:
    phi = rules.activity_function(name)
    z = torch.randn(4, 3, 5, 5)
    expected = phi(z).mean(dim=(0, 2, 3))
    assert_close(rules.neuron_activity(z, phi, channel_dim=1), expected)
    z2 = torch.randn(6, 7).to(torch.bfloat16)
    got = rules.neuron_activity(z2, phi, channel_dim=-1)
    assert got.dtype == torch.float32
    assert_close(got, phi(z2.float()).mean(0))


# --------------------------------------------------------------- discovery


def test_find_layers_leaves_output_out_and_handles_heads() -> None:
    assert list(find_layers(tiny_mlp())) == ["0", "2"]
    assert list(find_layers(tiny_cnn())) == ["0", "2"]

    class MultiHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 8)
            self.heads = nn.ModuleDict({"0": nn.Linear(8, 2), "1": nn.Linear(8, 2)})

    assert list(find_layers(MultiHead())) == ["body"]

    from avalanche.models import MultiHeadClassifier

    class AvalancheHeads(nn.Module):  # heads at classifier.classifiers.<task>.classifier
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
            self.classifier = MultiHeadClassifier(8, 2)
            self.classifier.classifiers["1"] = type(self.classifier.classifiers["0"])(8, 2)

    assert list(find_layers(AvalancheHeads())) == ["body.0", "body.2"]
    assert list(find_layers(tiny_mlp(), include=["4"])) == ["4"]
    assert list(find_layers(tiny_mlp(), exclude=["2"], track_output=True)) == ["0", "4"]


def test_find_layers_errors() -> None:
    with pytest.raises(ValueError, match=r"`include` pattern 'enc\*' matches no layer; candidate layers are \['0', '2', '4'\]"):
        find_layers(tiny_mlp(), include=["enc*"])
    with pytest.raises(ValueError, match="No layer to track in Sequential: `layer_types`"):
        find_layers(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="No layer left to track"):
        find_layers(nn.Sequential(nn.Linear(2, 2)))


# ------------------------------------------------------------- the mechanism


def test_sensing_matches_hand_computed_mean_and_ignores_eval() -> None:
    net = tiny_mlp()
    engine = SSREngine(net, SSRConfig(update_every=1, tau=10.0))
    engine.attach()
    x = torch.randn(32, 8)
    net(x)
    st = engine.layers["0"]
    expected = torch.relu(torch.nn.functional.linear(x, net[0].weight, net[0].bias)).mean(0).detach()
    assert_close(st.acc, expected)
    assert st.acc_count == 1
    with torch.no_grad():
        net(x)
    assert st.acc_count == 1, "no-grad probes must not count as activity"
    net.eval()
    net(x)
    assert st.acc_count == 1, "evaluation forwards must not count as activity"
    net.train()
    engine.before_step()
    engine.after_step()
    assert_close(st.activity, expected)  # first step: bias-corrected EMA = value
    assert st.acc_count == 0 and float(st.acc.abs().sum()) == 0.0
    engine.detach()


@pytest.mark.parametrize("make", [tiny_mlp, FunctionalMLP], ids=["module-relu", "functional-relu"])
@pytest.mark.parametrize("target", [0.05, 2.0], ids=["too-active", "too-quiet"])
def test_scaling_moves_activity_toward_set_point(make, target: float) -> None:
    net = make()
    engine = SSREngine(net, SSRConfig(update_every=1, scaling_rate=1.0, set_point=target, warmup_steps=0, max_change=0.05, tau=1.0,
                                      scale_down=True))
    engine.attach()
    x = torch.randn(64, 8)
    first = next(iter(engine.layers.values()))
    with torch.no_grad():
        start = torch.relu(first.module(x)).mean().item()
    _train_steps(engine, net, 40, x)
    with torch.no_grad():
        end = torch.relu(first.module(x)).mean().item()
    assert abs(end - target) < abs(start - target) * 0.8, (start, end, target)
    if target < start:
        assert end < start
    else:
        assert end > start
    engine.detach()


def test_scaling_is_multiplicative_and_keeps_relative_strengths() -> None:
    net = tiny_mlp()
    engine = SSREngine(net, SSRConfig(update_every=1, scaling_rate=1.0, set_point=0.01, warmup_steps=0, tau=1.0, scale_down=True))
    engine.attach()
    w0 = net[0].weight.detach().clone()
    _train_steps(engine, net, 5, torch.randn(16, 8))
    w1 = net[0].weight.detach()
    ratio = w1 / w0
    # every incoming weight of one neuron was multiplied by the same factor
    assert_close(ratio, ratio[:, :1].expand_as(ratio))
    assert bool((ratio < 1).all())


def test_conv_layers_scale_per_channel() -> None:
    net = tiny_cnn()
    engine = SSREngine(net, SSRConfig(update_every=1, scaling_rate=1.0, set_point=0.0, warmup_steps=0, scale_down=True))
    engine.attach()
    w0 = net[0].weight.detach().clone()
    _train_steps(engine, net, 3, torch.randn(8, 1, 8, 8))
    ratio = (net[0].weight.detach() / w0).reshape(4, -1)
    assert_close(ratio, ratio[:, :1].expand_as(ratio))
    assert bool((ratio < 1).all())


def test_self_set_points_are_measured_after_warmup() -> None:
    net = tiny_mlp()
    engine = SSREngine(net, SSRConfig(update_every=1, scaling_rate=0.5, set_point="self", warmup_steps=3, tau=2.0))
    engine.attach()
    _train_steps(engine, net, 3, torch.randn(16, 8))
    assert torch.isnan(engine.layers["0"].set_point).all()
    _train_steps(engine, net, 1, torch.randn(16, 8))
    assert not torch.isnan(engine.layers["0"].set_point).any()


def test_layer_mean_set_point_balances_load() -> None:
    net = tiny_mlp(hidden=32)
    engine = SSREngine(net, SSRConfig(update_every=1, scaling_rate=2.0, set_point="layer_mean", warmup_steps=0, max_change=0.05, tau=1.0))
    engine.attach()
    x = torch.randn(128, 8)
    with torch.no_grad():
        a0 = torch.relu(net[0](x)).mean(0)
    _train_steps(engine, net, 60, x)
    with torch.no_grad():
        a1 = torch.relu(net[0](x)).mean(0)
    alive = a0 > 1e-3
    cv = lambda a: (a[alive].std() / a[alive].mean()).item()  # noqa: E731
    assert cv(a1) < cv(a0) * 0.7, "activities of the layer's neurons should become more equal"


def test_synaptic_total_homeostasis_restores_norm() -> None:
    net = tiny_mlp()
    engine = SSREngine(net, SSRConfig(update_every=1, norm_rate=0.5, max_change=0.2, warmup_steps=0))
    engine.attach()
    x = torch.randn(16, 8)
    _train_steps(engine, net, 1, x)  # records the norm set points
    target = engine.layers["0"].norm_target.clone()
    with torch.no_grad():
        net[0].weight[0].mul_(3.0)  # some synapses strengthened
    _train_steps(engine, net, 30, x)
    norms = net[0].weight.detach().norm(dim=1)
    assert_close(norms, target, rtol=0.02, atol=1e-4)


def test_consolidation_importance_and_protection_gate_gradients() -> None:
    net = tiny_mlp()
    engine = SSREngine(net, SSRConfig(update_every=1, consolidation=3.0, protection="gradient", min_plasticity=0.0))
    engine.attach()
    x = torch.randn(32, 8)
    _train_steps(engine, net, 4, x)
    task_mean = engine.layers["0"].task_activity / engine.layers["0"].task_steps
    engine.consolidate()
    imp = engine.layers["0"].importance
    assert_close(imp, task_mean / task_mean.mean())
    # gradients of neuron i's incoming and outgoing weights are divided by 1 + 3 * imp_i
    net.zero_grad()
    net(x).sum().backward()
    g_in, g_out = net[0].weight.grad.clone(), net[2].weight.grad.clone()
    engine.before_step()
    gate = 1.0 / (1.0 + 3.0 * imp)
    assert_close(net[0].weight.grad, g_in * gate[:, None])
    layer2_gate = engine.layers["2"].gate
    assert_close(net[2].weight.grad, g_out * gate[None, :] * layer2_gate[:, None])
    engine.detach()


def test_update_protection_divides_the_optimizer_step_even_under_adam() -> None:
    net = tiny_mlp()
    engine = SSREngine(net, SSRConfig(update_every=1, consolidation=1e6, protection="update", protect_output=True,
                                          min_plasticity=0.0))
    engine.attach()
    x = torch.randn(32, 8)
    _train_steps(engine, net, 2, x)
    engine.consolidate()
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    important = engine.layers["0"].importance > 0.5
    w0 = net[0].weight.detach().clone()
    head0 = net[4].weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        net(x).sum().backward()
        engine.before_step()
        opt.step()
        engine.after_step()
    moved = (net[0].weight.detach() - w0).abs().sum(1)
    assert bool((moved[important] < 1e-4).all()), "important neurons must be frozen at lambda=1e6"
    # the output layer is not tracked but is the consumer of layer 2: with protect_output its columns are protected
    assert (net[4].weight.detach() - head0).abs().max() < 1e-3
    engine.detach()


def test_synapses_into_output_units_no_task_used_stay_plastic() -> None:
    """Class-incremental: after a task on classes 0 and 1, synapses into class 2 learn freely."""
    import copy

    net = tiny_mlp()
    # output units weighed by their argmax wins, one fixed strength (tests/test_engine_parts.py has the targets)
    engine = SSREngine(net, SSRConfig(update_every=1, consolidation=10.0, protection="update", output_targets=False,
                                      min_plasticity=0.0))
    engine.attach()
    x = torch.randn(64, 8)
    y = (x[:, 0] > 0).long()  # a learnable task on classes 0 and 1
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        engine.before_step()
        opt.step()
        engine.after_step()
    engine.consolidate()
    out_imp = engine.outputs["4"].importance
    assert out_imp[2] < 0.01 and out_imp[0] > 1.0  # how often each unit won, relative to the layer
    free = copy.deepcopy(net)
    head0 = net[4].weight.detach().clone()
    y2 = torch.full((64,), 2)
    for model, eng in ((net, engine), (free, None)):
        o = torch.optim.SGD(model.parameters(), lr=0.1)
        o.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y2).backward()
        if eng is not None:
            eng.before_step()
        o.step()
        if eng is not None:
            eng.after_step()
    important = engine.layers["2"].importance > 1.0
    moved = (net[4].weight.detach() - head0).abs()[:, important].sum(1)
    moved_free = (free[4].weight.detach() - head0).abs()[:, important].sum(1)
    assert moved[2] > 0.9 * moved_free[2], "synapses into the new class must learn"
    assert moved[0] < 0.2 * moved_free[0], "synapses between important neurons and an old class are held"


@pytest.mark.parametrize("protect_output", [False, True])
def test_output_layer_and_new_heads_stay_plastic_by_default(protect_output: bool) -> None:
    net = tiny_mlp()
    engine = SSREngine(net, SSRConfig(update_every=1, consolidation=1e6, protect_output=protect_output))
    engine.attach()
    x = torch.randn(32, 8)
    _train_steps(engine, net, 2, x)
    engine.consolidate()
    gated = {name for name, _ in engine.named_parameters_gated()}
    _train_steps(engine, net, 1, x)  # the next forward finds the consumers again
    gated = {name for name, _ in engine.named_parameters_gated()}
    assert ("4.weight" in gated) is protect_output
    assert {"0.weight", "0.bias", "2.weight", "2.bias"} <= gated
    # a head created after the consolidation (a new task's head) is never gated
    net[4] = nn.Linear(16, 3)
    engine.consolidate()
    net[4] = nn.Linear(16, 3)
    _train_steps(engine, net, 1, x)
    assert "4.weight" not in {name for name, _ in engine.named_parameters_gated()}


def test_penalty_is_zero_before_consolidation_and_positive_after() -> None:
    net = tiny_mlp()
    engine = SSREngine(net, SSRConfig(update_every=1, consolidation=1.0, protection="penalty"))
    engine.attach()
    x = torch.randn(32, 8)
    net(x)
    assert float(engine.penalty()) == 0.0
    _train_steps(engine, net, 2, x, lr=0.0)
    engine.consolidate()
    out = net(x * 3.0)  # shifted input: activity departs from the anchors
    pen = engine.penalty()
    assert float(pen.detach()) > 0 and pen.requires_grad
    (out.sum() + pen).backward()


def test_non_finite_activity_is_skipped_with_a_warning() -> None:
    net = tiny_mlp()
    engine = SSREngine(net, SSRConfig(update_every=1, scaling_rate=1.0, set_point=0.1, warmup_steps=0))
    engine.attach()
    w0 = net[0].weight.detach().clone()
    net(torch.full((4, 8), math.nan))
    engine.before_step()
    with pytest.warns(NonFiniteActivityWarning, match=r"step 1: the activity of layer\(s\) \[.0., .2.\] is NaN"):
        engine.after_step()
    assert engine.skipped == 1
    assert_close(net[0].weight.detach(), w0)
    assert torch.isfinite(engine.layers["0"].activity).all()


def test_state_is_o_neurons_and_round_trips() -> None:
    net = tiny_mlp(hidden=16)
    engine = SSREngine(net, SSRConfig(update_every=1, scaling_rate=0.5, protection="update"))
    engine.attach()
    _train_steps(engine, net, 3, torch.randn(8, 8))
    engine.consolidate()
    neurons = sum(st.n for st in [*engine.layers.values(), *engine.outputs.values()])
    units = sum(st.n for st in engine.outputs.values())
    # nine float32 vectors per neuron (and output unit), four more per output unit for its target and
    # gradient-reach counts
    assert engine.extra_state_bytes() == (neurons * 9 + units * 4) * 4
    state = engine.state_dict()
    other = SSREngine(tiny_mlp(hidden=16), SSRConfig(update_every=1, scaling_rate=0.5, protection="update"))
    other.load_state_dict(state)
    for name in engine.layers:
        for key, t in engine.layers[name].tensors().items():
            assert_close(other.layers[name].tensors()[key], t, equal_nan=True)
    assert (other.step, other.tasks) == (engine.step, engine.tasks)
    with pytest.raises(ValueError, match="SSR state holds layers"):
        SSREngine(tiny_mlp(hidden=16), track_output=True).load_state_dict(state)


def test_reduce_fn_sees_one_flat_float32_tensor() -> None:
    seen: list[torch.Tensor] = []

    def reduce(t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return t * 0 + 1.0  # pretend every process saw activity 1

    net = tiny_mlp()
    engine = SSREngine(net, SSRConfig(update_every=1, tau=1.0), reduce_fn=reduce)
    engine.attach()
    _train_steps(engine, net, 1, torch.randn(4, 8))
    # two layers and the output's activity, and the output's target and gradient-reach counts (output_targets)
    assert len(seen) == 1 and seen[0].dtype == torch.float32 and seen[0].numel() == 16 + 16 + 3 + 3 + 3
    assert_close(engine.outputs["4"].reached, torch.ones(3))  # the reduced counts, in one collective
    assert_close(engine.layers["0"].activity, torch.ones(16))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tau": 0.5}, r"`tau` must be in \[1.0, inf\], got 0.5"),
        ({"update_every": 0}, r"`update_every` must be >= 1, got 0"),
        ({"update_every": 1.5}, r"`update_every` must be an int, got 1.5"),
        ({"set_point": "median"}, r"`set_point` must be one of \['self', 'layer_mean'\], got 'median'"),
        ({"set_point": -0.1}, r"`set_point` must be in \[0.0, inf\], got -0.1"),
        ({"max_change": 1.0}, r"`max_change` must be in \(0.0, 1.0\), got 1.0"),
        ({"scaling_rate": -1}, r"`scaling_rate` must be in \[0.0, 10.0\], got -1"),
        ({"consolidation": float("nan")}, r"`consolidation` must be finite, got nan"),
        ({"activity": "tanh"}, r"`activity` must be one of \['relu', 'abs', 'square'\], got 'tanh'"),
        ({"protection": "ewc"}, r"`protection` must be one of \['gradient', 'update', 'penalty', 'anchor'\], got 'ewc'"),
        ({"importance": "fisher"}, r"`importance` must be one of \['activity', 'activity_grad'\], got 'fisher'"),
        ({"gate_outgoing": 1}, r"`gate_outgoing` must be a bool, got 1"),
        ({"recycle_outgoing": "cut"}, r"`recycle_outgoing` must be one of \['keep', 'zero'\], got 'cut'"),
        ({"anchor_lr": 0.0}, r"`anchor_lr` must be in \(0.0, inf\], got 0.0"),
        ({"anchor_lr": "adam"}, r"`anchor_lr` must be a number, got 'adam' of type str"),
        ({"warmup_steps": True}, r"`warmup_steps` must be an int, got True"),
        ({"rate": 0.1}, r"Unexpected keyword arguments: \['rate'\]"),
    ],
)
def test_config_errors_name_argument_range_and_value(kwargs, message) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        SSRConfig.from_kwargs(**kwargs)


def test_config_accepts_a_callable_activity() -> None:
    cfg = SSRConfig(activity=torch.sigmoid)
    assert cfg.to_dict()["activity"] == "sigmoid"
    net = tiny_mlp()
    engine = SSREngine(net, cfg.replace(update_every=1))
    engine.attach()
    x = torch.randn(4, 8)
    net(x)
    expected = torch.sigmoid(torch.nn.functional.linear(x, net[0].weight, net[0].bias)).mean(0).detach()
    assert_close(engine.layers["0"].acc, expected)


def test_rule_is_local_each_neuron_uses_only_its_own_activity() -> None:
    """Perturbing one neuron changes that neuron's scale factor and no other's."""
    import copy

    x = torch.randn(32, 8)
    base = tiny_mlp()
    factors = []
    for boost in (1.0, 3.0):
        net = copy.deepcopy(base)
        with torch.no_grad():
            net[0].weight[5].mul_(boost)  # neuron 5 of layer 0 fires more
        engine = SSREngine(net, SSRConfig(update_every=1, scaling_rate=0.5, set_point=0.2, warmup_steps=0, max_change=0.5))
        engine.attach()
        net(x)
        engine.before_step()
        engine.after_step()
        factors.append(engine.layers["0"].factor.clone())
    changed = (factors[0] != factors[1]).nonzero().flatten().tolist()
    assert changed == [5]


def test_slow_timescale_long_run_activity_forgets_with_time_constant_tau() -> None:
    """A step change of input reaches the long-run activity only over ~tau steps."""
    net = tiny_mlp()
    engine = SSREngine(net, SSRConfig(update_every=1, tau=20.0, scaling_rate=0.0))
    engine.attach()
    x = torch.randn(64, 8).abs()
    _train_steps(engine, net, 40, x)  # settle on the first input
    before = engine.layers["0"].activity.clone()
    with torch.no_grad():
        target = torch.relu(torch.nn.functional.linear(x * 4.0, net[0].weight, net[0].bias)).mean(0)
    _train_steps(engine, net, 20, x * 4.0)  # one time constant later
    reached = (engine.layers["0"].activity - before) / (target - before)
    alive = (target - before).abs() > 1e-3
    # after tau steps an exponential average has covered 1 - (1 - 1/tau)^tau ~ 64 % of the jump
    assert_close(reached[alive], torch.full_like(reached[alive], 1 - (1 - 1 / 20) ** 20), atol=1e-4, rtol=0)


@pytest.mark.parametrize("protection", ["anchor", "update", "gradient"])
def test_channels_last_weights_train_as_contiguous_ones(protection: str) -> None:
    """A ``channels_last`` model (non-contiguous 4-D weights) gets the same SSR as its contiguous twin."""

    def run(channels_last: bool) -> nn.Module:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Flatten(),
                            nn.Linear(6 * 6 * 6, 4))
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
            assert not net[2].weight.is_contiguous()
        engine = SSREngine(net, SSRConfig(update_every=1, sense_every=1, warmup_steps=0, norm_rate=0.05,
                                          recycle_below=0.5, protection=protection))
        engine.attach()
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(1)
        for task in range(2):
            for _ in range(4):
                x = torch.randn(4, 3, 10, 10, generator=gen)
                if channels_last:
                    x = x.to(memory_format=torch.channels_last)
                opt.zero_grad()
                net(x).pow(2).mean().backward()
                engine.before_step()
                opt.step()
                engine.after_step(opt)
            engine.consolidate()
        return net

    for a, b in zip(run(True).parameters(), run(False).parameters()):
        assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_config_round_trips_through_a_dict() -> None:
    cfg = SSRConfig(consolidation=5.0, anchor_rate=0.05, sense_every=3, set_point=0.2, protection="update")
    data = cfg.to_dict()
    assert isinstance(data, dict) and data["sense_every"] == 3
    assert SSRConfig.from_kwargs(**data) == cfg
    assert SSRConfig(**data) == cfg
    with pytest.raises(TypeError, match="Unexpected keyword arguments: \\['speed'\\]"):
        SSRConfig.from_kwargs(**data, speed=1)
