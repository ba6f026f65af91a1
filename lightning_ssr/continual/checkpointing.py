"""Checkpoint and resume a stream exactly: stream checkpoints, optimizer state, random-number generators.

With ``ckpt_dir`` the runner calls :func:`_save` after each experience: a Lightning checkpoint
``exp-<i>.ckpt`` of the module and every callback's ``state_dict()``, then ``stream.pt`` with the
partial accuracy matrix, timings, the logger's step offset, the random-number generators' states
and a fingerprint of the settings. :func:`_restore` loads them back (after rebuilding what
Avalanche's dynamic modules grew) and refuses a checkpoint made with other settings, so a resumed
run gives the same result as one that never stopped.

:class:`_CarryOptimizerState` hands the optimizers' per-parameter state from one experience's
Trainer to the next one's; :func:`_rng_state` and :func:`_set_rng_state`
save and restore the generators of torch, numpy and Python's ``random``.

Example:
    >>> import torch
    >>> state = _rng_state()
    >>> a = torch.rand(2)
    >>> _set_rng_state(state)
    >>> torch.equal(a, torch.rand(2))
    True
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_ssr.continual.streams import _adapt

__all__ = ["_CarryOptimizerState", "_restore", "_rng_state", "_save", "_set_rng_state", "_state_path"]

_STATE_FILE = "stream.pt"
_STATE_VERSION = 1


class _CarryOptimizerState(Callback):
    """Hands the optimizers' per-parameter state (Adam's moments, SGD's momentum) to the next Trainer.

    Each experience's Trainer builds fresh optimizers from ``configure_optimizers``; this callback
    saves every optimizer's state by parameter name when training ends and loads it into the new
    optimizers when the next fit starts, as Avalanche strategies do by keeping one optimizer.
    Parameters that are new (a grown head) start with fresh state; hyperparameters (``lr``, ...)
    are the new optimizer's.
    """

    def __init__(self) -> None:
        self.saved: list[dict[str, dict[str, Any]]] = []

    @property
    @override
    def state_key(self) -> str:
        # The key under which checkpoints hold this callback's state: the class's old import path
        # (it lived in ``lightning_ssr/continual/stream.py``), kept so that older checkpoints still load.
        return "lightning_ssr.continual.stream._CarryOptimizerState"

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.saved:
            return
        index_of = {id(p): n for n, p in pl_module.named_parameters()}
        for opt, saved in zip(trainer.optimizers, self.saved):
            state_dict = opt.state_dict()
            ids = [p for group in opt.param_groups for p in group["params"]]
            for idx, param in enumerate(ids):
                st = saved.get(index_of.get(id(param), ""))
                if st is not None:
                    state_dict["state"][idx] = st
            opt.load_state_dict(state_dict)  # casts each tensor to its parameter's device and dtype

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        name_of = {id(p): n for n, p in pl_module.named_parameters()}
        self.saved = [
            {name_of[id(p)]: dict(st) for p, st in opt.state.items() if id(p) in name_of and st}
            for opt in trainer.optimizers
        ]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"saved": self.saved}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved = list(state_dict.get("saved", []))


# ------------------------------------------------------------------------------- RNG states
def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if "numpy" in sys.modules:
        state["numpy"] = sys.modules["numpy"].random.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -------------------------------------------------------------------------- stream checkpoints
def _state_path(ckpt_dir: Optional[Path]) -> Optional[Path]:
    """``stream.pt`` in ``ckpt_dir``, or ``None`` without a checkpoint directory."""
    return ckpt_dir / _STATE_FILE if ckpt_dir is not None else None


def _save(ckpt_dir: Path, trainer: pl.Trainer, i: int, rows: dict[str, list], offset: int, elapsed: float,
          fingerprint: dict[str, Any]) -> None:
    """Write ``exp-<i>.ckpt`` (Lightning: module and callback states), then ``stream.pt`` atomically.

    ``stream.pt`` names the checkpoint it belongs to and is replaced only once that is
    complete, so an interruption at any point leaves the previous consistent pair.
    """
    name = f"exp-{i:03d}.ckpt"
    trainer.save_checkpoint(ckpt_dir / name)
    if trainer.is_global_zero:
        state = {
            "version": _STATE_VERSION,
            "completed": i + 1,
            "checkpoint": name,
            "fingerprint": fingerprint,
            "rows": rows,
            "step_offset": offset,
            "elapsed_s": elapsed,
            "rng": _rng_state(),
        }
        tmp = ckpt_dir / (_STATE_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, ckpt_dir / _STATE_FILE)
        for old in ckpt_dir.glob("exp-*.ckpt"):
            if old.name != name:
                old.unlink(missing_ok=True)
    trainer.strategy.barrier("lightning_ssr.stream.save")


def _restore(ckpt_dir: Optional[Path], module: pl.LightningModule, train_stream: Sequence[Any],
             test_stream: Sequence[Any], callbacks: Sequence[Callback],
             fingerprint: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """Load the stream checkpoint in ``ckpt_dir`` into ``module``, ``callbacks`` and the generators.

    Returns:
        The content of ``stream.pt``, or ``None`` when there is no stream checkpoint.

    Raises:
        ValueError: when the checkpoint has another version or was made with settings other than
            ``fingerprint``.
    """
    path = _state_path(ckpt_dir)
    if path is None or not path.is_file():
        rank_zero_info(f"fit_stream: no stream checkpoint in {ckpt_dir}; starting from the first experience")
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("version") != _STATE_VERSION:
        raise ValueError(
            f"{path} has stream-checkpoint version {state.get('version')!r}, expected {_STATE_VERSION}"
        )
    expected = fingerprint
    for key, value in state["fingerprint"].items():
        if expected.get(key) != value:
            raise ValueError(
                f"`resume=True` found a stream checkpoint in {ckpt_dir} made with {key}={value!r}, "
                f"but this run has {key}={expected.get(key)!r}"
            )
    completed = state["completed"]
    # rebuild what Avalanche's dynamic modules grew, then load the weights and callback states
    module.train()
    _adapt(module, train_stream[:completed])
    module.eval()
    _adapt(module, test_stream)
    module.train()
    ckpt = torch.load(ckpt_dir / state["checkpoint"], map_location="cpu", weights_only=False)
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"])
    saved = ckpt.get("callbacks", {})
    for cb in callbacks:
        if cb.state_key in saved:
            cb.load_state_dict(saved[cb.state_key])
    _set_rng_state(state["rng"])
    rank_zero_info(f"fit_stream: resumed from {path} after {completed} of {len(train_stream)} experiences")
    return state
