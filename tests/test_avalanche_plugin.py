"""SSRPlugin inside Avalanche's training templates (Naive, next to EWC and LwF)."""

from __future__ import annotations

import copy
import io
import os
import pickle
from typing import Any

import pytest
import torch
from conftest import FMNIST_DIR
from torch import nn
from torch.testing import assert_close

pytest.importorskip("avalanche")

from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics  # noqa: E402
from avalanche.logging import TextLogger  # noqa: E402
from avalanche.models import IncrementalClassifier, MultiHeadClassifier, MultiTaskModule  # noqa: E402
from avalanche.training import Naive  # noqa: E402
from avalanche.training.plugins import (  # noqa: E402
    EvaluationPlugin,
    EWCPlugin,
    LwFPlugin,
    MASPlugin,
    ReplayPlugin,
    SupervisedPlugin,
    SynapticIntelligencePlugin,
)

from lightning_ssr import SSRConfig  # noqa: E402
from lightning_ssr.avalanche import PartialBatchPlugin, SSRPlugin, fix_mas_zero_loss, fix_synaptic_intelligence  # noqa: E402
from lightning_ssr.data import ContinualBenchmark, make_benchmark  # noqa: E402

HIDDEN = 32


@pytest.fixture(scope="module")
def split_fmnist(tmp_path_factory: pytest.TempPathFactory) -> ContinualBenchmark:
    """Domain-incremental Split Fashion-MNIST, 200 train / 100 test images per experience
    (Split digits where Fashion-MNIST is not installed)."""
    if os.path.isdir(FMNIST_DIR):
        return make_benchmark("fmnist", "split", "domain", train_subset=200, test_subset=100,
                              data_dir=FMNIST_DIR, cache_dir=tmp_path_factory.mktemp("cache"))
    return make_benchmark("digits", "split", "domain", train_subset=200, test_subset=100)


class MLP(nn.Module):
    def __init__(self, n_in: int, head: nn.Module, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class MultiHeadMLP(MultiTaskModule):
    def __init__(self, n_in: int, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = MultiHeadClassifier(hidden)

    def forward(self, x: torch.Tensor, task_labels: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x), task_labels)


class LossProbe(SupervisedPlugin):
    """Records ``strategy.loss`` when ``before_backward`` reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[tuple[int, float]] = []

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        self.values.append((strategy.clock.train_exp_counter, float(strategy.loss.detach())))


def _mlp(bench: ContinualBenchmark) -> MLP:
    return MLP(bench.input_size, nn.Linear(HIDDEN, bench.n_classes))


def _strategy(model: nn.Module, plugins: list, *, epochs: int = 1, evaluator: Any = None) -> Naive:
    if evaluator is None:
        evaluator = EvaluationPlugin(loggers=[TextLogger(io.StringIO())])
    return Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                 criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=epochs,
                 eval_mb_size=128, plugins=plugins, evaluator=evaluator)


def _hooked(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


# ---------------------------------------------------------------------------------- runs


def test_runs_consolidates_once_per_experience_and_leaves_no_hooks(split_fmnist: ContinualBenchmark) -> None:
    model = _mlp(split_fmnist)
    ssr = SSRPlugin()
    consolidations: list[int] = []
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                                 forgetting_metrics(experience=True, stream=True),
                                 loggers=[TextLogger(io.StringIO())])
    strategy = _strategy(model, [ssr], epochs=2, evaluator=evaluator)  # hooks re-attached per epoch
    for t, exp in enumerate(split_fmnist.train_stream):
        strategy.train(exp)
        consolidations.append(ssr.engine.tasks)
        if t == 0:
            for name, st in ssr.engine.layers.items():
                assert float(st.importance.sum()) > 0, f"layer {name} has no importance after task 0"
        assert _hooked(model) == [], "hooks must not outlive a training epoch"
    assert consolidations == [1, 2, 3, 4, 5]
    assert ssr.engine.partial.scaled == 10  # 200 images at 32 a minibatch end each epoch on 8: 2 epochs, 5 experiences
    assert list(ssr.engine.layers) == ["body.1", "body.3"]  # the head is left out
    diag = ssr.last_diagnostics
    assert sorted(diag) == ["body.1", "body.3"]
    assert sorted(diag["body.1"]) == ["activity", "deviation", "factor_max", "factor_mean", "factor_min"]
    assert float(diag["body.1"]["activity"]) > 0
    results = strategy.eval(split_fmnist.test_stream)
    accuracy = results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    assert 0.0 <= accuracy <= 1.0 and "StreamForgetting/eval_phase/test_stream" in results
    states = [*ssr.engine.layers.values(), *ssr.engine.outputs.values()]  # hidden neurons and output units
    anchored = sum(p.numel() * 4 for _, p in ssr.engine.named_parameters_gated())  # the default anchoring's copy
    subspace = ssr.engine.subspace.nbytes()  # input-subspace protection (on by default): bases and unit masks
    assert subspace > 0
    assert ssr.extra_state_bytes() == sum(t.numel() * 4 for st in states for t in st.tensors().values()) + anchored + subspace


def test_partial_batch_plugin_gives_any_strategy_the_steps_ssr_takes(split_fmnist: ContinualBenchmark) -> None:
    torch.manual_seed(0)
    init = _mlp(split_fmnist)
    # SSR with every other part off changes weights only through its partial-batch scaling
    ssr_only_partial = SSRPlugin(consolidation=0.0, scaling_rate=0.0, recycle_below=0.0)
    partial = PartialBatchPlugin()
    weights = {}
    for name, plugins in (("naive", []), ("plugin", [partial]), ("ssr", [ssr_only_partial])):
        model = copy.deepcopy(init)
        strategy = _strategy(model, plugins)
        torch.manual_seed(1)  # the same mini-batch order in every run
        for exp in split_fmnist.train_stream[:2]:
            strategy.train(exp)
        weights[name] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(weights["plugin"], weights["ssr"]):
        assert_close(a, b, rtol=0, atol=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(weights["plugin"], weights["naive"]))
    assert partial.partial.scaled == 2 and partial.partial.full == 0  # 200 images at 32: one step on 8 an experience
    assert partial.state_dict() == {"full": 0, "samples": 0, "scaled": 2}
    with pytest.raises(ValueError, match="must not hold PartialBatchPlugin beside an SSRPlugin"):
        _strategy(_mlp(split_fmnist), [PartialBatchPlugin(), SSRPlugin()]).train(split_fmnist.train_stream[0])


def test_protected_neurons_change_less_than_without_the_plugin(split_fmnist: ContinualBenchmark) -> None:
    torch.manual_seed(0)
    init = _mlp(split_fmnist)
    runs: dict[str, list[torch.Tensor]] = {}
    # recycling would renew weights; the last minibatch of 8 would be scaled from the first experience on
    ssr = SSRPlugin(consolidation=10.0, protection="update", recycle_below=0.0, scale_partial_batches=False)
    for name, plugins in (("naive", []), ("ssr", [ssr])):
        model = copy.deepcopy(init)
        strategy = _strategy(model, plugins)
        torch.manual_seed(1)  # the same mini-batch order in both runs
        snapshots = []
        for exp in split_fmnist.train_stream[:2]:
            strategy.train(exp)
            snapshots.append(model.body[1].weight.detach().clone())
        runs[name] = snapshots
    # the first experience is unprotected: SSR must not have changed anything yet
    torch.testing.assert_close(runs["ssr"][0], runs["naive"][0])
    importance = ssr.engine.layers["body.1"].importance
    assert ssr.engine.tasks == 2
    # importance after task 0 only: take the neurons SSR protected during task 1
    protected = importance.argsort(descending=True)[: HIDDEN // 4]
    change = {k: (v[1] - v[0]).norm(dim=1)[protected].mean() for k, v in runs.items()}
    assert change["ssr"] < 0.5 * change["naive"], change


def test_subspace_protection_runs_inside_a_strategy_and_holds_old_inputs(split_fmnist: ContinualBenchmark) -> None:
    torch.manual_seed(0)
    model = _mlp(split_fmnist)
    ssr = SSRPlugin(subspace_energy=0.6)
    strategy = _strategy(model, [ssr])
    strategy.train(split_fmnist.train_stream[0])
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    bases = ssr.engine.subspace.bases
    name = next(n for n, st in ssr.engine.layers.items() if st.module is first)
    assert bases[name].shape[1] > 0  # the first experience's inputs, read on the sensed steps
    w_old = first.weight.detach().clone()
    strategy.train(split_fmnist.train_stream[1])
    drift = (first.weight.detach() - w_old) @ bases[name].to(w_old.dtype)
    assert float(drift.abs().max()) < 1e-4  # no drift along the old inputs' directions
    assert float((first.weight.detach() - w_old).abs().max()) > 1e-3  # while the layer learned the second task
    assert ssr.extra_state_bytes() > sum(b.numel() * 4 for b in bases.values())  # the bases are counted


@pytest.mark.parametrize("energy", [None, 0.6])
def test_subspace_protection_is_off_beside_replay_unless_asked_for(split_fmnist: ContinualBenchmark,
                                                                   energy: float | None,
                                                                   recwarn: pytest.WarningsRecorder) -> None:
    ssr = SSRPlugin(subspace_energy=energy, recycle_below=0.0)
    strategy = _strategy(_mlp(split_fmnist), [ReplayPlugin(mem_size=20), ssr])
    strategy.train(split_fmnist.train_stream[0])
    ours = [str(w.message) for w in recwarn if "beside a ReplayPlugin" in str(w.message)]
    assert ssr.config.subspace_energy == energy  # the plugin's own settings stay as given
    if energy is None:  # the default resolves to off beside replay
        assert not ssr.engine.subspace.enabled and ssr.engine.subspace.bases == {} and ours == []
    else:  # asked for by name: it runs, with a warning that says what it cost beside replay
        assert ssr.engine.subspace.enabled and len(ssr.engine.subspace.bases) > 0
        assert len(ours) == 1 and "`subspace_energy=0.6`" in ours[0] and "Leave `subspace_energy=None`" in ours[0]
    asked = SSRPlugin(subspace_unused_outputs=True, recycle_below=0.0)  # asked for through its other field
    with pytest.warns(UserWarning, match=r"input-subspace protection asked for \(`subspace_energy=None`, "
                                         r"`subspace_unused_outputs=True`\)"):
        _strategy(_mlp(split_fmnist), [ReplayPlugin(mem_size=20), asked]).train(split_fmnist.train_stream[0])
    assert asked.engine.subspace.enabled
    standalone = SSRPlugin()
    _strategy(_mlp(split_fmnist), [standalone]).train(split_fmnist.train_stream[0])
    assert standalone.engine.subspace.enabled  # without replay the default is on


def test_anchor_lr_reads_the_strategys_optimizer(split_fmnist: ContinualBenchmark) -> None:
    """Under Adam 1e-3, ``anchor_rate=0.5, anchor_lr=0.01`` pulls as a fixed ``anchor_rate=0.05`` (the pull
    alone: the input-subspace projection, which shrinks alike, is off)."""
    torch.manual_seed(0)
    init = _mlp(split_fmnist)
    nets = []
    for ssr in (SSRPlugin(anchor_rate=0.5, anchor_lr=0.01, subspace_energy=0.0),
                SSRPlugin(anchor_rate=0.05, subspace_energy=0.0)):
        model = copy.deepcopy(init)
        strategy = _strategy(model, [ssr])
        torch.manual_seed(1)  # the same mini-batch order in both runs
        for exp in split_fmnist.train_stream[:2]:
            strategy.train(exp)
        nets.append(model)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_penalty_mode_adds_a_positive_term_after_the_first_experience(split_fmnist: ContinualBenchmark) -> None:
    before, after = LossProbe(), LossProbe()
    ssr = SSRPlugin(protection="penalty", consolidation=5.0)
    strategy = _strategy(_mlp(split_fmnist), [before, ssr, after])
    for exp in split_fmnist.train_stream[:3]:
        strategy.train(exp)
    diffs: dict[int, list[float]] = {}
    for (exp_id, lo), (_, hi) in zip(before.values, after.values):
        diffs.setdefault(exp_id, []).append(hi - lo)
    assert all(d == 0.0 for d in diffs[0])
    assert all(d > 0.0 for e in (1, 2) for d in diffs[e]), diffs
    assert ssr.last_penalty is not None and float(ssr.last_penalty) == pytest.approx(diffs[2][-1], rel=1e-5)


def test_update_mode_adds_nothing_to_the_loss(split_fmnist: ContinualBenchmark) -> None:
    before, after = LossProbe(), LossProbe()
    strategy = _strategy(_mlp(split_fmnist), [before, SSRPlugin(protection="update"), after])
    for exp in split_fmnist.train_stream[:2]:
        strategy.train(exp)
    assert before.values == after.values


def test_next_to_ewc_and_lwf(split_fmnist: ContinualBenchmark) -> None:
    ssr, ewc, lwf = SSRPlugin(consolidation=2.0), EWCPlugin(ewc_lambda=100.0), LwFPlugin()
    model = _mlp(split_fmnist)
    strategy = _strategy(model, [ewc, lwf, ssr])
    for exp in split_fmnist.train_stream[:3]:
        strategy.train(exp)
    assert ssr.engine.tasks == 3 and sorted(ewc.importances) == [0, 1, 2]
    # LwF's copy of the model is taken after the epoch: it carries none of SSR's hooks
    assert _hooked(lwf.lwf.prev_model) == [] and _hooked(model) == []
    pickle.dumps(model)  # nothing unpicklable left on the model


@pytest.mark.parametrize("recycle_below, warns", [(0.1, True), (0.0, False)])
def test_recycling_beside_replay_is_warned_about_once(split_fmnist: ContinualBenchmark, recycle_below: float,
                                                      warns: bool, recwarn: pytest.WarningsRecorder) -> None:
    ssr = SSRPlugin(recycle_below=recycle_below)
    strategy = _strategy(_mlp(split_fmnist), [ReplayPlugin(mem_size=20), ssr])
    for exp in split_fmnist.train_stream[:2]:
        strategy.train(exp)
    ours = [str(w.message) for w in recwarn if "beside a ReplayPlugin" in str(w.message)]
    assert ssr.engine.tasks == 2
    assert len(ours) == (1 if warns else 0), ours  # once, when the engine is built
    if warns:
        assert "`recycle_below=0.1`" in ours[0] and "Pass `recycle_below=0`" in ours[0]


def test_growing_heads_are_handled() -> None:
    bench = make_benchmark("digits", "split", "class", n_tasks=5, train_subset=40, test_subset=20)
    model = MLP(bench.input_size, IncrementalClassifier(HIDDEN, initial_out_features=2))
    ssr = SSRPlugin()
    strategy = _strategy(model, [ssr])
    strategy.train(bench.train_stream)  # the whole stream in one call
    assert model.head.classifier.out_features == 10 and ssr.engine.tasks == 5
    assert list(ssr.engine.layers) == ["body.1", "body.3"]

    task = make_benchmark("digits", "split", "task", n_tasks=5, train_subset=40, test_subset=20)
    multi = MultiHeadMLP(task.input_size)
    ssr = SSRPlugin(protection="penalty")
    strategy = _strategy(multi, [ssr])
    for exp in task.train_stream:
        strategy.train(exp)
    assert len(multi.head.classifiers) == 5 and ssr.engine.tasks == 5
    assert list(ssr.engine.layers) == ["body.1", "body.3"]
    strategy.eval(task.test_stream)


def test_synaptic_intelligence_fix_gives_it_importance() -> None:
    fix_synaptic_intelligence()
    assert fix_synaptic_intelligence() is False  # idempotent
    bench = make_benchmark("digits", "split", "domain", n_tasks=2, train_subset=64, test_subset=16)
    si = SynapticIntelligencePlugin(si_lambda=1.0)
    strategy = _strategy(_mlp(bench), [si, SSRPlugin()])
    for exp in bench.train_stream:
        strategy.train(exp)
    importance = torch.cat([p.data for p in si.ewc_data[1].values()])
    assert bool((importance != 0).any()), "SI measured no importance: its weight snapshots alias the model"


class _ShiftAndRecord(SupervisedPlugin):
    """Moves every weight by 0.1 before the second experience (so MAS's penalty is not zero) and
    records, at each ``before_backward``, the strategy's loss beside MAS's penalty computed by hand."""

    def __init__(self, mas: MASPlugin) -> None:
        super().__init__()
        self.mas = mas
        self.values: list[tuple[int, float, float]] = []

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if strategy.clock.train_exp_counter == 1:
            with torch.no_grad():
                for p in strategy.model.parameters():
                    p.add_(0.1)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        exp = strategy.clock.train_exp_counter
        penalty = 0.0
        if exp:
            penalty = sum(float((self.mas.importance[n].data * (p - self.mas.params[n].data).pow(2)).sum())
                          for n, p in strategy.model.named_parameters())
        self.values.append((exp, float(strategy.loss.detach()), penalty))


def test_mas_fix_trains_through_a_loss_of_exactly_zero() -> None:
    fix_mas_zero_loss()
    assert fix_mas_zero_loss() is False  # idempotent
    bench = make_benchmark("digits", "split", "domain", n_tasks=2, train_subset=64, test_subset=16)
    model = nn.Sequential(nn.Flatten(), nn.Linear(bench.input_size, 16), nn.ReLU(), nn.Linear(16, bench.n_classes))
    mas = MASPlugin(lambda_reg=1.0, alpha=0.5)
    probe = _ShiftAndRecord(mas)

    def certain(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # a loss that underflowed: exactly 0.0
        return torch.relu(nn.functional.cross_entropy(out, y) - 100.0)

    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=certain,
                     train_mb_size=32, train_epochs=1, plugins=[mas, probe],
                     evaluator=EvaluationPlugin(loggers=[TextLogger(io.StringIO())]))
    for exp in bench.train_stream:  # without the fix: ValueError("Loss is not available") in the second
        strategy.train(exp)
    second = [(loss, penalty) for exp, loss, penalty in probe.values if exp == 1]
    assert len(second) == 2 and all(loss == 0.0 for exp, loss, _ in probe.values if exp == 0)
    for loss, penalty in second:  # the penalty was added, and nothing else
        assert penalty > 0.0 and loss == pytest.approx(penalty, rel=1e-5)


# --------------------------------------------------------------------------------- state


def test_state_dict_round_trip(split_fmnist: ContinualBenchmark) -> None:
    model = _mlp(split_fmnist)
    ssr = SSRPlugin(consolidation=3.0)
    strategy = _strategy(model, [ssr])
    for exp in split_fmnist.train_stream[:2]:
        strategy.train(exp)
    buffer = io.BytesIO()
    torch.save(ssr.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    assert state["config"]["consolidation"] == 3.0

    resumed = SSRPlugin(consolidation=3.0)
    resumed.load_state_dict(state)  # before the engine exists: applied when it is built
    assert resumed.engine is None and resumed.state_dict()["engine"]["tasks"] == 2
    strategy2 = _strategy(model, [resumed])
    strategy2.train(split_fmnist.train_stream[2])
    assert resumed.engine.tasks == 3
    saved = state["engine"]["layers"]["body.1"]["importance"]
    assert torch.all(resumed.engine.layers["body.1"].importance >= saved)

    again = SSRPlugin(consolidation=3.0)
    _strategy(model, [again]).train(split_fmnist.train_stream[0])
    again.load_state_dict(ssr.state_dict())  # into a built engine
    for name, st in ssr.engine.layers.items():
        for key, value in st.tensors().items():
            torch.testing.assert_close(again.engine.layers[name].tensors()[key], value, equal_nan=True)
    assert again.engine.tasks == ssr.engine.tasks == 2


def test_load_state_dict_rejects_foreign_state() -> None:
    with pytest.raises(TypeError, match=r"`state` must be a mapping returned by SSRPlugin.state_dict\(\)"):
        SSRPlugin().load_state_dict({"step": 3})
    with pytest.raises(ValueError, match="SSRPlugin state version 7 is not supported"):
        SSRPlugin().load_state_dict({"version": 7, "config": {}, "engine": None})


# ------------------------------------------------------------------------- construction


def test_config_and_keyword_overrides() -> None:
    base = SSRConfig(consolidation=4.0)
    plugin = SSRPlugin(base, protection="penalty")
    assert plugin.config.consolidation == 4.0 and plugin.config.protection == "penalty"
    assert base.protection == "anchor"  # the given config is not modified
    assert plugin.extra_state_bytes() == 0 and "not built" in repr(plugin)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rate": 0.1}, TypeError, r"Unexpected keyword arguments: \['rate'\]"),
        ({"consolidation": -1.0}, ValueError, r"`consolidation` must be in"),
        ({"config": {"tau": 3}}, TypeError, r"`config` must be an SSRConfig or None, got dict"),
        ({"layer_types": [nn.ReLU, "Linear"]}, TypeError, r"`layer_types` must be a non-empty sequence"),
        ({"include": 3}, TypeError, r"`include` must be an fnmatch pattern \(str\) or a sequence of them or None, got 3"),
        ({"exclude": [3]}, TypeError, r"`exclude` must be an fnmatch pattern \(str\) or a sequence of them, got \[3\]"),
        ({"track_output": 1}, TypeError, r"`track_output` must be a bool, got 1"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        SSRPlugin(**kwargs)


def test_layer_selection_errors_surface_when_the_model_is_seen() -> None:
    bench = make_benchmark("digits", "split", "domain", n_tasks=2, train_subset=32, test_subset=16)
    strategy = _strategy(_mlp(bench), [SSRPlugin(include=["encoder.*"])])
    with pytest.raises(ValueError, match=r"`include` pattern 'encoder.\*' matches no layer"):
        strategy.train(bench.train_stream[0])


def test_swapped_model_or_replaced_layer_is_refused() -> None:
    bench = make_benchmark("digits", "split", "domain", n_tasks=2, train_subset=32, test_subset=16)
    ssr = SSRPlugin()
    model = _mlp(bench)
    strategy = _strategy(model, [ssr])
    strategy.train(bench.train_stream[0])
    model.body[3] = nn.Linear(HIDDEN, HIDDEN)
    with pytest.raises(ValueError, match=r"SSR tracks layer 'body.3' \(32 neurons\), but the model no longer holds it"):
        strategy.train(bench.train_stream[1])
    strategy.model = _mlp(bench)
    with pytest.raises(ValueError, match="SSRPlugin was built on another model"):
        strategy.train(bench.train_stream[1])
