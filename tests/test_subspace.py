"""Input-subspace protection (``subspace_energy``): the bases, the projection, the engine around them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lightning_ssr.core import SSRConfig, SSREngine
from lightning_ssr.core.state import LayerState
from lightning_ssr.core.subspace import InputSubspace, input_rows, nystrom_eigenpairs, sketch_matrix


def _rows_in(span: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` inputs that lie in the column span of ``span`` (``(in, r)``)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, span.shape[1], generator=g) @ span.T


def test_the_basis_holds_the_asked_share_of_each_tasks_energy_and_grows_by_what_is_new() -> None:
    lin = nn.Linear(6, 4)
    st, sub = LayerState("0", lin), InputSubspace(energy=0.99, rows=64)
    eye = torch.eye(6)
    sub.observe(st, _rows_in(eye[:, :2], 64, 0))  # task 1: the first two input directions
    sub.consolidate([st], reduce_fn=None)
    basis = sub.bases["0"]
    assert basis.shape == (6, 2)
    assert_close(basis @ basis.T, torch.diag(torch.tensor([1.0, 1, 0, 0, 0, 0])), atol=1e-5, rtol=0)
    sub.observe(st, _rows_in(eye[:, 1:4], 64, 1))  # task 2: one old direction, two new
    sub.consolidate([st], reduce_fn=None)
    basis = sub.bases["0"]
    assert basis.shape == (6, 4)  # only the two new directions were added
    assert_close(basis.T @ basis, torch.eye(4), atol=1e-5, rtol=0)
    sub.observe(st, _rows_in(eye[:, :1], 16, 2))  # task 3: nothing new
    sub.consolidate([st], reduce_fn=None)
    assert sub.bases["0"].shape == (6, 4)


def test_a_lower_energy_keeps_fewer_directions() -> None:
    lin = nn.Linear(5, 3)
    x = torch.randn(200, 5) * torch.tensor([10.0, 3.0, 1.0, 0.3, 0.1])
    ks = []
    for energy in (0.5, 0.9, 0.999):
        st, sub = LayerState("0", lin), InputSubspace(energy=energy, rows=200)
        sub.observe(st, x)
        sub.consolidate([st], reduce_fn=None)
        ks.append(sub.bases["0"].shape[1])
    assert ks[0] < ks[1] < ks[2] and ks[0] >= 1


def test_a_wide_layers_basis_matches_the_exact_decomposition_without_touching_the_global_seed() -> None:
    # 300 inputs: the randomized subspace iteration runs (2 * 32 < 300), not the full eigh
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2000, 300, generator=g) * 0.95 ** torch.arange(300.0)
    second = (x.T @ x / x.shape[0]).double()
    exact = torch.linalg.eigvalsh(second).flip(0)
    for energy in (0.6, 0.9):  # 9 and 22 of the sketch's 64 directions
        need = energy * float(exact.sum())
        k_exact = int((torch.cumsum(exact, 0) < need).sum()) + 1
        torch.manual_seed(0)
        before = torch.rand(1)
        lin = nn.Linear(300, 8)
        st, sub = LayerState("0", lin), InputSubspace(energy=energy, rows=2000)
        sub.observe(st, x)
        torch.manual_seed(0)
        sub.consolidate([st], reduce_fn=None)
        assert_close(torch.rand(1), before)  # the draw of the start used a generator of its own
        basis = sub.bases["0"].double()
        assert k_exact <= basis.shape[1] <= k_exact + 2, (basis.shape[1], k_exact)
        assert_close(basis.T @ basis, torch.eye(basis.shape[1], dtype=torch.float64), atol=1e-5, rtol=0)
        assert float(torch.trace(basis.T @ second @ basis)) >= need * (1 - 1e-6)


def test_the_nystrom_sketch_finds_the_leading_directions_outside_the_basis() -> None:
    g = torch.Generator().manual_seed(5)
    q = torch.linalg.qr(torch.randn(100, 100, generator=g, dtype=torch.float64)).Q
    moment = q @ torch.diag(0.7 ** torch.arange(100, dtype=torch.float64)) @ q.T
    omega = sketch_matrix(100, 32, None)
    values, vectors = nystrom_eigenpairs(moment @ omega, omega)
    assert_close(values[:5], 0.7 ** torch.arange(5, dtype=torch.float64), atol=1e-3, rtol=0)
    assert_close((vectors[:, :5].T @ q[:, :5]).abs(), torch.eye(5, dtype=torch.float64), atol=1e-3, rtol=0)
    basis = q[:, :3]  # with the first three directions held, the sketch finds the next ones
    omega = sketch_matrix(100, 32, basis)
    assert float((basis.T @ omega).abs().max()) < 1e-12
    values, vectors = nystrom_eigenpairs(moment @ omega - basis @ (basis.T @ (moment @ omega)), omega)
    assert_close(values[:2], 0.7 ** torch.arange(3, 5, dtype=torch.float64), atol=1e-3, rtol=0)
    assert_close((vectors[:, :2].T @ q[:, 3:5]).abs(), torch.eye(2, dtype=torch.float64), atol=1e-3, rtol=0)


def test_omega_is_drawn_once_per_shape_and_a_caller_cannot_change_the_next_one() -> None:
    basis = torch.linalg.qr(torch.randn(50, 4, dtype=torch.float64)).Q
    for b in (None, basis):
        first = sketch_matrix(50, 16, b)
        expected = first.clone()
        first.zero_()  # a caller writing into what it got
        again = sketch_matrix(50, 16, b)
        assert torch.equal(again, expected)
    draw = torch.randn(50, 16, generator=torch.Generator().manual_seed(50), dtype=torch.float64)
    assert torch.equal(sketch_matrix(50, 16, None), torch.linalg.qr(draw).Q)  # the seeded draw, as before the cache


def test_the_state_grows_with_the_inputs_not_their_square() -> None:
    lin = nn.Linear(1000, 10)
    st, sub = LayerState("0", lin), InputSubspace(energy=0.6, rows=32, sketch=64)
    sub.observe(st, torch.randn(32, 1000))
    assert sub.nbytes() == 2 * 1000 * 64 * 4 + 2 * 4  # the sketch and its Omega, two energy sums
    assert sub.nbytes() < lin.weight.numel() * 4 * 13  # where the moment would take 100x the weight


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_projection_keeps_old_outputs_and_leaves_the_rest_free(channels_last: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
    st, sub = LayerState("c", conv), InputSubspace(energy=0.999, rows=512)
    old = torch.zeros(8, 3, 6, 6)
    old[:, 0] = torch.randn(8, 6, 6)  # old inputs live on channel 0 only
    for _ in range(4):
        sub.observe(st, old)
    sub.consolidate([st], reduce_fn=None)
    anchor = conv.weight.detach().clone(memory_format=torch.contiguous_format)
    with torch.no_grad():
        conv.weight.add_(torch.randn_like(conv.weight))  # a later task moves every synapse
    moved = conv.weight.detach().clone()
    sub.project([st], lambda p: anchor)
    with torch.no_grad():
        before = nn.functional.conv2d(old, anchor, conv.bias, padding=1)
        after = conv(old)
    assert_close(after, before, atol=1e-4, rtol=0)  # the old inputs see the old weights
    assert_close(conv.weight[:, 1:], moved[:, 1:], atol=1e-5, rtol=0)  # channels no old input used stay free
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_the_projection_follows_new_anchors_and_a_weight_given_new_storage() -> None:
    lin = nn.Linear(3, 2, bias=False)
    st, sub = LayerState("0", lin), InputSubspace(energy=0.999, rows=64)
    sub.observe(st, torch.tensor([[1.0, 0.0, 0.0]]).repeat(8, 1))  # old inputs along the first input only
    sub.consolidate([st], reduce_fn=None)
    anchors = [torch.zeros(2, 3)]

    def moved_then_projected() -> torch.Tensor:
        with torch.no_grad():
            lin.weight.fill_(5.0)
        sub.project([st], lambda p: anchors[0])
        return lin.weight.detach()[:, 0]

    assert_close(moved_then_projected(), torch.zeros(2))
    anchors[0] = torch.ones(2, 3)  # a task's end sets new anchors
    assert_close(moved_then_projected(), torch.ones(2))
    lin.weight.data = lin.weight.data.clone()  # new storage (as a move to another device gives)
    assert_close(moved_then_projected(), torch.ones(2))


def test_below_anchor_lr_the_projection_removes_that_share_of_the_drift_as_the_pull_shrinks() -> None:
    """``W <- W - f (W - A) U U^T`` with ``f = min(lr / anchor_lr, 1)``: at a small learning rate the new
    classes of a class-incremental stream were not learned (Permuted MNIST at 1e-4, see the README)."""
    lin = nn.Linear(3, 2, bias=False)
    st, sub = LayerState("0", lin), InputSubspace(energy=0.999, rows=64)
    sub.observe(st, torch.tensor([[1.0, 0.0, 0.0]]).repeat(8, 1))
    sub.consolidate([st], reduce_fn=None)
    with torch.no_grad():
        lin.weight.fill_(4.0)
    sub.project([st], lambda p: torch.zeros(2, 3), lambda p: 0.25)
    assert_close(lin.weight.detach(), torch.tensor([[3.0, 4.0, 4.0]] * 2))  # a quarter of the drift along it

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    engine = SSREngine(net, SSRConfig(subspace_energy=0.999, sense_every=1, update_every=2, warmup_steps=0))
    engine.attach()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)  # the default anchor_lr is 1e-3
    eye = torch.eye(8)
    for task, span in enumerate((eye[:, :3], eye[:, 2:])):
        for i in range(6):
            _step(net, engine, opt, _rows_in(span, 32, 100 * task + i), _labels(i))
        if task == 0:
            engine.consolidate()
    assert engine.anchoring.lr_factor_of(net[0].weight) == pytest.approx(0.1)
    opt.param_groups[0]["lr"] = 2e-3  # at or above anchor_lr: the whole drift again
    _step(net, engine, opt, _rows_in(eye[:, 2:], 32, 999), _labels(0))
    _step(net, engine, opt, _rows_in(eye[:, 2:], 32, 998), _labels(1))
    assert engine.anchoring.lr_factor_of(net[0].weight) == 1.0
    opt.param_groups[0]["lr"] = 5e-4
    _step(net, engine, opt, _rows_in(eye[:, 2:], 32, 997), _labels(2))
    _step(net, engine, opt, _rows_in(eye[:, 2:], 32, 996), _labels(3))
    twin = SSREngine(copy.deepcopy(net), engine.config)
    twin.load_state_dict(engine.state_dict())  # a resumed run projects with the factor the last pull used
    assert twin.anchoring.lr_factor_of(twin.model[0].weight) == pytest.approx(0.5)
    engine.detach()


def test_input_rows_reads_patches_in_the_weights_column_order() -> None:
    conv = nn.Conv2d(2, 3, 2, bias=False)
    x = torch.randn(1, 2, 3, 3)
    rows = input_rows(conv, x, rows=100)
    assert rows.shape == (4, 8)
    assert_close(rows @ conv.weight.detach().reshape(3, -1).T, conv(x).detach().flatten(2)[0].T, atol=1e-5, rtol=0)


def _step(net: nn.Module, engine: SSREngine, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One training step with the engine around the optimizer's."""
    opt.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    engine.before_step()
    opt.step()
    engine.after_step(opt)


def _labels(i: int) -> torch.Tensor:
    return torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(i))


def test_the_engine_keeps_a_layers_response_to_the_first_tasks_inputs() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    cfg = SSRConfig(subspace_energy=0.999, sense_every=1, update_every=2, warmup_steps=0)
    engine = SSREngine(net, cfg)
    engine.attach()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    eye = torch.eye(8)

    def train(span: torch.Tensor, seed: int) -> None:
        for i in range(20):
            _step(net, engine, opt, _rows_in(span, 32, seed * 100 + i), _labels(i))

    train(eye[:, :3], 1)
    engine.consolidate()
    old = _rows_in(eye[:, :3], 50, 7)
    w_old = net[0].weight.detach().clone()
    train(eye[:, 2:], 2)  # task 2 on one shared input direction and five new ones, at a rate that moves all
    assert not torch.allclose(net[0].weight, w_old, atol=1e-3)  # the layer learned task 2
    assert_close(old @ net[0].weight.detach().T, old @ w_old.T, atol=1e-4, rtol=0)  # task 1's inputs see no change
    assert engine.extra_state_bytes() > SSREngine(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)),
                                                  SSRConfig()).extra_state_bytes()
    engine.detach()


def test_every_kth_step_projects_and_every_task_ends_projected() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    cfg = SSRConfig(subspace_energy=0.999, protect_every=3, recycle_below=0.0, sense_every=1, update_every=2,
                    warmup_steps=0)
    engine = SSREngine(net, cfg)
    engine.attach()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    eye = torch.eye(8)

    def step(span: torch.Tensor, i: int) -> float:
        """One training step on inputs in ``span``; the first layer's drift along task 1's inputs after it."""
        opt.zero_grad()
        x, y = _rows_in(span, 32, i), torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(i))
        nn.functional.cross_entropy(net(x), y).backward()
        engine.before_step()
        opt.step()
        engine.after_step(opt)
        basis = engine.subspace.bases.get("0")
        if basis is None:
            return float("nan")
        return float(((net[0].weight.detach() - engine.anchoring.anchor_of(net[0].weight)) @ basis).abs().max())

    for i in range(20):
        step(eye[:, :3], i)
    engine.consolidate()
    old = _rows_in(eye[:, :3], 50, 7)
    w_old = net[0].weight.detach().clone()
    drifts = [step(eye, 100 + i) for i in range(7)]  # task 2 on every direction, old ones included
    assert all(d < 1e-5 for d in drifts[2::3]), drifts  # steps 3 and 6: projected
    assert all(d > 1e-3 for i, d in enumerate(drifts) if (i + 1) % 3), drifts  # the steps between drift
    engine.consolidate()  # task 2 ends at its 7th step, between two projections: projected once more
    assert_close(old @ net[0].weight.detach().T, old @ w_old.T, atol=1e-4, rtol=0)
    engine.detach()


@pytest.mark.parametrize("power", [2.0, 1.0, 0.0])
def test_the_pull_follows_how_far_a_tasks_inputs_fall_where_old_ones_did(power: float) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    cfg = SSRConfig(subspace_energy=0.5, overlap_power=power, min_plasticity=0.0, recycle_below=0.0,
                    sense_every=1, update_every=1, warmup_steps=0)
    engine = SSREngine(net, cfg)
    engine.attach()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    eye = torch.eye(8)

    def train(span: torch.Tensor, seed: int, steps: int = 10) -> None:
        for i in range(steps):
            _step(net, engine, opt, _rows_in(span, 32, seed * 100 + i).abs(), _labels(i))

    train(eye[:, :4], 1)
    engine.consolidate()
    assert engine.overlap == {}
    train(eye[:, 4:], 2, steps=4)  # inputs where no old one was: (almost) no pull on the first layer
    if power:
        assert 0.0 <= engine.overlap["0"] < 0.05, engine.overlap
        names, energies = engine.subspace.task_energies()  # as summed at the last update (the last step)
        for name, (total, inside) in zip(names, energies.view(-1, 2).tolist()):
            assert engine.overlap[name] == round(min(1.0, inside / total / 0.5) ** power, 2)
        assert engine.anchoring._scales[id(net[0].weight)] == engine.overlap["0"]
    else:
        assert engine.overlap == {} and engine.anchoring._scales == {}
    overlap = dict(engine.overlap)
    again = SSREngine(net, cfg)
    again.load_state_dict(engine.state_dict())  # saved and restored with the rest
    assert again.overlap == overlap and again.anchoring._scales == engine.anchoring._scales
    engine.consolidate()
    assert engine.overlap == {} and engine.anchoring._scales == {}  # a new task starts with the full pull
    train(eye[:, :4], 3, steps=2)  # the first task's inputs again: the full pull
    assert engine.overlap.get("0", 1.0) == 1.0
    engine.detach()


def test_a_task_whose_inputs_miss_the_old_ones_drifts_further_from_the_anchors() -> None:
    def drift(power: float) -> float:
        """The first layer's distance from its anchor after task 2, whose inputs miss task 1's."""
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        cfg = SSRConfig(subspace_energy=0.5, overlap_power=power, anchor_rate=0.5, min_plasticity=0.0,
                        recycle_below=0.0, sense_every=1, update_every=1, warmup_steps=0, protect_every=1)
        engine = SSREngine(net, cfg)
        engine.attach()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for task, cols in enumerate((slice(0, 4), slice(4, 8))):
            for i in range(6):
                x = torch.zeros(32, 8)
                x[:, cols] = torch.rand(32, 4, generator=torch.Generator().manual_seed(task * 100 + i))
                _step(net, engine, opt, x, torch.arange(32) % 3)
            if task == 0:
                engine.consolidate()
        engine.detach()
        return float((net[0].weight.detach() - engine.anchoring.anchor_of(net[0].weight)).norm())

    assert drift(2.0) > 1.5 * drift(0.0)  # the pull was lifted where the new inputs lie


@pytest.mark.parametrize("second", ["class", "domain"])
@pytest.mark.parametrize("unused_outputs", [False, True])
def test_the_projection_holds_the_output_units_the_current_task_trains_toward(unused_outputs: bool, second: str) -> None:
    """Output units no finished task used stay free unless ``subspace_unused_outputs``; units a finished
    task used stay projected while the current task trains toward them too (domain-incremental) and are
    left free, as the gates and the pull leave them, when it does not (the old classes of a
    class-incremental task)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    cfg = SSRConfig(subspace_energy=0.999, subspace_unused_outputs=unused_outputs, sense_every=1, update_every=2,
                    warmup_steps=0)
    engine = SSREngine(net, cfg)
    assert list(engine.outputs) == ["2"]
    engine.attach()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)

    def train(classes: tuple[int, int], seed: int) -> None:
        for i in range(20):
            x = torch.randn(32, 8, generator=torch.Generator().manual_seed(seed * 100 + i))
            y = torch.tensor(classes)[torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(i))]
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            engine.before_step()
            opt.step()
            engine.after_step(opt)

    train((0, 1), 1)
    engine.consolidate()
    units = engine.subspace.units.get("2")
    assert (units is None) if unused_outputs else (units.tolist() == [True, True, False, False])
    train((2, 3) if second == "class" else (0, 1), 2)
    held_old = second == "domain"
    assert engine.subspace.units["2"].tolist() == [held_old] * 2 + [unused_outputs] * 2
    out = net[2].weight.detach()
    basis = engine.subspace.bases["2"]
    along_old = ((out - engine.anchoring.anchor_of(net[2].weight)) @ basis).abs()  # each unit's drift along task 1's inputs
    for unit, held in enumerate([held_old] * 2 + [unused_outputs] * 2):
        if held:  # answers task 1's inputs as before
            assert float(along_old[unit].max()) < 1e-4, unit
        else:  # learned on every direction
            assert float(along_old[unit].max()) > 1e-2, unit
    engine.detach()


def test_configuration_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"`subspace_energy` must be in \[0.0, 1.0\), got 1.0"):
        SSRConfig(subspace_energy=1.0)
    with pytest.raises(ValueError, match=r"`subspace_energy=0.8` projects the drift from the anchors, so it needs "
                                         r"protection=\"anchor\", got protection='update'"):
        SSRConfig(subspace_energy=0.8, protection="update")
    with pytest.raises(ValueError, match=r"`subspace_unused_outputs=True` widens input-subspace protection, which is "
                                         r"off here \(subspace_energy=0.0, protection='anchor', consolidation=10\)"):
        SSRConfig(subspace_unused_outputs=True, subspace_energy=0.0)
    with pytest.raises(ValueError, match=r"off here \(subspace_energy=None, protection='update'"):
        SSRConfig(subspace_unused_outputs=True, protection="update")
    with pytest.raises(ValueError, match=r"`protect_every` must be >= 1, got 0"):
        SSRConfig(protect_every=0)
    with pytest.raises(ValueError, match=r"`overlap_power=2` measures a task's inputs against input-subspace "
                                         r"protection's bases, which is off here \(subspace_energy=0.0"):
        SSRConfig(overlap_power=2, subspace_energy=0.0)
    with pytest.raises(ValueError, match=r"`overlap_power` must be in \[0.0, inf\], got -1"):
        SSRConfig(overlap_power=-1)
    assert SSRConfig(overlap_power=0, protection="update").overlap_exponent == 0.0
    with pytest.raises(TypeError, match=r"`subspace_unused_outputs` must be a bool, got 'yes'"):
        SSRConfig(subspace_energy=0.5, subspace_unused_outputs="yes")


def test_layers_it_cannot_read_are_named_in_a_warning() -> None:
    net = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    with pytest.warns(UserWarning, match=r"subspace_energy: layers \['0'\] are neither Linear nor one-group Conv2d"):
        SSREngine(net, SSRConfig(subspace_energy=0.5))
