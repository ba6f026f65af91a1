"""Run a LightningModule through a continual-learning stream: train, evaluate, log, checkpoint, resume.

For each training experience :class:`StreamRunner` builds a fresh, lean ``Trainer`` with the
*same* callback objects (so the state of a callback such as
:class:`~lightning_ssr.callback.SynapticScaling` carries from task to task), fits the module on
that experience, then evaluates it on every test experience and fills one row of the accuracy
matrix. One logger run spans the whole stream: the logger is wrapped so that the steps Lightning
logs are offset by the steps of the experiences before, and only ever increase.

The runner composes the package's other modules, each with one job:
:mod:`~lightning_ssr.continual.streams` (experiences, datasets, Avalanche's model adaptation),
:mod:`~lightning_ssr.continual.settings` (argument checks, configuration, fingerprint),
:mod:`~lightning_ssr.continual.evaluation` (the evaluation loop, exact under DDP, and the rows of
the accuracy matrix), :mod:`~lightning_ssr.continual.stream_logging` (one logger run across the
Trainers) and :mod:`~lightning_ssr.continual.checkpointing` (stream checkpoints, optimizer state
carried across experiences, random-number generators).

With ``ckpt_dir`` a stream checkpoint is written after each experience: a Lightning checkpoint of
the module and every callback's ``state_dict()``, and ``stream.pt`` with the partial accuracy
matrix, timings, the logger's step offset and the random-number generators' states. With
``resume=True`` the run continues after the last finished experience and gives the same result as
a run that never stopped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from lightning_ssr.continual.checkpointing import _CarryOptimizerState, _restore, _save
from lightning_ssr.continual.seeding import seed_stream, stream_seed
from lightning_ssr.continual.evaluation import _evaluate, _log_row, _stream_result
from lightning_ssr.continual.metrics import StreamResult, _jsonable
from lightning_ssr.continual.settings import (
    _callback_configs,
    _check_callbacks,
    _check_module,
    _check_settings,
    _Config,
    _extra_state_bytes,
    _stream_config,
    _stream_fingerprint,
)
from lightning_ssr.continual.stream_logging import (
    _check_loggers,
    _log_stream_result,
    _LogStreamConfig,
    _quiet,
    _StreamLogger,
)
from lightning_ssr.continual.streams import _adapt, _as_streams, _dataset_of, _phase
from lightning_ssr.core.validation import check_int

__all__ = ["StreamRunner", "fit_stream"]

#: Lean defaults: no progress bar, summary, checkpoint callback or sanity check per experience.
_LEAN_DEFAULTS: dict[str, Any] = {
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "num_sanity_val_steps": 0,
}


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
        seed: before experience ``i``, seeds ``torch``, ``numpy`` and ``random`` (new heads,
            dropout), the shuffling generator and, before the evaluation after it, the global
            generators again, from independent streams of
            :func:`~lightning_ssr.continual.stream_seed` (``"train"``, ``"data"`` and ``"eval"``,
            experience ``i``), so runs repeat exactly and no two (seed, experience) pairs share random
            numbers; ``None`` leaves them alone.
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
        _check_module(module)
        self.train_stream, self.test_stream = _as_streams(benchmark)
        callbacks = _check_callbacks(callbacks)
        self.loggers = _check_loggers(logger)
        trainer_kwargs = _check_settings(epochs, batch_size, eval_batch_size, num_workers, seed, trainer_kwargs, resume,
                                         ckpt_dir, method, method_config, optimizer_state)

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
        self.method_config = dict(method_config) if method_config is not None else _callback_configs(self.callbacks)
        self.benchmark_info = {
            k: getattr(benchmark, k) for k in ("dataset", "protocol", "scenario", "n_tasks", "n_classes", "seed")
            if isinstance(getattr(benchmark, k, None), (str, int))
        }
        self._wrapped = [_StreamLogger(lg) for lg in self.loggers]
        self._log_config = _LogStreamConfig()
        self.trainer: Optional[pl.Trainer] = None
        self.result: Optional[StreamResult] = None

    # ------------------------------------------------------------------ helpers
    def _config(self) -> dict[str, Any]:
        return _stream_config(self.cfg, self.optimizer_state, len(self.train_stream), len(self.test_stream),
                              self.module, self.trainer_kwargs, self.benchmark_info)

    def _fingerprint(self) -> dict[str, Any]:
        return _stream_fingerprint(self.cfg, self.optimizer_state, len(self.train_stream), len(self.test_stream))

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
            gen = torch.Generator().manual_seed(stream_seed(self.cfg.seed, "data", i))
        return DataLoader(
            ds, batch_size=self.cfg.batch_size, shuffle=True, num_workers=self.cfg.num_workers,
            collate_fn=getattr(ds, "collate_fn", None), generator=gen, pin_memory=pin,
        )

    # --------------------------------------------------------------- evaluation
    def evaluate(self, trainer: pl.Trainer) -> tuple[list[int], list[int]]:
        """Evaluate the module on every test experience; counts summed across processes.

        Returns:
            The number of correct predictions and of samples for each test experience.
        """
        return _evaluate(self.module, self.test_stream, trainer, self.cfg.eval_batch_size, self.cfg.num_workers)

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
        rows: dict[str, list] = {"correct": [], "total": [], "train_time_s": [], "train_cpu_s": [], "eval_time_s": []}
        offset, elapsed_before, start = 0, 0.0, 0
        if self.ckpt_dir is not None:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        if self.resume:
            state = _restore(self.ckpt_dir, self.module, self.train_stream, self.test_stream, self._all_callbacks(),
                             self._fingerprint())
            if state is not None:
                rows, offset = state["rows"], state["step_offset"]
                elapsed_before, start = state["elapsed_s"], state["completed"]
        if self.loggers:
            self._log_config.pending = (self.loggers, {"stream": self._config(), "method": self.method,
                                                       "method_config": _jsonable(self.method_config)})
        end = n_train if stop_after is None else stop_after
        for i in range(start, end):
            if self.cfg.seed is not None:
                seed_stream(self.cfg.seed, "train", i)
            exp = self.train_stream[i]
            t0, cpu0 = time.perf_counter(), time.process_time()
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
            t1, cpu1 = time.perf_counter(), time.process_time()
            if self.cfg.seed is not None:
                seed_stream(self.cfg.seed, "eval", i)
            correct, total = self.evaluate(trainer)
            t2 = time.perf_counter()
            loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
            offset += int(getattr(loop, "_batches_that_stepped", trainer.global_step))
            rows["correct"].append(correct)
            rows["total"].append(total)
            rows["train_time_s"].append(t1 - t0)
            rows.setdefault("train_cpu_s", []).append(cpu1 - cpu0)  # absent from older checkpoints
            rows["eval_time_s"].append(t2 - t1)
            _log_row(self.loggers, i, rows, offset)
            if self.ckpt_dir is not None:
                _save(self.ckpt_dir, trainer, i, rows, offset, elapsed_before + time.perf_counter() - start_time,
                      self._fingerprint())
        self.result = self._result(rows, elapsed_before + time.perf_counter() - start_time)
        self._log_config.flush(rank_zero_only.rank == 0)  # when resumed after the last experience
        if end == n_train and rank_zero_only.rank == 0:
            for lg in self.loggers:
                _log_stream_result(lg, self.result)
                lg.finalize("success")
        return self.result

    def _result(self, rows: Mapping[str, list], wall: float) -> StreamResult:
        return _stream_result(
            rows, wall, method=self.method, n_experiences=len(self.train_stream),
            extra_state_bytes=_extra_state_bytes(self.callbacks), config=self._config(),
            method_config=_jsonable(self.method_config),
        )


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
    ``stream/plasticity``, ``stream/experience`` and ``stream/train_time_s``; plus whatever the module and callbacks log.
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
