"""Run a LightningModule through a continual-learning stream: train, evaluate, log, checkpoint, resume.

For each training experience :class:`StreamRunner` builds a fresh, lean ``Trainer`` with the
*same* callback objects (so the state of a callback such as
:class:`~lightning_ssr.callback.SynapticScaling` carries from task to task), fits the module on
that experience, then evaluates it on every test experience and fills one row of the accuracy
matrix. One logger run spans the whole stream: the logger is wrapped so that the steps Lightning
logs are offset by the steps of the experiences before, and only ever increase.

Evaluation is a plain loop under ``torch.no_grad()`` that calls ``module.predict_step(batch,
batch_idx)`` (it must return logits ``[N, C]``; :class:`ClassifierModule`'s does) on the strategy's
root device, inside the precision plugin's predict context. Under DDP each process evaluates a
disjoint shard of every test experience (no padding, no duplicates) and the counts of correct
predictions are summed across processes by :class:`ExperienceAccuracy`, so every process holds the
same, exact matrix.

With ``ckpt_dir`` a stream checkpoint is written after each experience: a Lightning checkpoint of
the module and every callback's ``state_dict()``, and ``stream.pt`` with the partial accuracy
matrix, timings, the logger's step offset and the random-number generators' states. With
``resume=True`` the run continues after the last finished experience and gives the same result as
a run that never stopped.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_ssr.continual.metrics import (
    ExperienceAccuracy,
    StreamResult,
    _jsonable,
    average_accuracy,
    average_forgetting,
    backward_transfer,
)
from lightning_ssr.continual.module import unpack_batch
from lightning_ssr.core.validation import check_int

__all__ = ["StreamRunner", "fit_stream"]

_STATE_FILE = "stream.pt"
_STATE_VERSION = 1
#: Trainer arguments the runner owns; they have their own parameters.
_RESERVED = {"callbacks": "callbacks", "logger": "logger", "max_epochs": "epochs"}
#: What happens to the optimizers' state (Adam's moments, momentum) between experiences.
_OPTIMIZER_STATES: tuple[str, ...] = ("carry", "reset")
#: Lean defaults: no progress bar, summary, checkpoint callback or sanity check per experience.
_LEAN_DEFAULTS: dict[str, Any] = {
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "num_sanity_val_steps": 0,
}
#: Loggers whose start-up messages (devices available, tips) repeat with every Trainer.
_CHATTY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                   "lightning.fabric.utilities.seed")


# ----------------------------------------------------------------------------------- logging
class _StreamLogger(Logger):
    """One logger run across many Trainers: logged steps are shifted by ``offset``.

    Every attribute not defined here is the wrapped logger's. ``finalize("success")`` at the end
    of each ``fit`` only saves; the runner finalizes the wrapped logger once, at the end of the
    stream. Failures are passed through at once.
    """

    def __init__(self, logger: Logger) -> None:
        super().__init__()
        self._logger = logger
        self.offset = 0
        self._logged_hparams: set[str] = set()

    @property
    def logger(self) -> Logger:
        return self._logger

    @property
    @override
    def name(self) -> Optional[str]:
        return self._logger.name

    @property
    @override
    def version(self) -> Optional[Union[int, str]]:
        return self._logger.version

    @property
    @override
    def root_dir(self) -> Optional[str]:
        return self._logger.root_dir

    @property
    @override
    def log_dir(self) -> Optional[str]:
        return self._logger.log_dir

    @property
    @override
    def save_dir(self) -> Optional[str]:
        return self._logger.save_dir

    @property
    @override
    def group_separator(self) -> str:
        return self._logger.group_separator

    @property
    def experiment(self) -> Any:
        return self._logger.experiment

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        self._logger.log_metrics(dict(metrics), step=None if step is None else step + self.offset)

    @override
    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        # every experience's fit logs the module's hyperparameters again: pass each set on once
        key = repr((params, args, kwargs))
        if key in self._logged_hparams:
            return
        self._logged_hparams.add(key)
        self._logger.log_hyperparams(params, *args, **kwargs)

    @override
    def log_graph(self, model: nn.Module, input_array: Optional[Tensor] = None) -> None:
        self._logger.log_graph(model, input_array)

    @override
    def save(self) -> None:
        self._logger.save()

    @override
    def finalize(self, status: str) -> None:
        if status == "success":
            self._logger.save()
        else:
            self._logger.finalize(status)

    @override
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self._logger.after_save_checkpoint(checkpoint_callback)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_logger", "_logged_hparams"):
            raise AttributeError(name)
        return getattr(self._logger, name)


class _LogStreamConfig(Callback):
    """Logs the stream's configuration once, from the global-zero process, when the first fit sets up.

    Before the first ``fit`` a process cannot always tell its global rank (Lightning's own launcher
    on several nodes sets it while the strategy sets up), so the configuration waits until then,
    and a multi-node run still creates one logger run only.
    """

    def __init__(self) -> None:
        self.pending: Optional[tuple[list[Logger], dict[str, Any]]] = None

    @property
    @override
    def state_key(self) -> str:
        return "lightning_ssr.continual.stream._LogStreamConfig"

    def flush(self, is_global_zero: bool) -> None:
        if self.pending is None:
            return
        loggers, params = self.pending
        self.pending = None
        if is_global_zero:
            for lg in loggers:
                lg.log_hyperparams(params)

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self.flush(trainer.is_global_zero)


def _log_stream_result(logger: Logger, result: StreamResult) -> None:
    """W&B loggers get the accuracy matrix as a table and a heatmap, and the summary (wandb imported lazily)."""
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        from lightning_ssr.loggers import log_stream_result

        log_stream_result(logger, result)


@contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Raise Lightning's start-up chatter to WARNING while ``enabled``."""
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# -------------------------------------------------------------------------- optimizer state
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


def _seed_all(seed: int) -> None:
    """Seed torch (all devices), numpy and Python's ``random``, quietly."""
    random.seed(seed)
    torch.manual_seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed % 2**32)


# ------------------------------------------------------------------------------------ streams
def _dataset_of(item: Any, where: str) -> Dataset:
    """The dataset of an experience (``item.dataset``) or ``item`` itself when it is one."""
    ds = getattr(item, "dataset", item)
    if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
        raise TypeError(
            f"{where} must be an experience with a `.dataset` or a map-style Dataset, got {type(item).__name__}"
        )
    return ds


def _as_streams(benchmark: Any) -> tuple[list[Any], list[Any]]:
    if hasattr(benchmark, "train_stream") and hasattr(benchmark, "test_stream"):
        train, test = benchmark.train_stream, benchmark.test_stream
    elif isinstance(benchmark, (tuple, list)) and len(benchmark) == 2:
        train, test = benchmark
    else:
        raise TypeError(
            "`benchmark` must have `train_stream` and `test_stream` (an Avalanche benchmark or a "
            "lightning_ssr.data.ContinualBenchmark) or be a (train, test) pair of sequences of "
            f"experiences or datasets, got {type(benchmark).__name__}"
        )
    try:
        train, test = list(train), list(test)
    except TypeError as err:
        raise TypeError(f"`benchmark`'s train and test streams must be iterable, got {type(train).__name__}") from err
    if not train or not test:
        raise ValueError(
            f"`benchmark` must have non-empty streams, got {len(train)} train and {len(test)} test experiences"
        )
    if len(train) > len(test):
        raise ValueError(
            f"`benchmark` must have at least as many test experiences as training experiences (test "
            f"experience i belongs to training experience i), got {len(train)} train and {len(test)} test"
        )
    for i, item in enumerate(train):
        _dataset_of(item, f"training experience {i}")
    for j, item in enumerate(test):
        _dataset_of(item, f"test experience {j}")
    return train, test


def _phase(ds: Dataset, phase: str) -> Dataset:
    """An Avalanche dataset switched to its train or eval transforms (others unchanged)."""
    switch = getattr(ds, phase, None)
    if callable(switch) and callable(getattr(ds, "eval" if phase == "train" else "train", None)) \
            and not isinstance(ds, nn.Module):
        return switch()
    return ds


def _adapt(module: nn.Module, experiences: Sequence[Any]) -> None:
    """Avalanche's model adaptation (new heads, grown classifiers) for each experience, if any applies.

    Avalanche strategies adapt the model before training on an experience (in train mode) and
    before evaluating on one (in eval mode); the caller sets the mode.
    """
    dynamic = sys.modules.get("avalanche.models.dynamic_modules")
    if dynamic is None or not any(isinstance(m, dynamic.DynamicModule) for m in module.modules()):
        return
    for experience in experiences:
        if hasattr(experience, "dataset"):
            dynamic.avalanche_model_adaptation(module, experience)


class _Shard(torch.utils.data.Sampler):
    """Indices ``rank, rank + world, ...``: disjoint shards that cover the dataset exactly once."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = range(rank, n, world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ------------------------------------------------------------------------------- validation
def _check_loggers(logger: Any) -> list[Logger]:
    if logger is None or logger is False:
        return []
    items = [logger] if isinstance(logger, Logger) else logger
    if isinstance(items, (list, tuple)) and all(isinstance(lg, Logger) for lg in items):
        return list(items)
    raise TypeError(
        f"`logger` must be None, False, a lightning.pytorch Logger or a list of Loggers, got {logger!r}"
    )


@dataclass
class _Config:
    epochs: int
    batch_size: int
    eval_batch_size: int
    num_workers: int
    seed: Optional[int]


# ----------------------------------------------------------------------------------- runner
class StreamRunner:
    """Train a LightningModule on each experience of a stream and evaluate it on every test experience.

    Most users call :func:`fit_stream`, which builds a runner and calls :meth:`run`. The runner
    keeps the last ``Trainer`` (:attr:`trainer`) and the result (:attr:`result`).

    Args:
        module: the LightningModule; its ``predict_step(batch, batch_idx)`` must return logits
            ``[N, C]`` for a batch ``(x, y, task_labels)`` (see :class:`ClassifierModule`).
        benchmark: an object with ``train_stream`` and ``test_stream`` (an Avalanche benchmark,
            a :class:`~lightning_ssr.data.ContinualBenchmark`), or a ``(train, test)`` pair of
            sequences of experiences or map-style datasets. Test experience ``i`` must belong to
            training experience ``i``.
        callbacks: callbacks given to every experience's Trainer, the same objects each time.
            Default: ``()``.
        logger: a Lightning logger (or a list of them) used for the whole stream as one run, or
            ``None``/``False`` for none. Default: ``None``.
        epochs: epochs per experience, ``>= 1``. Default: ``1``.
        batch_size: training mini-batch size, ``>= 1``. Default: ``32``.
        eval_batch_size: evaluation mini-batch size, ``>= 1``. Default: ``None``
            (``max(batch_size, 256)``).
        num_workers: DataLoader worker processes. Default: ``0``.
        seed: seeds ``torch``, ``numpy`` and ``random`` with ``seed + i`` before experience ``i``
            (shuffling, dropout, new heads), so runs repeat exactly; ``None`` leaves them alone.
            Default: ``0``.
        trainer_kwargs: further ``lightning.pytorch.Trainer`` arguments (``accelerator``,
            ``devices``, ``strategy``, ``precision``, ``max_steps``, ...), applied over the lean
            defaults (no progress bar, model summary, checkpoint callback or sanity check).
            ``callbacks``, ``logger`` and ``max_epochs`` are refused: use ``callbacks``, ``logger``
            and ``epochs``. Default: ``None``.
        ckpt_dir: directory of the stream checkpoint written after each experience. Default:
            ``None`` (none written).
        resume: continue from the stream checkpoint in ``ckpt_dir`` when there is one (else start
            from the beginning). Default: ``False``.
        method: the method's name in the result. Default: ``None`` (the callbacks' class names
            joined by ``+``, or ``"naive"`` without callbacks).
        method_config: the method's hyperparameters for the result. Default: ``None`` (each
            callback's dataclass ``config`` attribute where it has one).
        optimizer_state: ``"carry"``: each experience's fresh optimizers (from
            ``configure_optimizers``) start from the previous experience's per-parameter state
            (Adam's moments and step, SGD's momentum), matched by parameter name, as Avalanche's
            strategies keep one optimizer across experiences; ``"reset"``: they start fresh.
            Default: ``"carry"``.
        verbose: keep Lightning's per-Trainer start-up messages after the first experience.
            Default: ``False``.

    Raises:
        TypeError / ValueError: for an invalid argument; the message names it, the allowed values
            and the value received.
    """

    def __init__(
        self,
        module: pl.LightningModule,
        benchmark: Any,
        *,
        callbacks: Sequence[Callback] = (),
        logger: Union[Logger, Sequence[Logger], None, bool] = None,
        epochs: int = 1,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: Optional[int] = 0,
        trainer_kwargs: Optional[Mapping[str, Any]] = None,
        ckpt_dir: Union[str, os.PathLike, None] = None,
        resume: bool = False,
        method: Optional[str] = None,
        method_config: Optional[Mapping[str, Any]] = None,
        optimizer_state: Literal["carry", "reset"] = "carry",
        verbose: bool = False,
    ) -> None:
        if not isinstance(module, pl.LightningModule):
            raise TypeError(
                f"`module` must be a lightning.pytorch.LightningModule (wrap a plain nn.Module in "
                f"ClassifierModule), got {type(module).__name__}"
            )
        self.train_stream, self.test_stream = _as_streams(benchmark)
        if isinstance(callbacks, Callback):
            callbacks = [callbacks]
        if not isinstance(callbacks, (list, tuple)):
            raise TypeError(
                f"`callbacks` must be a list of lightning.pytorch Callbacks, got {type(callbacks).__name__}"
            )
        for i, cb in enumerate(callbacks):
            if not isinstance(cb, Callback):
                raise TypeError(f"`callbacks[{i}]` must be a lightning.pytorch Callback, got {type(cb).__name__}")
        self.loggers = _check_loggers(logger)
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

        self.module = module
        self.callbacks = list(callbacks)
        self.cfg = _Config(epochs, batch_size, eval_batch_size or max(batch_size, 256), num_workers, seed)
        self.trainer_kwargs = dict(trainer_kwargs)
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
        self.resume = resume
        self.verbose = verbose
        self.optimizer_state = optimizer_state
        self._carry = _CarryOptimizerState() if optimizer_state == "carry" else None
        self.method = method or ("+".join(type(cb).__name__ for cb in self.callbacks) or "naive")
        self.method_config = dict(method_config) if method_config is not None else self._callback_configs()
        self.benchmark_info = {
            k: getattr(benchmark, k) for k in ("dataset", "protocol", "scenario", "n_tasks", "n_classes", "seed")
            if isinstance(getattr(benchmark, k, None), (str, int))
        }
        self._wrapped = [_StreamLogger(lg) for lg in self.loggers]
        self._log_config = _LogStreamConfig()
        self.trainer: Optional[pl.Trainer] = None
        self.result: Optional[StreamResult] = None

    # ------------------------------------------------------------------ helpers
    def _callback_configs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for cb in self.callbacks:
            cfg = getattr(cb, "config", None)
            if cfg is not None and hasattr(cfg, "__dataclass_fields__"):
                out[type(cb).__name__] = _jsonable(cfg)
        return out

    def _config(self) -> dict[str, Any]:
        return {
            "epochs": self.cfg.epochs,
            "batch_size": self.cfg.batch_size,
            "eval_batch_size": self.cfg.eval_batch_size,
            "num_workers": self.cfg.num_workers,
            "seed": self.cfg.seed,
            "optimizer_state": self.optimizer_state,
            "n_train_experiences": len(self.train_stream),
            "n_test_experiences": len(self.test_stream),
            "module": type(self.module).__name__,
            "hparams": _jsonable(dict(self.module.hparams)),
            "trainer_kwargs": _jsonable(self.trainer_kwargs),
            "benchmark": _jsonable(self.benchmark_info),
        }

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "epochs": self.cfg.epochs,
            "batch_size": self.cfg.batch_size,
            "seed": self.cfg.seed,
            "optimizer_state": self.optimizer_state,
            "n_train_experiences": len(self.train_stream),
            "n_test_experiences": len(self.test_stream),
        }

    def _extra_state_bytes(self) -> int:
        total = 0
        for cb in self.callbacks:
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

    def _make_trainer(self) -> pl.Trainer:
        kwargs = {**_LEAN_DEFAULTS, **self.trainer_kwargs}
        if self.ckpt_dir is not None:
            kwargs.setdefault("default_root_dir", os.fspath(self.ckpt_dir))
        return pl.Trainer(
            max_epochs=self.cfg.epochs, callbacks=self._all_callbacks(), logger=list(self._wrapped) or False, **kwargs
        )

    def _all_callbacks(self) -> list[Callback]:
        """The user's callbacks, after the optimizer-state carrier (which must load state first) and the
        configuration logger."""
        return ([self._carry] if self._carry is not None else []) + [self._log_config] + list(self.callbacks)

    def _train_loader(self, ds: Dataset, i: int, pin: bool) -> DataLoader:
        gen = None
        if self.cfg.seed is not None:
            gen = torch.Generator().manual_seed(self.cfg.seed + i)
        return DataLoader(
            ds, batch_size=self.cfg.batch_size, shuffle=True, num_workers=self.cfg.num_workers,
            collate_fn=getattr(ds, "collate_fn", None), generator=gen, pin_memory=pin,
        )

    # --------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer) -> tuple[list[int], list[int]]:
        """Evaluate the module on every test experience; counts summed across processes.

        Returns:
            The number of correct predictions and of samples for each test experience.
        """
        module = self.module
        device = trainer.strategy.root_device
        rank, world = trainer.global_rank, trainer.world_size
        if world > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError(
                f"fit_stream evaluates in the processes that train: with world_size={world} it needs the "
                "process group of a strategy that runs the script in every process (strategy='ddp'), "
                f"got {type(trainer.strategy).__name__} with no process group here (e.g. 'ddp_spawn')"
            )
        was_training = module.training
        module.eval()
        _adapt(module, self.test_stream)
        module.to(device)
        metric = ExperienceAccuracy(len(self.test_stream), sync_on_compute=False).to(device)
        context = trainer.precision_plugin.predict_step_context
        try:
            for j, exp in enumerate(self.test_stream):
                ds = _phase(_dataset_of(exp, f"test experience {j}"), "eval")
                loader = DataLoader(
                    ds, batch_size=self.cfg.eval_batch_size, sampler=_Shard(len(ds), rank, world),
                    num_workers=self.cfg.num_workers, collate_fn=getattr(ds, "collate_fn", None),
                    pin_memory=device.type == "cuda",
                )
                for batch_idx, batch in enumerate(loader):
                    batch = trainer.strategy.batch_to_device(batch, device)
                    with context():
                        logits = module.predict_step(batch, batch_idx)
                    if not isinstance(logits, Tensor) or logits.dim() != 2:
                        raise ValueError(
                            f"{type(module).__name__}.predict_step must return logits [N, C] for a batch "
                            f"(x, y, task_labels), got {type(logits).__name__}"
                            + (f" of shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else "")
                        )
                    metric.update(logits, unpack_batch(batch)[1], j)
            with metric.sync_context(should_sync=world > 1):
                correct, total = metric.correct.tolist(), metric.total.tolist()
        finally:
            module.train(was_training)
        return correct, total

    # --------------------------------------------------------------- checkpoints
    def _state_path(self) -> Optional[Path]:
        return self.ckpt_dir / _STATE_FILE if self.ckpt_dir is not None else None

    def _save(self, ckpt_dir: Path, trainer: pl.Trainer, i: int, rows: dict[str, list], offset: int,
              elapsed: float) -> None:
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
                "fingerprint": self._fingerprint(),
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

    def _restore(self) -> Optional[dict[str, Any]]:
        path = self._state_path()
        if path is None or not path.is_file():
            rank_zero_info(f"fit_stream: no stream checkpoint in {self.ckpt_dir}; starting from the first experience")
            return None
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"{path} has stream-checkpoint version {state.get('version')!r}, expected {_STATE_VERSION}"
            )
        expected = self._fingerprint()
        for key, value in state["fingerprint"].items():
            if expected.get(key) != value:
                raise ValueError(
                    f"`resume=True` found a stream checkpoint in {self.ckpt_dir} made with {key}={value!r}, "
                    f"but this run has {key}={expected.get(key)!r}"
                )
        completed = state["completed"]
        # rebuild what Avalanche's dynamic modules grew, then load the weights and callback states
        self.module.train()
        _adapt(self.module, self.train_stream[:completed])
        self.module.eval()
        _adapt(self.module, self.test_stream)
        self.module.train()
        ckpt = torch.load(self.ckpt_dir / state["checkpoint"], map_location="cpu", weights_only=False)
        self.module.on_load_checkpoint(ckpt)
        self.module.load_state_dict(ckpt["state_dict"])
        saved = ckpt.get("callbacks", {})
        for cb in self._all_callbacks():
            if cb.state_key in saved:
                cb.load_state_dict(saved[cb.state_key])
        _set_rng_state(state["rng"])
        rank_zero_info(f"fit_stream: resumed from {path} after {completed} of {len(self.train_stream)} experiences")
        return state

    # ---------------------------------------------------------------------- run
    def run(self, stop_after: Optional[int] = None) -> StreamResult:
        """Train and evaluate experience after experience; return the (possibly partial) result.

        Args:
            stop_after: stop once this many training experiences are finished (counting those
                restored by ``resume``), e.g. to resume later; ``None`` runs the whole stream.
                Default: ``None``.

        Returns:
            A :class:`~lightning_ssr.continual.StreamResult`; ``result.completed`` rows.
        """
        n_train = len(self.train_stream)
        check_int("stop_after", stop_after, 1, optional=True)
        if stop_after is not None and stop_after > n_train:
            raise ValueError(f"`stop_after` must be in [1, {n_train}] (the stream's experiences), got {stop_after}")
        start_time = time.perf_counter()
        rows: dict[str, list] = {"correct": [], "total": [], "train_time_s": [], "eval_time_s": []}
        offset, elapsed_before, start = 0, 0.0, 0
        if self.ckpt_dir is not None:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        if self.resume:
            state = self._restore()
            if state is not None:
                rows, offset = state["rows"], state["step_offset"]
                elapsed_before, start = state["elapsed_s"], state["completed"]
        if self.loggers:
            self._log_config.pending = (self.loggers, {"stream": self._config(), "method": self.method,
                                                       "method_config": _jsonable(self.method_config)})
        end = n_train if stop_after is None else stop_after
        for i in range(start, end):
            if self.cfg.seed is not None:
                _seed_all(self.cfg.seed + i)
            exp = self.train_stream[i]
            t0 = time.perf_counter()
            for wrapped in self._wrapped:
                wrapped.offset = offset
            self.module.train()
            _adapt(self.module, [exp])
            with _quiet(not self.verbose and i > 0):
                trainer = self._make_trainer()
                pin = trainer.strategy.root_device.type == "cuda"
                ds = _phase(_dataset_of(exp, f"training experience {i}"), "train")
                trainer.fit(self.module, train_dataloaders=self._train_loader(ds, i, pin))
            self.trainer = trainer
            t1 = time.perf_counter()
            correct, total = self.evaluate(trainer)
            t2 = time.perf_counter()
            loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
            offset += int(getattr(loop, "_batches_that_stepped", trainer.global_step))
            rows["correct"].append(correct)
            rows["total"].append(total)
            rows["train_time_s"].append(t1 - t0)
            rows["eval_time_s"].append(t2 - t1)
            self._log_row(i, rows, offset)
            if self.ckpt_dir is not None:
                self._save(self.ckpt_dir, trainer, i, rows, offset, elapsed_before + time.perf_counter() - start_time)
        self.result = self._result(rows, elapsed_before + time.perf_counter() - start_time)
        self._log_config.flush(rank_zero_only.rank == 0)  # when resumed after the last experience
        if end == n_train and rank_zero_only.rank == 0:
            for lg in self.loggers:
                _log_stream_result(lg, self.result)
                lg.finalize("success")
        return self.result

    def _log_row(self, i: int, rows: Mapping[str, list], step: int) -> None:
        if not self.loggers:
            return
        acc = _accuracy(rows)
        metrics = {f"stream/acc_exp{j}": v for j, v in enumerate(acc[-1])}
        metrics.update({
            "stream/experience": float(i),
            "stream/average_accuracy": average_accuracy(acc),
            "stream/average_accuracy_seen": average_accuracy(acc, seen_only=True),
            "stream/average_forgetting": average_forgetting(acc),
            "stream/backward_transfer": backward_transfer(acc),
            "stream/train_time_s": rows["train_time_s"][-1],
        })
        if rank_zero_only.rank == 0:
            for lg in self.loggers:
                lg.log_metrics(metrics, step=step)
                lg.save()

    def _result(self, rows: Mapping[str, list], wall: float) -> StreamResult:
        return StreamResult(
            method=self.method,
            accuracy=_accuracy(rows),
            correct=[list(r) for r in rows["correct"]],
            total=[list(r) for r in rows["total"]],
            n_experiences=len(self.train_stream),
            train_time_s=list(rows["train_time_s"]),
            eval_time_s=list(rows["eval_time_s"]),
            wall_time_s=wall,
            extra_state_bytes=self._extra_state_bytes(),
            config=self._config(),
            method_config=_jsonable(self.method_config),
        )


def _accuracy(rows: Mapping[str, list]) -> list[list[float]]:
    return [[c / t if t else math.nan for c, t in zip(cr, tr)] for cr, tr in zip(rows["correct"], rows["total"])]


def fit_stream(
    module: pl.LightningModule,
    benchmark: Any,
    *,
    callbacks: Sequence[Callback] = (),
    logger: Union[Logger, Sequence[Logger], None, bool] = None,
    epochs: int = 1,
    batch_size: int = 32,
    eval_batch_size: Optional[int] = None,
    num_workers: int = 0,
    seed: Optional[int] = 0,
    trainer_kwargs: Optional[Mapping[str, Any]] = None,
    ckpt_dir: Union[str, os.PathLike, None] = None,
    resume: bool = False,
    stop_after: Optional[int] = None,
    method: Optional[str] = None,
    method_config: Optional[Mapping[str, Any]] = None,
    optimizer_state: Literal["carry", "reset"] = "carry",
    verbose: bool = False,
) -> StreamResult:
    """Train ``module`` on each training experience in turn; evaluate on every test experience after each.

    One call runs a whole continual-learning stream through Lightning: a fresh lean ``Trainer``
    per experience with the same ``callbacks`` (their state carries over), one ``logger`` run for
    the whole stream with steps that only increase, the accuracy matrix exact under DDP, and
    optional checkpoints to resume from. Arguments are those of :class:`StreamRunner`, plus:

    Args:
        stop_after: stop once this many training experiences are finished (counting resumed
            ones); ``None`` runs the whole stream. Default: ``None``.

    Returns:
        A :class:`~lightning_ssr.continual.StreamResult` with the accuracy matrix, average
        accuracy, forgetting and backward transfer (as Avalanche defines them), timings and the
        configuration.

    Logged per experience (at the step reached after it): ``stream/acc_exp{j}`` for every test
    experience, ``stream/average_accuracy`` (all test experiences), ``stream/average_accuracy_seen``
    (those trained so far), ``stream/average_forgetting``, ``stream/backward_transfer``,
    ``stream/experience`` and ``stream/train_time_s``; plus whatever the module and callbacks log.
    Once, from the global-zero process when the first experience's Trainer is set up, the run's
    hyperparameters ``{"stream": ..., "method": ..., "method_config": ...}`` (the stream's settings
    and, e.g., the SSR configuration). At the end of the stream a Weights & Biases logger
    (``WandbLogger``) also gets the accuracy matrix as a ``wandb.Table`` and a heatmap and the
    summary numbers in the run's summary (:func:`lightning_ssr.loggers.log_stream_result`).

    Example:
        >>> from torch import nn
        >>> from lightning_ssr.continual import ClassifierModule
        >>> from lightning_ssr.data import make_benchmark
        >>> bench = make_benchmark("digits", "split", "domain", train_subset=64, test_subset=32)
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, bench.n_classes))
        >>> result = fit_stream(ClassifierModule(model, lr=0.01), bench, epochs=1, batch_size=16,
        ...                     trainer_kwargs={"accelerator": "cpu"})
        >>> result.matrix.shape, result.completed
        (torch.Size([5, 5]), 5)
        >>> 0.0 <= result.average_accuracy <= 1.0
        True
    """
    runner = StreamRunner(
        module, benchmark, callbacks=callbacks, logger=logger, epochs=epochs, batch_size=batch_size,
        eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed, trainer_kwargs=trainer_kwargs,
        ckpt_dir=ckpt_dir, resume=resume, method=method, method_config=method_config,
        optimizer_state=optimizer_state, verbose=verbose,
    )
    return runner.run(stop_after=stop_after)
