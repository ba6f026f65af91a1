"""Seeds: one independent stream per (seed, purpose, experience), in both runners of the benchmark."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_ssr.bench.methods import METHODS
from lightning_ssr.bench.runner import RunSettings, run_method
from lightning_ssr.continual import ClassifierModule, fit_stream, stream_seed
from lightning_ssr.data import make_benchmark
from conftest import tiny_mlp

SETTINGS = RunSettings(hidden=16, lr=1e-2, epochs=2, batch_size=16, eval_batch_size=64)


def test_stream_seeds_are_distinct_across_seed_purpose_and_experience() -> None:
    seeds = {stream_seed(s, p, i) for s in range(4) for p in ("model", "train", "data", "eval") for i in range(6)}
    assert len(seeds) == 4 * 4 * 6
    assert stream_seed(2, "data", 3) == stream_seed(2, "data", 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"seed": -1, "purpose": "data"}, r"`seed` must be an int >= 0, got -1"),
     ({"seed": 0, "purpose": "heads"}, r"`purpose` must be one of \['model', 'train', 'data', 'eval'\], got 'heads'"),
     ({"seed": 0, "purpose": "data", "experience": 1.0}, r"`experience` must be an int >= 0, got 1.0")],
)
def test_stream_seed_names_a_bad_argument(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        stream_seed(**kwargs)


class _FirstBatches(pl.Callback):
    def __init__(self) -> None:
        self.orders: list[list[int]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.orders.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.orders[-1] += batch[0][:, 0].long().tolist()


def _orders(seed: int) -> list[list[int]]:
    """The training order of two identical experiences under ``seed``."""
    x = torch.arange(64, dtype=torch.float32).unsqueeze(1).repeat(1, 8)
    y = torch.arange(64) % 3
    ds = TensorDataset(x, y)
    spy = _FirstBatches()
    fit_stream(ClassifierModule(tiny_mlp()), ([ds, ds], [ds, ds]), callbacks=[spy], batch_size=8, seed=seed,
               trainer_kwargs={"accelerator": "cpu"})
    return spy.orders


def test_no_experience_of_one_seed_replays_another_seeds_experience() -> None:
    """Until now seed s, experience i was seeded like seed s+1, experience i-1: the same order."""
    seed0, seed1 = _orders(0), _orders(1)
    assert seed0 == _orders(0)  # a seed repeats exactly
    assert seed0[1] != seed1[0]  # fails with `seed + experience` seeding
    assert seed0[0] != seed0[1] and seed0[0] != seed1[0]


def _tiny(scenario: str):
    return make_benchmark("digits", "split", scenario, train_subset=120, test_subset=60)


@pytest.mark.parametrize("name", ["naive", "naive-lightning"])
def test_each_runner_repeats_a_seed_exactly_and_differs_across_seeds(name: str) -> None:
    bench = _tiny("domain")
    a, b, c = (run_method(METHODS[name], {}, bench, SETTINGS, seed) for seed in (0, 0, 1))
    assert a.accuracy == b.accuracy
    assert a.accuracy != c.accuracy


def test_both_runners_start_from_the_same_network_and_grow_the_same_heads(monkeypatch) -> None:
    """Where the runners should agree: the initial weights and each new head's initial weights."""
    from avalanche.training.plugins import SupervisedPlugin

    heads: dict[str, list[torch.Tensor]] = {"avalanche": [], "lightning": []}

    def snapshot(model: torch.nn.Module, runner: str) -> None:
        heads[runner].append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))

    class _Spy(SupervisedPlugin):
        def before_training_epoch(self, strategy, *args, **kwargs) -> None:
            if strategy.clock.train_exp_epochs == 0:
                snapshot(strategy.model, "avalanche")

    class _LightningSpy(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            snapshot(pl_module, "lightning")

    import lightning_ssr.bench.runner as runner

    bench = _tiny("task")
    monkeypatch.setattr(runner, "_plugin", lambda method, hp: [_Spy()])
    runner.run_avalanche(METHODS["naive"], {}, bench, SETTINGS, seed=3)
    fit = runner.fit_stream
    monkeypatch.setattr(runner, "fit_stream",
                        lambda *args, callbacks=(), **kw: fit(*args, callbacks=[*callbacks, _LightningSpy()], **kw))
    runner.run_lightning(METHODS["naive-lightning"], {}, bench, SETTINGS, seed=3)
    assert len(heads["avalanche"]) == len(heads["lightning"]) == bench.n_tasks
    # the shared network is trained differently (shuffling differs); the heads grown since the last
    # snapshot (Avalanche grows them while evaluating the test stream) start from the same weights
    assert torch.equal(heads["avalanche"][0], heads["lightning"][0])
    grown = 0
    for i in range(1, bench.n_tasks):
        av, li = heads["avalanche"][i], heads["lightning"][i]
        assert av.shape == li.shape
        new = av.numel() - heads["avalanche"][i - 1].numel()
        if new:
            grown += 1
            assert torch.equal(av[-new:], li[-new:]), f"heads grown before experience {i}"
            assert not torch.equal(av[:-new], li[:-new])
    assert grown
