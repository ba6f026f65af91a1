"""The stream runner's settings: argument checks, the configuration it logs and the fingerprint it resumes by.

* :func:`_check_module`, :func:`_check_callbacks` and :func:`_check_settings` check the runner's
  arguments up front; each error names the argument, what is allowed and what was received.
* :class:`_Config` holds the loop's numbers; :func:`_stream_config` is the configuration logged
  and stored in the result, :func:`_stream_fingerprint` the part of it a stream checkpoint must match.
* :func:`_callback_configs` and :func:`_extra_state_bytes` describe the method the callbacks form.

Example:
    >>> cfg = _Config(epochs=1, batch_size=32, eval_batch_size=256, num_workers=0, seed=0)
    >>> _stream_fingerprint(cfg, "carry", n_train=5, n_test=5)
    {'epochs': 1, 'batch_size': 32, 'seed': 0, 'optimizer_state': 'carry',
     'n_train_experiences': 5, 'n_test_experiences': 5}
    >>> _check_settings(0, 32, None, 0, 0, None, False, None, None, None, "carry")
    Traceback (most recent call last):
    ...
    ValueError: `epochs` must be >= 1, got 0
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_ssr.continual.metrics import _jsonable
from lightning_ssr.core.validation import check_int

__all__ = [
    "_Config",
    "_callback_configs",
    "_check_callbacks",
    "_check_module",
    "_check_settings",
    "_extra_state_bytes",
    "_stream_config",
    "_stream_fingerprint",
]

#: Trainer arguments the runner owns; they have their own parameters.
_RESERVED = {"callbacks": "callbacks", "logger": "logger", "max_epochs": "epochs"}
#: What happens to the optimizers' state (Adam's moments, momentum) between experiences.
_OPTIMIZER_STATES: tuple[str, ...] = ("carry", "reset")


@dataclass
class _Config:
    epochs: int
    batch_size: int
    eval_batch_size: int
    num_workers: int
    seed: Optional[int]


# ------------------------------------------------------------------------------- validation
def _check_module(module: Any) -> None:
    """Raise ``TypeError`` unless ``module`` is a LightningModule."""
    if not isinstance(module, pl.LightningModule):
        raise TypeError(
            f"`module` must be a lightning.pytorch.LightningModule (wrap a plain nn.Module in "
            f"ClassifierModule), got {type(module).__name__}"
        )


def _check_callbacks(callbacks: Any) -> Sequence[Callback]:
    """``callbacks`` checked: a list or tuple of Callbacks (a single Callback becomes a list of one)."""
    if isinstance(callbacks, Callback):
        callbacks = [callbacks]
    if not isinstance(callbacks, (list, tuple)):
        raise TypeError(
            f"`callbacks` must be a list of lightning.pytorch Callbacks, got {type(callbacks).__name__}"
        )
    for i, cb in enumerate(callbacks):
        if not isinstance(cb, Callback):
            raise TypeError(f"`callbacks[{i}]` must be a lightning.pytorch Callback, got {type(cb).__name__}")
    return callbacks


def _check_settings(
    epochs: Any,
    batch_size: Any,
    eval_batch_size: Any,
    num_workers: Any,
    seed: Any,
    trainer_kwargs: Any,
    resume: Any,
    ckpt_dir: Any,
    method: Any,
    method_config: Any,
    optimizer_state: Any,
) -> Mapping[str, Any]:
    """Check the runner's other arguments, in this order; return ``trainer_kwargs`` (``{}`` for ``None``)."""
    check_int("epochs", epochs, 1)
    check_int("batch_size", batch_size, 1)
    check_int("eval_batch_size", eval_batch_size, 1, optional=True)
    check_int("num_workers", num_workers, 0)
    check_int("seed", seed, 0, optional=True)
    if trainer_kwargs is None:
        trainer_kwargs = {}
    if not isinstance(trainer_kwargs, Mapping):
        raise TypeError(
            f"`trainer_kwargs` must be a mapping of Trainer arguments, got {type(trainer_kwargs).__name__}"
        )
    for key, own in _RESERVED.items():
        if key in trainer_kwargs:
            raise ValueError(
                f"`trainer_kwargs` must not contain {key!r} (pass `{own}=` to the stream runner), "
                f"got trainer_kwargs[{key!r}]={trainer_kwargs[key]!r}"
            )
    if not isinstance(resume, bool):
        raise TypeError(f"`resume` must be a bool, got {resume!r}")
    if resume and ckpt_dir is None:
        raise ValueError(
            "`resume=True` needs `ckpt_dir` (the directory of the stream checkpoint), got ckpt_dir=None"
        )
    if ckpt_dir is not None and not isinstance(ckpt_dir, (str, os.PathLike)):
        raise TypeError(f"`ckpt_dir` must be a path or None, got {ckpt_dir!r}")
    if method is not None and not isinstance(method, str):
        raise TypeError(f"`method` must be a str or None, got {method!r}")
    if method_config is not None and not isinstance(method_config, Mapping):
        raise TypeError(f"`method_config` must be a mapping or None, got {type(method_config).__name__}")
    if optimizer_state not in _OPTIMIZER_STATES:
        raise ValueError(f"`optimizer_state` must be one of {_OPTIMIZER_STATES}, got {optimizer_state!r}")
    return trainer_kwargs


# ------------------------------------------------------------------------ configuration
def _callback_configs(callbacks: Sequence[Callback]) -> dict[str, Any]:
    """Each callback's dataclass ``config`` attribute, by class name, where it has one."""
    out: dict[str, Any] = {}
    for cb in callbacks:
        cfg = getattr(cb, "config", None)
        if cfg is not None and hasattr(cfg, "__dataclass_fields__"):
            out[type(cb).__name__] = _jsonable(cfg)
    return out


def _stream_config(cfg: _Config, optimizer_state: str, n_train: int, n_test: int, module: pl.LightningModule,
                   trainer_kwargs: Mapping[str, Any], benchmark_info: Mapping[str, Any]) -> dict[str, Any]:
    """How the stream is run, as JSON types: logged as the run's ``stream`` hyperparameters and kept in the result."""
    return {
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "eval_batch_size": cfg.eval_batch_size,
        "num_workers": cfg.num_workers,
        "seed": cfg.seed,
        "optimizer_state": optimizer_state,
        "n_train_experiences": n_train,
        "n_test_experiences": n_test,
        "module": type(module).__name__,
        "hparams": _jsonable(dict(module.hparams)),
        "trainer_kwargs": _jsonable(trainer_kwargs),
        "benchmark": _jsonable(benchmark_info),
    }


def _stream_fingerprint(cfg: _Config, optimizer_state: str, n_train: int, n_test: int) -> dict[str, Any]:
    """The settings a stream checkpoint must have been made with to be resumed from."""
    return {
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "optimizer_state": optimizer_state,
        "n_train_experiences": n_train,
        "n_test_experiences": n_test,
    }


def _extra_state_bytes(callbacks: Sequence[Callback]) -> int:
    """Bytes the callbacks keep: their ``extra_state_bytes()`` where defined, else the tensors of ``state_dict()``."""
    total = 0
    for cb in callbacks:
        fn = getattr(cb, "extra_state_bytes", None)
        if callable(fn):
            total += int(fn())
            continue
        stack = [cb.state_dict()]
        while stack:
            item = stack.pop()
            if isinstance(item, Tensor):
                total += item.numel() * item.element_size()
            elif isinstance(item, Mapping):
                stack.extend(item.values())
            elif isinstance(item, (list, tuple)):
                stack.extend(item)
    return total
