"""Published protocols: presets, iteration budgets, the joint upper bound, MNIST end to end."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
from conftest import needs_mnist

from lightning_ssr.bench import BenchOptions
from lightning_ssr.bench.methods import METHODS
from lightning_ssr.bench.presets import PRESETS
from lightning_ssr.bench.runner import RunSettings, run_method
from lightning_ssr.cli import main
from lightning_ssr.data import make_benchmark


def test_presets_carry_van_de_ven_and_tolias_numbers_and_options_override_them() -> None:
    split = BenchOptions.from_preset("vdv2019-split")
    assert (split.dataset, split.protocol, split.hidden_units, split.lr, split.batch_size, split.iterations,
            split.pad) == ("mnist", "split", 400, 1e-3, 128, 2000, 0)
    perm = BenchOptions.from_preset("vdv2019-permuted", n_tasks=20, iterations=100)
    assert (perm.protocol, perm.n_tasks, perm.hidden_units, perm.lr, perm.iterations, perm.pad) == (
        "permuted", 20, 1000, 1e-4, 100, 2)
    assert "joint" in perm.methods.split(",") and perm.preset == "vdv2019-permuted"
    assert all("GMvandeVen/continual-learning" in p.source for p in PRESETS.values())
    with pytest.raises(ValueError, match=r"`preset` must be one of \['vdv2019-split', 'vdv2019-permuted'\], got 'x'"):
        BenchOptions.from_preset("x")
    with pytest.raises(ValueError, match=r"`iterations` must be an int >= 1 or None"):
        BenchOptions(iterations=0)


def test_the_command_line_takes_a_preset_and_reports_a_bad_one(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--preset", "hsu2018"])
    assert "invalid choice: 'hsu2018'" in capsys.readouterr().err


class _CountSteps(pl.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.steps.append(0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps[-1] += 1


def test_an_iteration_budget_trains_exactly_that_many_batches_per_task_in_both_runners(monkeypatch) -> None:
    from avalanche.training.plugins import SupervisedPlugin

    import lightning_ssr.bench.runner as runner

    bench = make_benchmark("digits", "split", "domain", train_subset=50, test_subset=20)  # 4 batches an epoch
    settings = RunSettings(hidden=16, batch_size=16, epochs=1, iterations=9)
    counts: list[int] = []

    class _Count(SupervisedPlugin):
        def before_training_exp(self, strategy, *args, **kwargs) -> None:
            counts.append(0)

        def after_training_iteration(self, strategy, *args, **kwargs) -> None:
            counts[-1] += 1

    monkeypatch.setattr(runner, "_plugin", lambda method, hp: [_Count()])
    run_method(METHODS["naive"], {}, bench, settings, seed=0)
    assert counts == [9] * 5
    spy = _CountSteps()
    fit = runner.fit_stream
    monkeypatch.setattr(runner, "fit_stream", lambda *a, callbacks=(), **kw: fit(*a, callbacks=[*callbacks, spy], **kw))
    run_method(METHODS["naive-lightning"], {}, bench, settings, seed=0)
    assert spy.steps == [9] * 5


def test_joint_training_is_the_upper_bound_and_counts_the_data_it_keeps() -> None:
    bench = make_benchmark("digits", "split", "class", train_subset=60, test_subset=40)
    settings = RunSettings(hidden=32, lr=1e-2, batch_size=16, epochs=3)
    naive = run_method(METHODS["naive"], {}, bench, settings, seed=0)
    joint = run_method(METHODS["joint"], {}, bench, settings, seed=0)
    assert len(joint.accuracy) == bench.n_tasks  # a full matrix: plasticity and forgetting as for every method
    assert joint.average_accuracy > naive.average_accuracy + 0.3  # class-incremental: naive keeps ~1 task
    assert joint.average_forgetting < naive.average_forgetting
    assert joint.extra_state_bytes == 4 * 60 * (64 * 4 + 8)  # the first four tasks' samples


@needs_mnist
def test_a_preset_runs_on_genuine_mnist_end_to_end(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench"
    argv = ["bench", "--preset", "vdv2019-permuted", "--tasks", "3", "--iterations", "5", "--train-subset", "300",
            "--test-subset", "100", "--seeds", "1", "--scenario", "domain", "--methods", "naive,joint,ssr",
            "--no-progress", "--no-plots", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert ("mnist permuted (3 tasks), domain-incremental [preset vdv2019-permuted]: MLP 2x1000, Adam lr 0.0001, "
            "5 iterations/task, batch 128, padded by 2") in printed
    assert "hyperparameters (chosen)" in printed and "\njoint " in printed
    data = json.loads((out / "mnist-permuted3-domain" / "results.json").read_text())
    assert data["meta"]["options"]["preset"] == "vdv2019-permuted" and data["meta"]["options"]["n_tasks"] == 3
    assert data["meta"]["settings"]["iterations"] == 5
    assert {r["method"] for r in data["summary"]} == {"naive", "naive-lightning", "joint", "ssr"}
