"""Tests of lightning_ssr.continual.checkpointing: exact resume from a stream checkpoint, the
settings a checkpoint must match, the optimizer state carried across experiences, and the
callbacks' checkpoint keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_ssr.continual import ClassifierModule, fit_stream, stream_seed
from lightning_ssr.continual.checkpointing import _CarryOptimizerState
from lightning_ssr.continual.stream_logging import _LogStreamConfig

# the tiny models, the Split-digits benchmarks and the settings shared with test_stream.py
from test_stream import CPU, FixedHeadsMLP, _model, benches  # noqa: F401  (benches is a fixture)


# ----------------------------------------------------------------------------------- resume
def _resume_run(bench, tmp: Path | None, init_seed: int, kind: str, ssr: bool, **kwargs):
    torch.manual_seed(init_seed)
    model = FixedHeadsMLP(bench.input_size, 32, bench.n_classes) if kind == "fixed_heads" else _model(bench)
    callbacks = []
    if ssr:
        from lightning_ssr.callback import SynapticScaling

        callbacks.append(SynapticScaling())
    module = ClassifierModule(model, lr=1e-2, task_labels=True if kind == "fixed_heads" else None)
    result = fit_stream(module, bench, callbacks=callbacks, epochs=1, batch_size=20, seed=3,
                        ckpt_dir=tmp, trainer_kwargs=CPU, **kwargs)
    return result, model, callbacks[0] if ssr else None


@pytest.mark.parametrize(
    ("scenario", "kind", "ssr"),
    [
        ("task", "fixed_heads", True),  # task labels reach a plain module; SSR state carried over
        ("task", "avalanche_heads", False),  # heads grown by Avalanche's adaptation are rebuilt on resume
        ("class", "mlp", True),
    ],
)
def test_resume_is_exact(benches, tmp_path, scenario: str, kind: str, ssr: bool) -> None:
    if ssr:
        pytest.importorskip("lightning_ssr.callback")
    bench = benches[scenario]
    straight, model_a, cb_a = _resume_run(bench, None, 0, kind, ssr, stop_after=3)
    first, _, _ = _resume_run(bench, tmp_path, 0, kind, ssr, stop_after=1)
    assert first.completed == 1 and (tmp_path / "stream.pt").is_file()
    # a different initialisation and fresh callback: everything must come from the checkpoint
    resumed, model_b, cb_b = _resume_run(bench, tmp_path, 123, kind, ssr, stop_after=3, resume=True)
    assert resumed.completed == 3
    assert resumed.correct == straight.correct and resumed.accuracy == straight.accuracy
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
    if ssr:
        ea, eb = cb_a.state_dict(), cb_b.state_dict()
        assert ea.keys() == eb.keys() and ea["layers"].keys() == eb["layers"].keys()
        for name, state in ea["layers"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(value, eb["layers"][name][key], rtol=0, atol=0, equal_nan=True)
    assert len(list(tmp_path.glob("exp-*.ckpt"))) == 1  # only the last experience's checkpoint is kept


def test_resume_refuses_other_settings(benches, tmp_path) -> None:
    bench = benches["domain"]
    fit_stream(ClassifierModule(_model(bench)), bench, batch_size=20, ckpt_dir=tmp_path, stop_after=1,
               trainer_kwargs=CPU)
    with pytest.raises(ValueError, match=r"made with batch_size=20, but this run has batch_size=10"):
        fit_stream(ClassifierModule(_model(bench)), bench, batch_size=10, ckpt_dir=tmp_path, resume=True,
                   trainer_kwargs=CPU)


def test_resume_without_checkpoint_starts_fresh(benches, tmp_path) -> None:
    bench = benches["domain"]
    result = fit_stream(ClassifierModule(_model(bench)), bench, batch_size=50, ckpt_dir=tmp_path / "new", resume=True,
                        stop_after=2, trainer_kwargs=CPU)
    assert result.completed == 2



# ------------------------------------------------------------------------- optimizer state
@pytest.mark.parametrize("optimizer_state", ["carry", "reset"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_training_matches_a_plain_torch_loop(optimizer_state: str, optimizer: str) -> None:
    """Same data order, same updates as a hand-written loop: one optimizer for the whole stream
    ("carry", as Avalanche strategies) or a new one per experience ("reset")."""
    gen = torch.Generator().manual_seed(0)
    streams = [
        TensorDataset(torch.randn(30, 5, generator=gen), torch.randint(0, 3, (30,), generator=gen)) for _ in range(3)
    ]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    reference = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    reference.load_state_dict(model.state_dict())
    kwargs = {"lr": 0.05, "momentum": 0.9} if optimizer == "sgd" else {"lr": 0.05}
    fit_stream(ClassifierModule(model, optimizer=optimizer, **kwargs), (streams, streams), epochs=2, batch_size=8,
               seed=7, optimizer_state=optimizer_state, trainer_kwargs=CPU)

    make = (lambda: torch.optim.SGD(reference.parameters(), **kwargs)) if optimizer == "sgd" else (
        lambda: torch.optim.Adam(reference.parameters(), **kwargs))
    opt = make()
    for i, ds in enumerate(streams):
        if optimizer_state == "reset":
            opt = make()
        loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True,
                                             generator=torch.Generator().manual_seed(stream_seed(7, "data", i)))
        for _ in range(2):
            for x, y in loader:
                opt.zero_grad()
                nn.functional.cross_entropy(reference(x), y).backward()
                opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, msg=name)

# ---------------------------------------------------------------------------- checkpoint keys
def test_callback_state_keys_are_those_of_older_checkpoints() -> None:
    """The callbacks moved out of ``continual/stream.py``; their checkpoint keys must not change."""
    assert _CarryOptimizerState().state_key == "lightning_ssr.continual.stream._CarryOptimizerState"
    assert _LogStreamConfig().state_key == "lightning_ssr.continual.stream._LogStreamConfig"
