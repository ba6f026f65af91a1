"""Logger plumbing for a stream: one logger run across the Trainers of all experiences.

* :class:`_StreamLogger` wraps a Lightning logger so that the steps each experience's Trainer logs
  are shifted by the steps of the experiences before (they only ever increase), and the wrapped
  logger is finalized once, by the runner, at the end of the stream.
* :class:`_LogStreamConfig` logs the stream's configuration once, from the global-zero process.
* :func:`_log_stream_result` hands the final result to a W&B logger; :func:`_check_loggers`
  checks the ``logger`` argument; :func:`_quiet` silences Lightning's per-Trainer start-up chatter.

Example:
    >>> from lightning.pytorch.loggers import CSVLogger
    >>> logger = CSVLogger("logs")
    >>> _check_loggers(None), _check_loggers(logger) == [logger]
    ([], True)
    >>> wrapped = _StreamLogger(logger)
    >>> wrapped.offset = 10  # log_metrics(..., step=s) reaches the CSV logger at step s + 10
    >>> wrapped.name == logger.name
    True
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from typing_extensions import override

from lightning_ssr.continual.metrics import StreamResult

__all__ = ["_LogStreamConfig", "_StreamLogger", "_check_loggers", "_log_stream_result", "_quiet"]

#: Loggers whose start-up messages (devices available, tips) repeat with every Trainer.
_CHATTY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                   "lightning.fabric.utilities.seed")


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
        # The key under which checkpoints hold this callback's state: the class's old import path
        # (it lived in ``lightning_ssr/continual/stream.py``), kept so that older checkpoints still load.
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



def _check_loggers(logger: Any) -> list[Logger]:
    """The ``logger`` argument as a list: ``[]`` for ``None``/``False``, else the Logger(s) given."""
    if logger is None or logger is False:
        return []
    items = [logger] if isinstance(logger, Logger) else logger
    if isinstance(items, (list, tuple)) and all(isinstance(lg, Logger) for lg in items):
        return list(items)
    raise TypeError(
        f"`logger` must be None, False, a lightning.pytorch Logger or a list of Loggers, got {logger!r}"
    )
