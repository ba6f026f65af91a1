"""The SynapticScaling callback on real Lightning Trainers with tiny models."""

from __future__ import annotations

import copy
import csv
import os
import pickle
import subprocess
import sys
from typing import Any
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.data import extract_batch_size
from torch import nn
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

from conftest import FunctionalMLP, tiny_cnn, tiny_mlp
from lightning_ssr import PartialBatchScaling, SSRConfig, SynapticScaling
from lightning_ssr.core import NonFiniteActivityWarning
from lightning_ssr.core.partial import PartialBatches
from lightning_ssr.partial_batches import observe_batch

HERE = Path(__file__).parent


class Classifier(L.LightningModule):
    """A plain LightningModule, unaware of SSR."""

    def __init__(self, net: nn.Module, lr: float = 0.05, skip_every: int = 0) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.skip_every = skip_every

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        if self.skip_every and batch_idx % self.skip_every == 0:
            optimizer_closure()  # run forward/backward but do not step, as AMP does on inf gradients
            return
        optimizer.step(closure=optimizer_closure)


def _loader(n: int = 128, shape: tuple[int, ...] = (8,), batch_size: int = 16, seed: int = 0,
            classes: tuple[int, ...] = (0, 1, 2)) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _trainer(callbacks, tmp_path: Path | None = None, **kwargs) -> L.Trainer:
    defaults = dict(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    defaults.update(kwargs)
    if tmp_path is not None:
        defaults.setdefault("default_root_dir", str(tmp_path))
    return L.Trainer(callbacks=callbacks, **defaults)


@pytest.mark.parametrize(
    ("make", "shape"),
    [(tiny_mlp, (8,)), (FunctionalMLP, (8,)), (tiny_cnn, (1, 8, 8))],
    ids=["mlp", "functional-mlp", "cnn"],
)
def test_callback_moves_activity_toward_set_point(make, shape) -> None:
    model = Classifier(make(), lr=0.0)  # no task learning: only homeostasis acts
    cb = SynapticScaling(scaling_rate=1.0, set_point=0.02, warmup_steps=0, max_change=0.05, tau=1.0, update_every=1,
                         scale_down=True)
    loader = _loader(shape=shape)
    x = next(iter(loader))[0]
    first = next(m for m in model.net.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    with torch.no_grad():
        before = torch.relu(first(x)).mean().item()
    _trainer([cb], max_epochs=3).fit(model, loader)
    with torch.no_grad():
        after = torch.relu(first(x)).mean().item()
    assert before > 0.05
    assert abs(after - 0.02) < abs(before - 0.02) * 0.5, (before, after)
    assert cb.engine.step == 3 * 8


@pytest.mark.parametrize("scaling", [{"scaling_rate": 0.0}, {"scale_down": True}], ids=["no-scaling", "both-ways"])
def test_the_first_task_trains_as_without_the_callback_unless_scaling_acts(scaling) -> None:
    """Without homeostatic scaling nothing is protected on the first task, so the callback only senses: the
    weights end bitwise as a plain fit's. Scaling that acts (here both ways) moves them."""
    def fit(callbacks: list) -> nn.Module:
        torch.manual_seed(0)
        model = Classifier(tiny_mlp())
        _trainer(callbacks, max_epochs=3).fit(model, _loader())
        return model.net

    plain = fit([])
    cb = SynapticScaling(consolidate_on_fit_end=False, update_every=2, warmup_steps=2, **scaling)
    with_ssr = fit([cb])
    assert cb.engine.step == 24 and cb.engine.layers["net.0"].seen > 0  # it sensed and updated
    same = [torch.equal(a, b) for a, b in zip(with_ssr.parameters(), plain.parameters())]
    assert all(same) if scaling.get("scaling_rate") == 0.0 else not all(same)


def test_updates_only_when_the_optimizer_stepped() -> None:
    cb = SynapticScaling(scaling_rate=0.1)
    _trainer([cb], accumulate_grad_batches=4).fit(Classifier(tiny_mlp()), _loader(n=128))
    assert cb.engine.step == 2  # 8 batches, one step per 4

    cb = SynapticScaling(scaling_rate=0.1)
    _trainer([cb]).fit(Classifier(tiny_mlp(), skip_every=2), _loader(n=128))
    assert cb.engine.step == 4  # batches 0, 2, 4, 6 were skipped


def test_bf16_mixed_keeps_float32_statistics() -> None:
    cb = SynapticScaling(scaling_rate=0.5, set_point=0.1, warmup_steps=0)
    _trainer([cb], precision="bf16-mixed").fit(Classifier(tiny_mlp()), _loader())
    for st in cb.engine.layers.values():
        assert st.activity.dtype == torch.float32
        assert torch.isfinite(st.activity).all()
    assert cb.engine.step == 8


def test_each_fit_consolidates_a_task_and_protection_slows_important_neurons() -> None:
    torch.manual_seed(1)
    net = tiny_mlp()
    cb = SynapticScaling(consolidation=50.0, protection="update", min_plasticity=0.0)  # the full strength
    model = Classifier(net, lr=0.2)
    _trainer([cb]).fit(model, _loader(seed=1))
    assert cb.engine.tasks == 1
    imp = cb.engine.layers["net.0"].importance
    assert float(imp.sum()) > 0
    w_task1 = net[0].weight.detach().clone()
    net_free = tiny_mlp()
    net_free.load_state_dict(net.state_dict())
    _trainer([cb]).fit(model, _loader(seed=2))
    _trainer([]).fit(Classifier(net_free, lr=0.2), _loader(seed=2))
    assert cb.engine.tasks == 2
    moved_protected = (net[0].weight.detach() - w_task1).norm()
    moved_free = (net_free[0].weight.detach() - w_task1).norm()
    assert moved_protected < 0.5 * moved_free, (moved_protected, moved_free)


def test_a_new_lightning_module_around_the_same_network_keeps_the_ssr_state() -> None:
    torch.manual_seed(1)
    net = tiny_mlp()
    cb = SynapticScaling(consolidation=5.0)
    _trainer([cb]).fit(Classifier(net), _loader(seed=1))
    importance = cb.engine.layers["net.0"].importance.clone()
    anchors = cb.engine.anchoring.state_dict(cb.engine.param_names())
    assert cb.engine.tasks == 1 and anchors
    _trainer([cb], max_steps=1).fit(Classifier(net), _loader(seed=2))  # a new wrapper for task 2
    assert cb.engine.tasks == 2, "the first task's state was dropped with its LightningModule"
    assert_close(cb.engine.layers["net.0"].importance >= importance, torch.ones_like(importance, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"cannot carry over.*Use a new SynapticScaling"):
        _trainer([cb]).fit(Classifier(nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))), _loader())


class _FunctionalOnly(nn.Module):
    """Its tracked Linear is applied through torch.nn.functional: no forward hook can ever fire."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(8, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(nn.functional.linear(x, self.hidden.weight, self.hidden.bias)))


def test_a_model_whose_tracked_layers_never_run_is_refused_before_the_first_step() -> None:
    net = _FunctionalOnly()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"sensed none of the tracked layers \['net.hidden'\].*Call the layers as modules"):
        _trainer([SynapticScaling()]).fit(Classifier(net), _loader())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # refused before any optimizer step


def test_attention_out_proj_and_batchnorm_are_named_in_warnings() -> None:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(8, 16)
            self.norm = nn.BatchNorm1d(16)
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
            self.out = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.norm(self.inp(x))).unsqueeze(1)
            return self.out(self.mha(h, h, h)[0].squeeze(1))

    cb = SynapticScaling(update_every=1, warmup_steps=0)
    with pytest.warns(UserWarning, match=r"leaves \['net.mha.out_proj'\] untracked: nn.MultiheadAttention") as rec:
        _trainer([cb]).fit(Classifier(Attention()), _loader())
    assert any("convert_batchnorm" in str(w.message) and "net.norm" in str(w.message) for w in rec)
    assert list(cb.engine.layers) == ["net.inp"]
    assert float(cb.engine.layers["net.inp"].activity.sum()) > 0


def test_a_torch_compiled_network_is_sensed_and_protected() -> None:
    torch.manual_seed(0)
    net = torch.compile(tiny_mlp(), backend="eager")
    cb = SynapticScaling(update_every=1, sense_every=1, warmup_steps=0)
    model = Classifier(net)
    _trainer([cb]).fit(model, _loader())
    layer = cb.engine.layers["net._orig_mod.0"]
    assert float(layer.activity.sum()) > 0 and float(layer.importance.sum()) > 0
    _trainer([cb]).fit(model, _loader(seed=2))
    assert cb.engine.tasks == 2 and cb.engine.anchoring.nbytes() > 0


def test_anchor_lr_reads_the_trainers_optimizer_and_follows_its_scheduler() -> None:
    """At SGD lr 0.05, ``anchor_rate=0.5, anchor_lr=0.5`` pulls as a fixed ``anchor_rate=0.05``; a
    scheduler that halves the learning rate every step makes the pull differ (the pull alone: the
    input-subspace projection, which shrinks alike, is off)."""

    class Halving(Classifier):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=self.lr)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5),
                                                       "interval": "step"}}

    def train(cb: SynapticScaling, cls: type = Classifier) -> nn.Module:
        torch.manual_seed(0)
        model = cls(tiny_mlp())
        for seed in (0, 2):
            _trainer([cb]).fit(model, _loader(seed=seed))
        return model.net

    scaled = train(SynapticScaling(anchor_rate=0.5, anchor_lr=0.5, update_every=1, warmup_steps=0, subspace_energy=0.0))
    fixed = train(SynapticScaling(anchor_rate=0.05, update_every=1, warmup_steps=0, subspace_energy=0.0))
    for a, b in zip(scaled.parameters(), fixed.parameters()):
        assert_close(a, b, rtol=1e-6, atol=1e-7)
    scheduled = train(SynapticScaling(anchor_rate=0.5, anchor_lr=0.5, update_every=1, warmup_steps=0,
                                      subspace_energy=0.0), Halving)
    scheduled_fixed = train(SynapticScaling(anchor_rate=0.05, update_every=1, warmup_steps=0, subspace_energy=0.0),
                            Halving)
    assert not torch.allclose(scheduled[0].weight, scheduled_fixed[0].weight)


def test_public_consolidate_and_error_before_fit() -> None:
    cb = SynapticScaling()
    with pytest.raises(RuntimeError, match=r"consolidate\(\) needs a model"):
        cb.consolidate()
    cb = SynapticScaling(consolidate_on_fit_end=False)
    _trainer([cb]).fit(Classifier(tiny_mlp()), _loader())
    assert cb.engine.tasks == 0
    cb.consolidate()
    assert cb.engine.tasks == 1


def test_diagnostics_are_logged_through_the_trainer_logger(tmp_path: Path) -> None:
    cb = SynapticScaling(scaling_rate=0.5, set_point=0.1, warmup_steps=0, update_every=1)
    logger = CSVLogger(str(tmp_path), name="run")
    module = Classifier(tiny_mlp())
    _trainer([cb], logger=logger, log_every_n_steps=2, max_epochs=2).fit(module, _loader())
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    keys = set(rows[0])
    for layer in ("0", "2"):
        for k in ("activity", "deviation", "factor_mean", "factor_min", "factor_max"):
            assert f"ssr/net.{layer}/{k}" in keys
    factors = [float(r["ssr/net.0/factor_mean"]) for r in rows if r.get("ssr/net.0/factor_mean")]
    assert len(factors) >= 4 and all(0.99 - 1e-6 <= f <= 1.01 + 1e-6 for f in factors)
    assert not any(k.endswith("/pull_scale") for k in keys)  # nothing is pulled on the first task
    logger = CSVLogger(str(tmp_path), name="task2")
    _trainer([cb], logger=logger, log_every_n_steps=2, max_epochs=1).fit(module, _loader(seed=1))
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    for layer in ("0", "2"):  # the second task's pull, scaled by its input overlap
        scales = [float(r[f"ssr/net.{layer}/pull_scale"]) for r in rows if r.get(f"ssr/net.{layer}/pull_scale")]
        assert len(scales) >= 3 and all(0.0 <= v <= 1.0 for v in scales), scales


def test_forward_hooks_are_registered_only_for_the_steps_that_sense() -> None:
    """With ``sense_every=3`` the tracked layers carry a hook in steps 0, 3, 6, ... of each task and run
    hook-free in the others (torch's fast call path); the second task starts over at its step 0."""

    class Watch(L.Callback):
        def __init__(self) -> None:
            self.hooked: list[bool] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.hooked.append(bool(pl_module.net[0]._forward_hooks))

    torch.manual_seed(0)
    model = Classifier(tiny_mlp())
    cb = SynapticScaling(sense_every=3, update_every=4)
    for seed in (0, 1):
        watch = Watch()
        _trainer([cb, watch]).fit(model, _loader(seed=seed))
        assert watch.hooked == [step % 3 == 0 for step in range(8)], watch.hooked
    assert cb.engine.layers["net.0"].task_steps == 0 and cb.engine.tasks == 2
    assert float(cb.engine.layers["net.0"].importance.sum()) > 0


def test_teardown_leaves_a_plain_model(tmp_path: Path) -> None:
    model = Classifier(tiny_mlp())
    keys_before = set(model.state_dict())
    cb = SynapticScaling(scaling_rate=0.1)
    _trainer([cb]).fit(model, _loader())
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert set(model.state_dict()) == keys_before
    blob = pickle.dumps(model.net)
    assert b"lightning_ssr" not in blob
    path = tmp_path / "net.pt"
    torch.save(model.net, path)
    code = (
        "import sys, torch; sys.modules['lightning_ssr'] = None; "
        f"net = torch.load({str(path)!r}, weights_only=False); print(net(torch.randn(2, 8)).shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "torch.Size([2, 3])" in out.stdout


def test_non_finite_activity_never_reaches_weights() -> None:
    class Exploding(Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            if batch_idx == 1:
                self(x * float("inf"))  # a diverged forward: its activity is sensed, its loss is not used
            return nn.functional.cross_entropy(self(x), y)

    model = Exploding(tiny_mlp(), lr=0.01)
    cb = SynapticScaling(scaling_rate=1.0, set_point=0.1, warmup_steps=0, update_every=1)
    with pytest.warns(NonFiniteActivityWarning,
                      match=r"optimizer step 2: the activity of layer\(s\) \['net.0', 'net.2'\].*gradient_clip_val"):
        _trainer([cb]).fit(model, _loader(n=48))
    assert cb.engine.skipped == 1
    for p in model.parameters():
        assert torch.isfinite(p).all()


# --------------------------------------------------------- partial batches


def _plain_sgd_run(net: nn.Module, loader: DataLoader, lr: float, scale_partial: bool) -> None:
    """The reference: plain SGD where a batch of ``n < N`` samples takes ``(n/N)**2`` of a step
    (its gradient and its update each scaled by ``n/N``) when ``scale_partial``."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    full = 0
    for x, y in loader:
        full = max(full, len(x))
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        f = len(x) / full if scale_partial else 1.0
        with torch.no_grad():
            for p in net.parameters():
                p -= lr * f * f * p.grad


@pytest.mark.parametrize("scale", [True, False])
def test_a_partial_last_batch_counts_in_proportion_to_its_samples(scale: bool) -> None:
    torch.manual_seed(0)
    net = tiny_mlp()
    reference = copy.deepcopy(net)
    loader = _loader(n=40)  # batches of 16, 16 and 8
    # nothing else of SSR changes a weight: no protection, no scaling, no recycling
    cb = SynapticScaling(consolidation=0.0, scaling_rate=0.0, recycle_below=0.0, scale_partial_batches=scale)
    _trainer([cb]).fit(Classifier(net), loader)
    _plain_sgd_run(reference, loader, lr=0.05, scale_partial=scale)
    for (name, p), q in zip(net.named_parameters(), reference.parameters()):
        assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert cb.engine.partial.scaled == (1 if scale else 0)


def test_gradient_accumulation_counts_the_samples_of_the_whole_step() -> None:
    cb = SynapticScaling(consolidation=0.0, scaling_rate=0.0, recycle_below=0.0, consolidate_on_fit_end=False)
    # batches of 8, two a step: steps of 16, 16 and a last one of 8 samples
    _trainer([cb], accumulate_grad_batches=2).fit(Classifier(tiny_mlp()), _loader(n=40, batch_size=8))
    assert (cb.engine.partial.full, cb.engine.partial.scaled, cb.engine.step) == (16, 1, 3)
    cb2 = SynapticScaling(consolidation=0.0, scaling_rate=0.0, recycle_below=0.0)
    _trainer([cb2], accumulate_grad_batches=2).fit(Classifier(tiny_mlp()), _loader(n=48, batch_size=8))
    assert (cb2.engine.partial.scaled, cb2.engine.step) == (0, 3)


def test_each_task_sets_its_own_full_batch() -> None:
    cb = SynapticScaling()
    model = Classifier(tiny_mlp())
    _trainer([cb]).fit(model, _loader(n=40, batch_size=16))  # 16, 16, 8
    assert cb.engine.partial.scaled == 1 and cb.engine.partial.full == 0  # reset when the task ended
    _trainer([cb]).fit(model, _loader(n=24, batch_size=8))  # a smaller batch size: 8, 8, 8, no step scaled
    assert cb.engine.partial.scaled == 1


def test_partial_batch_scaling_alone_gives_plain_training_the_same_steps() -> None:
    torch.manual_seed(0)
    net = tiny_mlp()
    reference = copy.deepcopy(net)
    loader = _loader(n=40)  # batches of 16, 16 and 8
    cb = PartialBatchScaling()
    _trainer([cb]).fit(Classifier(net), loader)
    _plain_sgd_run(reference, loader, lr=0.05, scale_partial=True)
    for (name, p), q in zip(net.named_parameters(), reference.parameters()):
        assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert (cb.partial.scaled, cb.partial.full) == (1, 0)  # one half step; the next fit measures its own batch


def test_partial_batch_scaling_saves_its_state_and_refuses_to_scale_twice(tmp_path: Path) -> None:
    cb = PartialBatchScaling()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    _trainer([cb, ckpt], enable_checkpointing=True).fit(Classifier(tiny_mlp()), _loader(n=40))
    saved = torch.load(tmp_path / "epoch=0-step=2.ckpt", weights_only=False)["callbacks"]["PartialBatchScaling"]
    assert saved == {"full": 16, "samples": 0, "scaled": 0}  # in the middle of the task: its full batch so far
    restored = PartialBatchScaling()
    restored.load_state_dict(saved)
    assert restored.partial.full == 16
    with pytest.raises(ValueError, match="must not hold PartialBatchScaling beside a SynapticScaling"):
        _trainer([PartialBatchScaling(), SynapticScaling()]).fit(Classifier(tiny_mlp()), _loader(n=40))
    _trainer([PartialBatchScaling(), SynapticScaling(scale_partial_batches=False)]).fit(Classifier(tiny_mlp()), _loader(n=40))


@pytest.mark.parametrize("batch", [
    (torch.zeros(7, 3), torch.zeros(7)),
    [torch.zeros(5, 2, 2)],
    (torch.tensor(3.0), torch.zeros(4)),
    ((torch.zeros(6, 2), torch.zeros(9, 2)), torch.zeros(6)),
    {"x": torch.zeros(8, 1), "y": torch.zeros(8)},
    ("text", torch.zeros(2, 1)),
], ids=["pair", "list", "scalar-first", "nested", "dict", "string-first"])
def test_the_batch_size_is_read_as_lightning_reads_it(batch: Any) -> None:
    partial = PartialBatches(enabled=True)
    observe_batch(partial, batch, "test")
    assert partial.samples == extract_batch_size(batch)


class _Batch:
    """A batch Lightning cannot read a size from (no tensor it can find)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.pair = (x, y)


class _OpaqueClassifier(Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch.pair
        return nn.functional.cross_entropy(self(x), y)


def test_an_unreadable_batch_size_is_warned_about_and_steps_are_left_as_they_are() -> None:
    data = _loader(n=40).dataset
    loader = DataLoader(data, batch_size=16, collate_fn=lambda items: _Batch(torch.stack([a for a, _ in items]),
                                                                               torch.stack([b for _, b in items])))
    cb = SynapticScaling(consolidation=0.0, scaling_rate=0.0, recycle_below=0.0)
    with pytest.warns(UserWarning, match="could not read the batch size .* `scale_partial_batches` is off from now on"):
        _trainer([cb]).fit(_OpaqueClassifier(tiny_mlp()), loader)
    assert cb.engine.partial.scaled == 0 and not cb.engine.partial.enabled


# ----------------------------------------------------------------- resume


_RESUME_KWARGS = dict(scaling_rate=0.2, set_point="self", warmup_steps=3, consolidation=2.0, norm_rate=0.05, update_every=3)


def _resume_run(tmp_path: Path, stop: bool, classes: tuple[tuple[int, ...], tuple[int, ...]] = ((0, 1, 2), (0, 1, 2)),
                **extra: Any) -> tuple[dict, dict]:
    """Task 1 (one fit), then task 2 over 4 epochs, optionally stopped after 2 and resumed; ``classes``: each task's."""
    L.seed_everything(7)
    net = tiny_mlp()
    cb = SynapticScaling(**_RESUME_KWARGS, **extra)
    model = Classifier(net, lr=0.1)
    _trainer([cb]).fit(model, _loader(seed=3, classes=classes[0]))
    ckpt_dir = tmp_path / ("stop" if stop else "straight")
    if not stop:
        _trainer([cb], max_epochs=4).fit(model, _loader(seed=4, classes=classes[1]))
    else:
        saver = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_epochs=1)
        _trainer([cb, saver], max_epochs=2, enable_checkpointing=True).fit(model, _loader(seed=4, classes=classes[1]))
        # a new process would start from scratch: a new model and a new callback
        net2 = tiny_mlp()
        cb2 = SynapticScaling(**_RESUME_KWARGS, **extra)
        model = Classifier(net2, lr=0.1)
        _trainer([cb2], max_epochs=4).fit(model, _loader(seed=4, classes=classes[1]), ckpt_path=str(ckpt_dir / "last.ckpt"))
        cb = cb2
    return {k: v.clone() for k, v in model.state_dict().items()}, cb.engine.state_dict()


@pytest.mark.parametrize("extra", [{"protection": "update"}, {"protection": "anchor", "anchor_rate": 0.3, "min_plasticity": 0.5},
                                   {"protection": "anchor", "output_targets": True},
                                   {"protection": "anchor", "subspace_energy": 0.9},
                                   {"protection": "anchor", "subspace_energy": 0.9, "classes": ((0, 1), (1, 2))}],
                         ids=["update", "anchor-capacity", "anchor-output-targets", "anchor-subspace",
                              "anchor-subspace-new-classes"])
def test_resume_mid_task_matches_never_stopping(tmp_path: Path, extra: dict) -> None:
    weights_a, state_a = _resume_run(tmp_path, stop=False, **extra)
    weights_b, state_b = _resume_run(tmp_path, stop=True, **extra)
    assert sorted(state_a.get("anchors", {})) == sorted(state_b.get("anchors", {}))
    assert ("anchors" in state_a) == (extra["protection"] == "anchor")
    for name, anchor in state_a.get("anchors", {}).items():
        assert_close(state_b["anchors"][name], anchor, rtol=0, atol=0)
    for k in weights_a:
        assert_close(weights_b[k], weights_a[k], rtol=0, atol=0)
    for key in ("step", "task_step", "tasks", "skipped"):
        assert state_a[key] == state_b[key]
    for group in ("layers", "outputs"):
        for name, layer in state_a[group].items():
            for key, value in layer.items():
                if isinstance(value, torch.Tensor):
                    assert_close(state_b[group][name][key], value, rtol=0, atol=0, equal_nan=True)
                else:
                    assert state_b[group][name][key] == value
    if "subspace" in state_a:  # task 2's bases come from input sketches that spanned the resume
        sub_a, sub_b = state_a["subspace"], state_b["subspace"]
        assert sub_a["bases"] and sub_a["counts"] == sub_b["counts"]
        for part in ("bases", "sketches", "energies", "units"):
            for name, value in sub_a[part].items():
                assert_close(sub_b[part][name], value, rtol=0, atol=0)
    if extra.get("output_targets"):  # the targets were counted (and folded into importance at the task's end)
        assert all("targets" in o and float(o["importance"].sum()) > 0 for o in state_a["outputs"].values())


def _finished_fit_resumed(tmp_path: Path, resume: bool, **kwargs: Any) -> tuple[dict, SynapticScaling]:
    """One fit of 1 epoch saved with trainer.save_checkpoint, resumed to 3 epochs; or 3 epochs straight."""
    L.seed_everything(3)
    net = tiny_mlp()
    init = {k: v.clone() for k, v in net.state_dict().items()}
    cb = SynapticScaling(update_every=2, sense_every=1, warmup_steps=1, **kwargs)
    if not resume:
        _trainer([cb], max_epochs=3).fit(Classifier(net, lr=0.1), _loader(seed=5))
        return net.state_dict(), cb
    trainer = _trainer([cb], max_epochs=1)
    trainer.fit(Classifier(net, lr=0.1), _loader(seed=5))
    trainer.save_checkpoint(tmp_path / "after-fit.ckpt")
    net2 = tiny_mlp()
    net2.load_state_dict(init)  # a new process: a new model and a new callback
    cb2 = SynapticScaling(update_every=2, sense_every=1, warmup_steps=1, **kwargs)
    _trainer([cb2], max_epochs=3).fit(Classifier(net2, lr=0.1), _loader(seed=5), ckpt_path=str(tmp_path / "after-fit.ckpt"))
    return net2.state_dict(), cb2


def test_resuming_a_finished_fit_continues_its_task(tmp_path: Path) -> None:
    straight, cb_a = _finished_fit_resumed(tmp_path, resume=False)
    resumed, cb_b = _finished_fit_resumed(tmp_path, resume=True)
    assert cb_a.engine.tasks == cb_b.engine.tasks == 1  # one task, consolidated once
    assert sum(st.recycled for st in cb_a.engine.layers.values()) > 0  # recycling (the default) changed weights
    for k in straight:
        assert_close(resumed[k], straight[k], rtol=0, atol=1e-6)
    # asked for: the resumed fit is a new task, protected by the first
    _, cb_c = _finished_fit_resumed(tmp_path, resume=True, resume_continues_task=False)
    assert cb_c.engine.tasks == 2


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"protection": "penalty"}, ValueError, r"`protection` must be 'anchor', 'update' or 'gradient' in the SynapticScaling callback"),
        ({"include": []}, ValueError, r"`include` is empty, so it would select no layer"),
        ({"layer_types": [int]}, TypeError, r"`layer_types` must be a non-empty sequence of nn.Module subclasses"),
        ({"include": [3]}, TypeError, r"`include` must be an fnmatch pattern \(str\) or a sequence of them or None, got \[3\]"),
        ({"track_output": "yes"}, TypeError, r"`track_output` must be a bool, got 'yes'"),
        ({"scaling_rate": 11}, ValueError, r"`scaling_rate` must be in \[0.0, 10.0\], got 11"),
        ({"lr": 0.1}, TypeError, r"Unexpected keyword arguments: \['lr'\]"),
        ({"config": {"tau": 3}}, TypeError, r"`config` must be an SSRConfig or None, got dict"),
    ],
)
def test_construction_errors(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        SynapticScaling(**kwargs)


def test_config_object_and_overrides() -> None:
    cb = SynapticScaling(SSRConfig(tau=50.0, scaling_rate=0.1), scaling_rate=0.2)
    assert (cb.config.tau, cb.config.scaling_rate) == (50.0, 0.2)


def test_setup_errors_for_models_and_patterns() -> None:
    class NoLayers(Classifier):
        def configure_optimizers(self):
            return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)

    with pytest.raises(ValueError, match="No layer to track in NoLayers"):
        _trainer([SynapticScaling()]).fit(NoLayers(nn.Sequential(nn.ReLU())), _loader())
    with pytest.raises(ValueError, match=r"`include` pattern 'encoder\.\*' matches no layer; candidate layers are \['net.0', 'net.2', 'net.4'\]"):
        _trainer([SynapticScaling(include=["encoder.*"])]).fit(Classifier(tiny_mlp()), _loader())


def test_sharded_strategy_is_refused() -> None:
    trainer = _trainer([])
    # FSDP cannot be constructed on a CPU-only machine; place it where Lightning keeps the strategy
    trainer._accelerator_connector.strategy = FSDPStrategy()
    with pytest.raises(ValueError, match="SynapticScaling supports single-device and DDP strategies .* got FSDPStrategy"):
        SynapticScaling().setup(trainer, Classifier(tiny_mlp()), "fit")


# -------------------------------------------------------------------- DDP


@pytest.mark.parametrize(("output_targets", "subspace"), [(False, False), (True, False), (True, True)],
                         ids=["output-wins", "output-targets", "output-targets-subspace"])
def test_ddp_two_processes_keep_replicas_identical(tmp_path: Path, output_targets: bool, subspace: bool) -> None:
    env = {**os.environ, "PYTHONPATH": f"{HERE.parent}:{HERE}"}
    subprocess.run(
        [sys.executable, str(HERE / "scripts" / "ddp_train.py"), "--out", str(tmp_path),
         *(["--output-targets"] if output_targets else []), *(["--subspace"] if subspace else [])],
        check=True, env=env, cwd=tmp_path, timeout=240, capture_output=True,
    )
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["ssr"]["step"] > 0 and r0["ssr"]["tasks"] == (2 if output_targets else 1)
    assert r0["ssr"]["partial"]["scaled"] == (3 if output_targets else 2)  # each epoch ends on 4 samples a rank
    for k in r0["params"]:
        assert_close(r1["params"][k], r0["params"][k], rtol=0, atol=0)
    for group in ("layers", "outputs"):
        for name, layer in r0["ssr"][group].items():
            for key, value in layer.items():
                if isinstance(value, torch.Tensor):
                    assert_close(r1["ssr"][group][name][key], value, rtol=0, atol=0, equal_nan=True)
    if subspace:  # the ranks read different inputs; one reduction at each task's end gives both the same bases
        bases = r0["ssr"]["subspace"]["bases"]
        assert sorted(bases) == ["net.0", "net.2", "net.4"] and all(b.shape[1] > 0 for b in bases.values())
        for name, basis in bases.items():
            assert_close(r1["ssr"]["subspace"]["bases"][name], basis, rtol=0, atol=0)
        # the pull's factors during task 2 come from input energies summed across processes: the same on both ranks
        assert r0["overlap"] == r1["overlap"] and sorted(r0["overlap"]) == ["net.0", "net.2", "net.4"], r0["overlap"]
    if output_targets:  # output importance from the targets: classes 0 and 1, then class 2
        importance = r0["ssr"]["outputs"]["net.4"]["importance"]
        assert bool((importance > 0).all())
    # the ranks saw different data: without the cross-process reduction their activity differs
    assert not torch.equal(r0["local_activity"], r1["local_activity"])


@pytest.mark.parametrize("drive", [False, True])
def test_callback_can_leave_ssrnorm_to_itself_or_drive_it(drive: bool) -> None:
    from lightning_ssr import SSRNorm1d

    net = nn.Sequential(nn.Linear(8, 16), SSRNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    cb = SynapticScaling(drive_norm_layers=drive)
    _trainer([cb], accumulate_grad_batches=2).fit(Classifier(net), _loader(n=128))
    # 8 training forwards, 4 optimizer steps: driven layers update once per real step
    assert int(net[1].num_batches_tracked) == (4 if drive else 8)
    assert net[1].auto_update is True  # restored at teardown
    assert cb.engine.step == 4
