"""Updates driven from outside and across processes (lightning_ssr.norm.sync, reduce_statistics):
pooled updates, reduce_fn, overrides, the model-level homeostatic_step, and DDP."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

from lightning_ssr.norm import SSRNorm1d, SSRNorm2d, convert_batchnorm, homeostatic_step

STATE = ("running_mean", "running_var", "num_batches_tracked", "gain", "running_activity", "initialized")


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


# ------------------------------------------------------------ external driver, DDP maths


def test_auto_update_false_accumulates_and_homeostatic_step_pools_batches() -> None:
    a, b = torch.randn(8, 3, 4, 4) * 2 + 1, torch.randn(4, 3, 4, 4) - 1
    warm = torch.randn(8, 3, 4, 4)
    auto = SSRNorm2d(3)
    driven = SSRNorm2d(3, auto_update=False)
    auto(warm)
    driven(warm)
    assert int(driven.num_batches_tracked) == 0 and bool(driven.initialized)
    assert driven.homeostatic_step() and int(driven.num_batches_tracked) == 1
    before = _state(driven)
    driven(a)
    driven(b)
    for k, v in before.items():
        assert_close(driven.state_dict()[k], v)  # forwards only accumulate
    assert driven.homeostatic_step()
    auto(torch.cat([a, b]))
    for k in STATE:
        assert_close(driven.state_dict()[k], auto.state_dict()[k])
    assert not driven.homeostatic_step()  # nothing pending


def test_reduce_fn_makes_replicas_apply_the_pooled_update() -> None:
    """Two replicas that see different halves of a batch end in the state of one that saw it all."""
    x = torch.randn(16, 4) * 2 + 1
    whole = SSRNorm1d(4)
    whole(torch.randn(16, 4))
    replicas = [copy.deepcopy(whole), copy.deepcopy(whole)]
    for r in replicas:
        r.auto_update = False
    replicas[0](x[:8])
    replicas[1](x[8:])
    pending = [r._pending().clone() for r in replicas]
    total = pending[0] + pending[1]
    for r in replicas:
        r.reduce_fn = lambda t: total.clone()  # what an all_reduce(SUM) returns on every rank
        assert r.homeostatic_step()
    whole(x)
    for k in STATE:
        assert_close(replicas[0].state_dict()[k], whole.state_dict()[k])
        assert_close(replicas[1].state_dict()[k], whole.state_dict()[k])


def test_reduce_statistics_can_be_overridden() -> None:
    calls: list[int] = []

    class Averaged(SSRNorm1d):
        def reduce_statistics(self, statistics: torch.Tensor) -> torch.Tensor:
            calls.append(statistics.numel())
            return (statistics + statistics) / 2  # the average over 2 processes that saw the same

    m, plain = Averaged(3), SSRNorm1d(3)
    for _ in range(2):
        x = torch.randn(8, 3)
        m(x)
        plain(x)
    assert calls == [3 * 3 + 1] * 2  # one flat tensor per update: 3 statistics per channel and a count
    for k in STATE:
        assert_close(m.state_dict()[k], plain.state_dict()[k])


def test_model_level_homeostatic_step_reduces_once() -> None:
    net = nn.Sequential(nn.Linear(4, 6), SSRNorm1d(6, auto_update=False), nn.ReLU(),
                        nn.Linear(6, 5), SSRNorm1d(5, auto_update=False, track_running_stats=False))
    seen: list[int] = []

    def reduce(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.numel())
        return t

    net(torch.randn(8, 4))
    net(torch.randn(8, 4))
    assert homeostatic_step(net, reduce_fn=reduce) == 2
    assert seen == [(3 * 6 + 1) + (5 + 1)]
    assert int(net[1].num_batches_tracked) == 1 and int(net[4].num_batches_tracked) == 1
    assert homeostatic_step(net, reduce_fn=reduce) == 0  # nothing pending: no update, but still one collective
    assert homeostatic_step(nn.Linear(2, 2)) == 0


# --------------------------------------------------------------------------------- DDP


class _DDPModel(L.LightningModule):
    """A small CNN with BatchNorm, converted to SSRNorm; Lightning's sync_batchnorm must not touch it."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * 6 * 6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        self.net = convert_batchnorm(net)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def on_train_end(self) -> None:
        types = sorted({type(m).__name__ for m in self.modules()})
        state = {n: b.clone() for n, b in self.net.named_buffers()}
        torch.save({"types": types, "state": state}, Path(self.out_dir) / f"rank{self.global_rank}.pt")


def test_ddp_two_processes_keep_the_state_identical_and_sync_batchnorm_leaves_it(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 6, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    x[32:] = x[32:] * 3 + 2  # rank 1's shard (unshuffled) carries more: unsynchronized states would differ
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    trainer = L.Trainer(
        accelerator="cpu", strategy="ddp_spawn", devices=2, sync_batchnorm=True, max_steps=4,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(_DDPModel(str(tmp_path)), loader)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert "SyncBatchNorm" not in r0["types"] and {"SSRNorm1d", "SSRNorm2d"} <= set(r0["types"])
    assert int(r0["state"]["1.num_batches_tracked"]) == 4
    for k, v in r0["state"].items():
        assert_close(r1["state"][k], v, rtol=0, atol=0)
