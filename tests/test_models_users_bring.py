"""The models users bring (README "Models users bring"): each case supported, warned or refused, never silent.

Real Lightning Trainers on tiny models, two fits (two tasks) each, so protection runs too.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import tiny_mlp
from lightning_ssr import SynapticScaling


class _Module(L.LightningModule):
    def __init__(self, net: nn.Module, manual: bool = False) -> None:
        super().__init__()
        self.net = net
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _two_tasks(net: nn.Module, x: torch.Tensor, manual: bool = False, **trainer_kwargs) -> SynapticScaling:
    torch.manual_seed(0)
    cb = SynapticScaling(update_every=1, sense_every=1, warmup_steps=0)
    module = _Module(net, manual)
    for seed in (0, 1):
        y = torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(seed))
        L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, callbacks=[cb], **trainer_kwargs,
                  ).fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    assert cb.engine.tasks == 2
    return cb


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 8, batch_first=True)
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc(self.rnn(x)[0][:, -1])))


def test_recurrent_layers_are_named_untracked_and_the_layers_around_them_tracked() -> None:
    with pytest.warns(UserWarning, match=r"does not track the recurrent layers \['net.rnn'\]"):
        cb = _two_tasks(_Recurrent(), torch.randn(32, 5, 4))
    assert list(cb.engine.layers) == ["net.fc"] and float(cb.engine.layers["net.fc"].importance.sum()) > 0


def test_embeddings_feed_tracked_layers() -> None:
    class Embedded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.fc = nn.Linear(8, 8)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            return self.out(torch.relu(self.fc(self.emb(x).mean(1))))

    cb = _two_tasks(Embedded(), torch.randint(0, 10, (32, 5)))
    assert list(cb.engine.layers) == ["net.fc"]


def test_tied_weights_are_tracked_once_with_a_warning() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.out(torch.relu(self.b(torch.relu(self.a(x)))))

    with pytest.warns(UserWarning, match=r"leaves 'net.b' untracked: it shares its weight with 'net.a'"):
        cb = _two_tasks(Tied(), torch.randn(32, 8))
    assert list(cb.engine.layers) == ["net.a"]


def test_a_module_called_twice_is_sensed_on_both_calls() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.block, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.out(torch.relu(self.block(torch.relu(self.block(torch.relu(self.inp(x)))))))

    from lightning_ssr import SSREngine

    net = Shared()
    engine = SSREngine(net)
    engine.attach()
    net(torch.randn(4, 8))
    assert engine.layers["block"].acc_count == 2 and engine.layers["inp"].acc_count == 1
    cb = _two_tasks(Shared(), torch.randn(32, 8))
    assert float(cb.engine.layers["net.block"].importance.sum()) > 0


def test_frozen_layers_are_never_changed() -> None:
    net = tiny_mlp()
    net[0].requires_grad_(False)
    frozen = {k: v.clone() for k, v in net[0].state_dict().items()}
    cb = _two_tasks(net, torch.randn(32, 8))
    for k, v in net[0].state_dict().items():
        assert torch.equal(v, frozen[k]), k  # no scaling, no anchoring pull, no recycling
    assert float(cb.engine.layers["net.0"].importance.sum()) > 0  # still sensed: its neurons gate the next layer


@pytest.mark.parametrize(("manual", "trainer_kwargs", "steps"), [
    (True, {}, 8),  # manual optimization: the optimizer's post-step hook still fires
    (False, {"accumulate_grad_batches": 2}, 4),  # only real optimizer steps count
    (False, {"gradient_clip_val": 0.1}, 8),
    (False, {"precision": "16-mixed"}, 8),  # Lightning runs 16-mixed as bf16 on a CPU
], ids=["manual-optimization", "gradient-accumulation", "gradient-clipping", "16-mixed"])
def test_training_loop_variants(manual: bool, trainer_kwargs: dict, steps: int) -> None:
    cb = _two_tasks(tiny_mlp(), torch.randn(32, 8), manual=manual, **trainer_kwargs)
    assert cb.engine.step == steps
    assert cb.engine.anchoring.nbytes() > 0
    for st in cb.engine.layers.values():
        assert torch.isfinite(st.activity).all() and float(st.importance.sum()) > 0


def test_a_transformer_layer_is_tracked_around_its_attention() -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 16)
            self.block = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
            self.out = nn.Linear(16, 3)

        def forward(self, x):
            return self.out(self.block(self.inp(x))[:, -1])

    with pytest.warns(UserWarning, match=r"leaves \['net.block.self_attn.out_proj'\] untracked"):
        cb = _two_tasks(Encoder(), torch.randn(32, 5, 4))
    assert list(cb.engine.layers) == ["net.inp", "net.block.linear1", "net.block.linear2"]
    assert all(float(st.importance.sum()) > 0 for st in cb.engine.layers.values())


def test_deepspeed_is_refused_at_setup() -> None:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    # DeepSpeed cannot be set up without the deepspeed package (absent here); the check reads the strategy's type
    trainer._accelerator_connector.strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    with pytest.raises(ValueError, match="supports single-device and DDP strategies .* got DeepSpeedStrategy"):
        SynapticScaling().setup(trainer, _Module(tiny_mlp()), "fit")


def test_a_layer_replaced_between_tasks_is_named_in_the_error() -> None:
    net = tiny_mlp()
    cb = _two_tasks(net, torch.randn(32, 8))
    net[2] = nn.Linear(16, 24)  # a wider second hidden layer, and an output layer to match
    net[4] = nn.Linear(24, 3)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    with pytest.raises(ValueError, match=r"tracks layer 'net.2', which was replaced by another module since \(Linear, 24"):
        trainer.fit(cb.engine.model, DataLoader(TensorDataset(x, y), batch_size=8))


def test_a_state_for_another_width_is_refused_naming_the_layer() -> None:
    from lightning_ssr import SSREngine

    state = SSREngine(tiny_mlp(hidden=16)).state_dict()
    with pytest.raises(ValueError, match=r"layer '0' holds 16 values of 'acc', but the layer has 32 neurons"):
        SSREngine(tiny_mlp(hidden=32)).load_state_dict(state)


def test_a_layer_whose_weight_was_resized_in_place_is_named() -> None:
    net = tiny_mlp()
    cb = _two_tasks(net, torch.randn(32, 8))
    net[2].weight = nn.Parameter(torch.randn(24, 16))  # the same module, now 24 neurons wide
    net[2].bias = nn.Parameter(torch.zeros(24))
    net[4].weight = nn.Parameter(torch.randn(3, 24))
    with pytest.raises(ValueError, match=r"recorded 16 neurons for layer 'net.2', which now has 24"):
        cb.engine.detach()
        cb.engine.attach()
