"""Tests of lightning_ssr.continual.metrics: the accuracy matrix, its summaries, and agreement with Avalanche."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.testing import assert_close
from torchmetrics.classification import MulticlassAccuracy

from lightning_ssr.continual import (
    ExperienceAccuracy,
    StreamResult,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    forgetting,
)

R3 = [[0.8, 0.1, 0.0], [0.9, 0.9, 0.2], [0.5, 0.7, 0.8]]


# ------------------------------------------------------------------------- ExperienceAccuracy
@pytest.mark.parametrize("num_classes", [2, 7])
@pytest.mark.parametrize("per_sample", [False, True])
def test_experience_accuracy_matches_torchmetrics_micro(num_classes: int, per_sample: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    metric = ExperienceAccuracy(3)
    refs = [MulticlassAccuracy(num_classes=num_classes, average="micro") for _ in range(3)]
    for _ in range(5):
        logits = torch.randn(11, num_classes, generator=gen)
        target = torch.randint(0, num_classes, (11,), generator=gen)
        if per_sample:
            exp = torch.randint(0, 3, (11,), generator=gen)
            metric.update(logits, target, exp)
            for j in range(3):
                if (exp == j).any():
                    refs[j].update(logits[exp == j], target[exp == j])
        else:
            j = int(torch.randint(0, 3, (1,), generator=gen))
            metric.update(logits, target, j)
            refs[j].update(logits, target)
    expected = torch.stack([r.compute().double() if r.update_count else torch.tensor(math.nan, dtype=torch.float64)
                            for r in refs])
    assert_close(metric.compute(), expected, equal_nan=True)


def test_experience_accuracy_state_and_reset() -> None:
    metric = ExperienceAccuracy(2)
    assert set(metric._defaults) == {"correct", "total"}
    assert metric._reductions["correct"] is not None
    metric.update(torch.tensor([1, 0]), torch.tensor([1, 1]), 1)
    assert metric.correct.tolist() == [0, 1] and metric.total.tolist() == [0, 2]
    assert math.isnan(float(metric.compute()[0]))
    metric.reset()
    assert metric.total.tolist() == [0, 0]
    state = metric.state_dict()
    assert state == {} or set(state) <= {"correct", "total"}


@pytest.mark.parametrize(
    ("kwargs", "update", "error", "match"),
    [
        ({"num_experiences": 0}, None, ValueError, r"`num_experiences` must be >= 1, got 0"),
        ({"num_experiences": 2.0}, None, TypeError, r"`num_experiences` must be an int >= 1, got 2.0"),
        ({"num_experiences": 2, "foo": 1}, None, ValueError, r"Unexpected keyword arguments: `foo`"),
        ({"num_experiences": 2}, (torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), 2), ValueError,
         r"`experience` must be in \[0, 2\), got 2"),
        ({"num_experiences": 2}, (torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), torch.tensor([0, 5, 1])),
         ValueError, r"`experience` must be in \[0, 2\), got values in \[0, 5\]"),
        ({"num_experiences": 2}, (torch.zeros(3, 2, 2), torch.zeros(3, dtype=torch.long), 0), ValueError,
         r"`preds` must be scores \[N, C\] or labels \[N\], got shape \(3, 2, 2\)"),
        ({"num_experiences": 2}, (torch.zeros(3, 2), torch.zeros(4, dtype=torch.long), 0), ValueError,
         r"`target` must be labels \[N\] with N = 3"),
    ],
)
def test_experience_accuracy_errors(kwargs, update, error, match) -> None:
    with pytest.raises(error, match=match):
        metric = ExperienceAccuracy(**kwargs)
        metric.update(*update)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(0)
        logits, target = torch.randn(23, 4, generator=gen), torch.randint(0, 4, (23,), generator=gen)
        exp = torch.randint(0, 3, (23,), generator=gen)
        metric = ExperienceAccuracy(3)
        shard = slice(rank, None, world)  # uneven shards: 12 and 11 samples
        metric.update(logits[shard], target[shard], exp[shard])
        acc = metric.compute()
        torch.save({"acc": acc, "local_total": metric.total.clone()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_experience_accuracy_sums_counts_across_processes(tmp_path) -> None:
    """Under DDP every process gets the accuracy of the whole (sharded) test set."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children inherit the imported modules (spawn would re-import torch and lightning)
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path / "res")), nprocs=2, join=True, start_method="fork")
    gen = torch.Generator().manual_seed(0)
    logits, target = torch.randn(23, 4, generator=gen), torch.randint(0, 4, (23,), generator=gen)
    exp = torch.randint(0, 3, (23,), generator=gen)
    full = ExperienceAccuracy(3)
    full.update(logits, target, exp)
    results = [torch.load(tmp_path / f"res.{r}") for r in range(2)]
    for res in results:
        assert_close(res["acc"], full.compute())
    assert int(sum(r["local_total"].sum() for r in results)) == 23  # each sample counted once


# ------------------------------------------------------------------------------- functions
@pytest.mark.parametrize(
    ("matrix", "acc", "acc_seen", "fgt", "fgt_max", "bwt"),
    [
        ([[0.7, 0.2]], 0.45, 0.7, 0.0, 0.0, 0.0),
        (R3, (0.5 + 0.7 + 0.8) / 3, (0.5 + 0.7 + 0.8) / 3, (0.3 + 0.2) / 2, (0.4 + 0.2) / 2, -(0.3 + 0.2) / 2),
        ([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0]], 0.5, 0.75, 0.5, 0.5, -0.5),
        (torch.tensor([[0.2, 0.0], [0.6, 0.9]]), 0.75, 0.75, -0.4, -0.4, 0.4),
    ],
)
def test_summaries(matrix, acc, acc_seen, fgt, fgt_max, bwt) -> None:
    assert average_accuracy(matrix) == pytest.approx(acc)
    assert average_accuracy(matrix, seen_only=True) == pytest.approx(acc_seen)
    assert average_forgetting(matrix) == pytest.approx(fgt)
    assert average_forgetting(matrix, reference="max") == pytest.approx(fgt_max)
    assert backward_transfer(matrix) == pytest.approx(bwt)
    assert backward_transfer(matrix) == pytest.approx(-average_forgetting(matrix))


def test_forgetting_per_experience() -> None:
    assert_close(forgetting(R3), torch.tensor([0.3, 0.2], dtype=torch.float64))
    assert_close(forgetting(R3, reference="max"), torch.tensor([0.4, 0.2], dtype=torch.float64))
    assert forgetting([[0.5, 0.5]]).numel() == 0


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: forgetting(R3, reference="min"), ValueError,
         r"`reference` must be one of \('first', 'max'\), got 'min'"),
        (lambda: average_accuracy([0.5, 0.5]), ValueError, r"`matrix` must be 2-D .* got shape \(2,\)"),
        (lambda: average_accuracy([[0.5], [0.5]]), ValueError, r"no more rows .* got shape \(2, 1\)"),
        (lambda: average_forgetting([[math.nan, 0.5]]), ValueError, r"`matrix` must be finite"),
        (lambda: backward_transfer([[0.5, 0.5], [0.5]]), TypeError, r"`matrix` must be a 2-D tensor or a list"),
    ],
)
def test_function_errors(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------ StreamResult
def test_stream_result_json_round_trip(tmp_path) -> None:
    result = StreamResult(
        "naive", accuracy=[[1 / 3, 0.1], [0.2, 2 / 7]], n_experiences=2, correct=[[1, 1], [2, 2]],
        total=[[3, 10], [10, 7]], train_time_s=[0.1, 0.2], eval_time_s=[0.01, 0.02], wall_time_s=0.5,
        extra_state_bytes=12, config={"epochs": 1, "path": tmp_path, "shape": (1, 8, 8)}, method_config={"tau": 10.0},
    )
    path = tmp_path / "result.json"
    result.to_json(path)
    back = StreamResult.from_json(path)
    assert back.accuracy == result.accuracy  # floats survive exactly
    assert back.correct == result.correct and back.total == result.total
    assert back.config == {"epochs": 1, "path": str(tmp_path), "shape": [1, 8, 8]}
    assert back.summary() == result.summary()
    assert result.to_dict()["summary"]["average_accuracy"] == pytest.approx((0.2 + 2 / 7) / 2)
    assert result.stream_accuracy == pytest.approx(4 / 17)
    assert_close(result.matrix, torch.tensor(result.accuracy, dtype=torch.float64))
    assert "average accuracy 24.3" in result.format()


def test_stream_result_partial_and_errors() -> None:
    partial = StreamResult("x", accuracy=[[0.5, 0.1, 0.2]], n_experiences=3)
    assert partial.completed == 1 and math.isnan(partial.stream_accuracy)
    empty = StreamResult("x", accuracy=[], n_experiences=3)
    assert math.isnan(empty.average_accuracy)
    with pytest.raises(ValueError, match=r"`n_experiences` must be >= the number of rows of `accuracy` \(2\), got 1"):
        StreamResult("x", accuracy=[[0.5, 0.1], [0.5, 0.1]], n_experiences=1)
    with pytest.raises(ValueError, match=r"`correct` must have the shape of `accuracy`"):
        StreamResult("x", accuracy=[[0.5, 0.1]], n_experiences=2, correct=[[1]], total=[[2, 2]])
    with pytest.raises(ValueError, match=r"`data` has unknown StreamResult fields: \['bogus'\]"):
        StreamResult.from_dict({"method": "x", "accuracy": [], "n_experiences": 1, "bogus": 1})


# -------------------------------------------------------------------- agreement with Avalanche
@pytest.mark.filterwarnings("ignore:No loggers specified")
def test_agrees_with_avalanche_metrics() -> None:
    """Avalanche's Naive strategy, its own metrics, and ours on the same model and predictions.

    * our forgetting/BWT of the accuracy matrix Avalanche logged equal its Stream/Experience
      Forgetting and BWT;
    * our evaluation (the stream runner's loop and ExperienceAccuracy) of the model Avalanche
      trained equals Avalanche's Top1_Acc_Exp and Top1_Acc_Stream after every experience.
    """
    pytest.importorskip("avalanche")
    import lightning.pytorch as pl
    from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from lightning_ssr.continual import ClassifierModule, StreamRunner
    from lightning_ssr.data import make_benchmark

    bench = make_benchmark("digits", "split", "domain", train_subset=120, test_subset=45)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, bench.n_classes))
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True), forgetting_metrics(experience=True, stream=True),
        bwt_metrics(experience=True, stream=True), loggers=[],
    )
    strategy = Naive(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2), criterion=nn.CrossEntropyLoss(),
        train_mb_size=16, train_epochs=2, eval_mb_size=32, evaluator=evaluator, device="cpu",
    )
    runner = StreamRunner(ClassifierModule(model), bench, eval_batch_size=7)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    n = len(bench.test_stream)
    rows = []
    for i, exp in enumerate(bench.train_stream):
        strategy.train(exp)
        res = strategy.eval(bench.test_stream)
        aval_acc = [res[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"] for j in range(n)]
        rows.append(aval_acc)
        correct, total = runner.evaluate(trainer)
        assert total == [len(e.dataset) for e in bench.test_stream]
        assert_close([c / t for c, t in zip(correct, total)], aval_acc, rtol=0, atol=1e-12)
        ours = StreamResult("naive", accuracy=rows, n_experiences=n, correct=[correct] * (i + 1),
                            total=[total] * (i + 1))
        assert ours.stream_accuracy == pytest.approx(res["Top1_Acc_Stream/eval_phase/test_stream/Task000"], abs=1e-12)
        assert average_forgetting(rows) == pytest.approx(res["StreamForgetting/eval_phase/test_stream"], abs=1e-12)
        assert backward_transfer(rows) == pytest.approx(res["StreamBWT/eval_phase/test_stream"], abs=1e-12)
        per_exp = forgetting(rows)
        for j in range(i):
            assert float(per_exp[j]) == pytest.approx(
                res[f"ExperienceForgetting/eval_phase/test_stream/Task000/Exp{j:03d}"], abs=1e-12
            )
            assert -float(per_exp[j]) == pytest.approx(
                res[f"ExperienceBWT/eval_phase/test_stream/Task000/Exp{j:03d}"], abs=1e-12
            )
    assert abs(average_forgetting(rows)) > 1e-3  # the check was not trivially zero
