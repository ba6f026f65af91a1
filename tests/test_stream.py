"""Tests of lightning_ssr.continual.runner: fit_stream on Split digits in the three scenarios,
one logger run with increasing steps, DDP counts, and argument errors.

Resume and the optimizer state carried across experiences are tested in
``test_stream_checkpointing.py``, which shares this file's models and benchmarks."""

from __future__ import annotations

import csv
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import TensorDataset

from lightning_ssr.continual import ClassifierModule, StreamResult, StreamRunner, fit_stream

pytest.importorskip("avalanche")
from avalanche.models import MultiHeadClassifier, MultiTaskModule  # noqa: E402

from lightning_ssr.data import make_benchmark  # noqa: E402

CPU = {"accelerator": "cpu", "devices": 1}


class MultiHeadMLP(MultiTaskModule):
    """An MLP body with Avalanche's multi-head classifier: a head per task label, grown on demand."""

    def __init__(self, n_in: int = 64, hidden: int = 32, n_out: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU())
        self.classifier = MultiHeadClassifier(hidden, n_out)

    def forward(self, x: torch.Tensor, task_labels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x), task_labels)


class FixedHeadsMLP(nn.Module):
    """A plain module with one output block per task, chosen by the task label: ``model(x, t)``."""

    def __init__(self, n_in: int = 64, hidden: int = 32, n_out: int = 2, n_tasks: int = 5) -> None:
        super().__init__()
        self.n_out, self.n_tasks = n_out, n_tasks
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU())
        self.heads = nn.Linear(hidden, n_out * n_tasks)

    def forward(self, x: torch.Tensor, task_labels: torch.Tensor) -> torch.Tensor:
        out = self.heads(self.body(x)).view(x.shape[0], self.n_tasks, self.n_out)
        return out[torch.arange(x.shape[0]), task_labels]


def _model(bench) -> nn.Module:
    if bench.multi_head:
        return MultiHeadMLP(bench.input_size, 32, bench.n_classes)
    return nn.Sequential(nn.Flatten(), nn.Linear(bench.input_size, 32), nn.ReLU(), nn.Linear(32, bench.n_classes))


@pytest.fixture(scope="module")
def benches() -> dict:
    return {
        s: make_benchmark("digits", "split", s, train_subset=100, test_subset=40) for s in ("task", "domain", "class")
    }


class TaskLabelSpy(Callback):
    """Records the task labels of every training batch."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.update(batch[2].tolist())


# -------------------------------------------------------------------------------- scenarios
@pytest.mark.parametrize("scenario", ["task", "domain", "class"])
def test_split_digits_all_scenarios(benches, scenario: str) -> None:
    bench = benches[scenario]
    model = _model(bench)
    spy = TaskLabelSpy()
    # class-incremental: Adam's moments carried from old classes slow the new ones down in this tiny budget
    optimizer_state = "reset" if scenario == "class" else "carry"
    result = fit_stream(ClassifierModule(model, lr=3e-3), bench, callbacks=[spy], epochs=5, batch_size=20,
                        optimizer_state=optimizer_state, trainer_kwargs=CPU)
    assert isinstance(result, StreamResult) and result.completed == result.n_experiences == 5
    assert result.matrix.shape == (5, 5)
    assert result.total == [[len(e.dataset) for e in bench.test_stream]] * 5
    assert ((result.matrix >= 0) & (result.matrix <= 1)).all()
    diagonal = result.matrix.diagonal()
    assert float(diagonal.mean()) > (0.6 if scenario == "class" else 0.8)  # each experience is learned
    assert len(result.train_time_s) == len(result.eval_time_s) == 5 and result.wall_time_s > 0
    assert result.config["benchmark"]["scenario"] == scenario and result.method == "TaskLabelSpy"
    if scenario == "task":
        assert spy.seen == {0, 1, 2, 3, 4}  # task labels reach the model ...
        assert sorted(model.classifier.classifiers) == ["0", "1", "2", "3", "4"]  # ... which grew a head per task
        assert result.average_forgetting < 0.2  # heads protect old tasks
    else:
        assert spy.seen == {0}


def test_plain_dataset_pair_and_two_element_batches() -> None:
    """A (train, test) pair of plain datasets of (x, y) works with a plain model."""
    gen = torch.Generator().manual_seed(0)
    data = [
        TensorDataset(torch.randn(24, 5, generator=gen), torch.randint(0, 3, (24,), generator=gen)) for _ in range(2)
    ]
    result = fit_stream(ClassifierModule(nn.Linear(5, 3)), (data, data), batch_size=8, trainer_kwargs=CPU)
    assert result.total == [[24, 24], [24, 24]] and result.method == "naive"


def test_with_synaptic_scaling_callback(benches) -> None:
    """The SSR callback rides along: its state carries from experience to experience."""
    ssr_mod = pytest.importorskip("lightning_ssr.callback")
    bench = benches["domain"]
    cb = ssr_mod.SynapticScaling()
    result = fit_stream(ClassifierModule(_model(bench), lr=1e-2), bench, callbacks=[cb], epochs=1, batch_size=20,
                        trainer_kwargs=CPU)
    assert result.completed == 5 and result.method == "SynapticScaling"
    assert result.extra_state_bytes > 0 and "SynapticScaling" in result.method_config
    engine = cb.engine
    assert engine is not None and any(float(s.importance.sum()) > 0 for s in engine.layers.values())


# ---------------------------------------------------------------------------------- logging
def test_one_logger_run_with_increasing_steps(benches, tmp_path) -> None:
    bench = benches["domain"]
    logger = CSVLogger(tmp_path, name="stream")
    result = fit_stream(ClassifierModule(_model(bench)), bench, logger=logger, epochs=2, batch_size=20,
                        trainer_kwargs={**CPU, "log_every_n_steps": 1})
    assert [p.name for p in (tmp_path / "stream").iterdir()] == ["version_0"]  # one run
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps)  # never go back
    loss_steps = [int(r["step"]) for r in rows if r["train_loss"]]
    per_exp = [len(range(0, len(e.dataset), 20)) * 2 for e in bench.train_stream]
    assert loss_steps == list(range(sum(per_exp)))  # every optimizer step, offset across experiences
    row_steps = [int(r["step"]) for r in rows if r["stream/average_accuracy"]]
    assert row_steps == [sum(per_exp[: i + 1]) for i in range(5)]
    last = [r for r in rows if r["stream/average_accuracy"]][-1]
    assert float(last["stream/average_accuracy"]) == pytest.approx(result.average_accuracy)
    assert float(last["stream/backward_transfer"]) == pytest.approx(result.backward_transfer)
    assert float(last["stream/plasticity"]) == pytest.approx(result.plasticity)
    assert [float(last[f"stream/acc_exp{j}"]) for j in range(5)] == pytest.approx(result.accuracy[-1])



# -------------------------------------------------------------------------------------- DDP
def _ddp_stream_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0",
                      WORLD_SIZE="2", RANK=str(rank))
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    train = [
        TensorDataset(torch.randn(40, 6, generator=gen), torch.randint(0, 3, (40,), generator=gen)) for _ in range(2)
    ]
    test = [TensorDataset(torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in (13, 8)]
    module = ClassifierModule(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)))
    runner = StreamRunner(module, (train, test), batch_size=8, eval_batch_size=4,
                          trainer_kwargs={"accelerator": "cpu", "devices": 2, "strategy": "ddp"})
    result = runner.run()
    result.config["world_size"] = runner.trainer.world_size
    result.to_json(f"{out}.{rank}.json")
    torch.save(module.state_dict(), f"{out}.{rank}.pt")


def test_ddp_counts_every_test_sample_once(tmp_path) -> None:
    """Two CPU processes (gloo): each evaluates a shard; both get the same, complete counts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "r")
    mp.start_processes(_ddp_stream_worker, args=(port, out), nprocs=2, join=True, start_method="fork")
    r0, r1 = (StreamResult.from_json(f"{out}.{r}.json") for r in range(2))
    assert r0.config["world_size"] == r1.config["world_size"] == 2
    assert r0.total == r1.total == [[13, 8], [13, 8]]  # no sample dropped or padded in
    assert r0.correct == r1.correct
    p0, p1 = (torch.load(f"{out}.{r}.pt") for r in range(2))
    for k in p0:
        torch.testing.assert_close(p0[k], p1[k])


# ----------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"epochs": 0}, ValueError, r"`epochs` must be >= 1, got 0"),
        ({"batch_size": "32"}, TypeError, r"`batch_size` must be an int, got '32' of type str"),
        ({"eval_batch_size": 0}, ValueError, r"`eval_batch_size` must be >= 1, got 0"),
        ({"num_workers": -1}, ValueError, r"`num_workers` must be >= 0, got -1"),
        ({"seed": 1.5}, TypeError, r"`seed` must be an int or None, got 1.5"),
        ({"trainer_kwargs": {"max_epochs": 3}}, ValueError,
         r"`trainer_kwargs` must not contain 'max_epochs' \(pass `epochs=` to the stream runner\), "
         r"got trainer_kwargs\['max_epochs'\]=3"),
        ({"trainer_kwargs": {"callbacks": []}}, ValueError, r"must not contain 'callbacks' \(pass `callbacks=`"),
        ({"trainer_kwargs": [1]}, TypeError, r"`trainer_kwargs` must be a mapping of Trainer arguments, got list"),
        ({"resume": True}, ValueError, r"`resume=True` needs `ckpt_dir`.* got ckpt_dir=None"),
        ({"callbacks": [object()]}, TypeError, r"`callbacks\[0\]` must be a lightning.pytorch Callback, got object"),
        ({"logger": "csv"}, TypeError,
         r"`logger` must be None, False, a lightning.pytorch Logger or a list of Loggers, got 'csv'"),
        ({"stop_after": 0}, ValueError, r"`stop_after` must be >= 1, got 0"),
        ({"optimizer_state": "keep"}, ValueError, r"`optimizer_state` must be one of \('carry', 'reset'\), got 'keep'"),
        ({"stop_after": 6}, ValueError, r"`stop_after` must be in \[1, 5\] \(the stream's experiences\), got 6"),
    ],
)
def test_argument_errors(benches, kwargs, error, match) -> None:
    bench = benches["domain"]
    with pytest.raises(error, match=match):
        fit_stream(ClassifierModule(_model(bench)), bench, **kwargs)


def test_module_and_benchmark_errors(benches) -> None:
    bench = benches["domain"]
    with pytest.raises(TypeError, match=r"`module` must be a lightning.pytorch.LightningModule .* got Linear"):
        fit_stream(nn.Linear(2, 2), bench)
    with pytest.raises(TypeError, match=r"`benchmark` must have `train_stream` and `test_stream` .* got int"):
        fit_stream(ClassifierModule(nn.Linear(2, 2)), 42)
    two = list(bench.train_stream)[:2]
    match = r"at least as many test experiences as training experiences .* got 5 train and 2 test"
    with pytest.raises(ValueError, match=match):
        StreamRunner(ClassifierModule(nn.Linear(2, 2)), (list(bench.train_stream), two))


def test_predict_step_must_return_logits(benches) -> None:
    class Bad(ClassifierModule):
        def predict_step(self, batch, batch_idx=0, dataloader_idx=0):
            return {"logits": super().predict_step(batch)}

    bench = benches["domain"]
    with pytest.raises(ValueError, match=r"Bad.predict_step must return logits \[N, C\] .* got dict"):
        fit_stream(Bad(_model(bench)), bench, batch_size=50, trainer_kwargs=CPU)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"optimizer": "rmsprop"}, ValueError, r"`optimizer` must be one of \('adam', 'adamw', 'sgd'\), got 'rmsprop'"),
        ({"lr": 0.0}, ValueError, r"`lr` must be > 0, got 0.0"),
        ({"momentum": 1.0}, ValueError, r"`momentum` must be in \[0.0, 1.0\), got 1.0"),
        ({"weight_decay": -1}, ValueError, r"`weight_decay` must be >= 0.0, got -1"),
        ({"lr": "fast"}, TypeError, r"`lr` must be a float, got 'fast'"),
        ({"task_labels": 1}, TypeError, r"`task_labels` must be True, False or None, got 1"),
        ({"fused": "yes"}, TypeError, r"`fused` must be True, False or None, got 'yes'"),
    ],
)
def test_classifier_module_errors(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        ClassifierModule(nn.Linear(2, 2), **kwargs)
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module, got str"):
        ClassifierModule("mlp")


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_classifier_module_optimizers_and_task_labels(optimizer: str) -> None:
    momentum = 0.5 if optimizer == "sgd" else 0.0
    module = ClassifierModule(MultiHeadMLP(4, 8, 2), optimizer=optimizer, lr=0.1, momentum=momentum)
    assert module.pass_task_labels
    opt = module.configure_optimizers()
    assert type(opt).__name__.lower() == optimizer.replace("adamw", "adamw")
    with pytest.raises(ValueError, match=r"MultiHeadMLP takes task labels, but the batch has none"):
        module.training_step((torch.randn(3, 4), torch.tensor([0, 1, 0])), 0)
    fused = ClassifierModule(MultiHeadMLP(4, 8, 2), optimizer=optimizer, fused=True).configure_optimizers()
    assert fused.defaults["fused"] is True and opt.defaults["fused"] is None


def test_fused_adam_trains_the_same_stream_as_the_default_one(benches) -> None:
    """The bench's fused Adam (one kernel for all parameters) is the same algorithm: the same
    accuracy matrix up to rounding, and CPU time is recorded beside wall time per experience."""
    bench = benches["domain"]
    runs = []
    for fused in (None, True):
        torch.manual_seed(0)
        module = ClassifierModule(_model(bench), fused=fused)
        runs.append(fit_stream(module, bench, epochs=3, batch_size=20, seed=0, trainer_kwargs=CPU))
    assert sum(runs[0].accuracy, []) == pytest.approx(sum(runs[1].accuracy, []), abs=0.03)
    assert runs[1].average_accuracy > 0.6  # it learned
    assert len(runs[1].train_cpu_s) == bench.n_tasks and all(t > 0 for t in runs[1].train_cpu_s)


def test_heads_in_one_linear_recycle_after_every_task_as_a_head_per_task(benches) -> None:
    """Task-incremental heads in one Linear (``FixedHeadsMLP``: the loss reaches only the task's own
    block) read as a new head per task through the callback: recycled after every task; a
    class-incremental head with classes still to come recycles after none."""
    from lightning_ssr import SynapticScaling

    def recycled_per_task(bench, model: nn.Module, task_labels: bool) -> list[int]:
        cb, counts = SynapticScaling(), []

        class Count(Callback):  # after SSR's own on_fit_end, which consolidates and recycles
            def on_fit_end(self, trainer, pl_module) -> None:
                counts.append(sum(st.recycled for st in cb.engine.layers.values()))

        fit_stream(ClassifierModule(model, lr=1e-2, task_labels=task_labels), bench, callbacks=[cb, Count()],
                   epochs=2, batch_size=20, trainer_kwargs=CPU)
        return counts

    torch.manual_seed(0)
    task = recycled_per_task(benches["task"], FixedHeadsMLP(), task_labels=True)
    assert len(task) == 5 and min(task) > 0
    torch.manual_seed(0)
    assert recycled_per_task(benches["class"], _model(benches["class"]), task_labels=False) == [0] * 5
