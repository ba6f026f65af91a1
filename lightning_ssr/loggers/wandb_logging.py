"""Weights & Biases loggers and callbacks: one run per continual-learning stream, and SSR histograms.

* :class:`SSRWandbHistograms`: a callback that logs, per tracked layer, histograms of each
  neuron's long-run activity, of activity minus set point, of the last scale factors and of the
  importance, from the global-zero process only.
* :class:`StreamWandbLogger`: Lightning's ``WandbLogger`` with :meth:`~StreamWandbLogger.finalize_stream`,
  which logs the result and finishes the run.
* :func:`wandb_logger_factory`: one W&B run per (scenario, method, seed) stream of
  ``lightning-ssr bench``, a Lightning logger for the stream runner and an Avalanche logger for
  Avalanche strategies.

``wandb`` (and Avalanche) are imported only when one of these is created. The module is not named
``wandb.py`` so that ``import wandb`` here and ``lightning_ssr.loggers.wandb`` elsewhere never
mean each other.

Example:
    >>> from lightning_ssr import SynapticScaling
    >>> ssr = SynapticScaling(scaling_rate=0.01)
    >>> SSRWandbHistograms(ssr, every_n_steps=20).every_n_steps
    20
"""

from __future__ import annotations

import os
import secrets
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lightning_ssr.callback import SynapticScaling
from lightning_ssr.loggers.stream import _require_wandb, log_stream_result

if TYPE_CHECKING:
    from lightning_ssr.continual.metrics import StreamResult

__all__ = ["LoggerFactory", "SSRWandbHistograms", "StreamWandbLogger", "wandb_logger_factory"]

#: What :func:`wandb_logger_factory` returns: ``factory(scenario, method, seed, meta) -> logger``.
LoggerFactory = Callable[[str, Any, int, dict[str, Any]], Any]


# ---------------------------------------------------------------------------- histograms
class SSRWandbHistograms(Callback):
    """Log histograms of every tracked layer's per-neuron SSR state to Weights & Biases.

    Every ``every_n_steps`` optimizer steps (and when each ``fit`` ends) the global-zero process
    logs, for each layer tracked by ``ssr``, ``ssr/<layer>/hist/activity`` (long-run activity),
    ``ssr/<layer>/hist/activity_minus_set_point``, ``ssr/<layer>/hist/factor`` (the last scale
    factors applied to the incoming weights) and ``ssr/<layer>/hist/importance`` (once a task has
    been consolidated), from :meth:`SynapticScaling.neuron_statistics`. The state is identical on
    every process under DDP, so nothing is reduced. It logs to every ``WandbLogger`` of the
    Trainer (also through :func:`~lightning_ssr.continual.fit_stream`, whose steps only
    increase over the stream) and does nothing without one.

    Args:
        ssr: the :class:`~lightning_ssr.SynapticScaling` callback whose state is logged.
            Default: ``None`` (the first ``SynapticScaling`` among the Trainer's callbacks).
        every_n_steps: optimizer steps between two logs, ``>= 1``. Default: ``50``.
        num_bins: bins per histogram, in ``[1, 512]`` (W&B's limit). Default: ``64``.

    Raises:
        TypeError / ValueError: for an invalid argument; at set-up, when no ``SynapticScaling``
            is found.

    Example::

        >>> from lightning_ssr import SynapticScaling
        >>> ssr = SynapticScaling(scaling_rate=0.01)
        >>> callbacks = [ssr, SSRWandbHistograms(ssr, every_n_steps=20)]
        >>> SSRWandbHistograms(every_n_steps=0)
        Traceback (most recent call last):
        ...
        ValueError: `every_n_steps` must be an int >= 1, got 0
    """

    def __init__(self, ssr: Optional[SynapticScaling] = None, every_n_steps: int = 50, num_bins: int = 64) -> None:
        super().__init__()
        if ssr is not None and not isinstance(ssr, SynapticScaling):
            raise TypeError(f"`ssr` must be a SynapticScaling callback or None, got {type(ssr).__name__}")
        for name, value, high in (("every_n_steps", every_n_steps, None), ("num_bins", num_bins, 512)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"`{name}` must be an int, got {value!r} of type {type(value).__name__}")
            if value < 1 or (high is not None and value > high):
                allowed = f"in [1, {high}]" if high is not None else ">= 1"
                raise ValueError(f"`{name}` must be an int {allowed}, got {value}")
        self.ssr = ssr
        self.every_n_steps = every_n_steps
        self.num_bins = num_bins
        self._last_step: Optional[int] = None

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit" or self.ssr is not None:
            return
        found = [cb for cb in trainer.callbacks if isinstance(cb, SynapticScaling)]
        if not found:
            raise ValueError(
                "SSRWandbHistograms needs a SynapticScaling callback: pass `ssr=` or add one to the Trainer's "
                f"callbacks, got callbacks {[type(cb).__name__ for cb in trainer.callbacks]}"
            )
        self.ssr = found[0]

    @staticmethod
    def _wandb_loggers(trainer: "pl.Trainer") -> list[Logger]:
        out = []
        for lg in trainer.loggers:
            inner = lg if isinstance(lg, WandbLogger) else getattr(lg, "logger", None)
            if isinstance(inner, WandbLogger):
                out.append(lg)  # the stream runner's wrapper keeps its step offset
        return out

    def log_histograms(self, trainer: "pl.Trainer") -> None:
        """Log the histograms now (global-zero process only). Users may override it to log more.

        Args:
            trainer: the Trainer whose ``WandbLogger`` loggers get the histograms.
        """
        if not trainer.is_global_zero or self.ssr is None or trainer.sanity_checking:
            return
        loggers = self._wandb_loggers(trainer)
        if not loggers:
            return
        wandb = _require_wandb()
        payload: dict[str, Any] = {}
        for layer, stats in self.ssr.neuron_statistics().items():
            for key, values in stats.items():
                if key == "set_point" or (key == "importance" and not bool(values.any())):
                    continue
                finite = values[torch.isfinite(values)]
                if finite.numel():
                    payload[f"ssr/{layer}/hist/{key}"] = wandb.Histogram(finite.numpy(), num_bins=self.num_bins)
        if payload:
            # the step Lightning logs this batch's metrics at (it counts the batch once it has logged)
            step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
            for lg in loggers:
                lg.log_metrics(payload, step=step)
        self._last_step = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.log_histograms(trainer)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.global_step != self._last_step:
            self.log_histograms(trainer)
        self._last_step = None  # the next experience's Trainer counts from 0 again


# ---------------------------------------------------------------------------- loggers
class StreamWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` for one continual-learning stream: :meth:`finalize_stream` ends the run.

    Give it to :func:`~lightning_ssr.continual.fit_stream` (one W&B run for the whole stream,
    never one per experience or per process: only the global-zero process creates the run).
    Every argument is ``WandbLogger``'s. To log offline, set ``WANDB_MODE=offline`` and leave
    ``offline=False``: W&B reads the variable itself (``offline=True`` rewrites ``WANDB_MODE`` for
    the whole process).

    Example::

        >>> logger = StreamWandbLogger(project="ssr", name="split-digits", save_dir="runs")  # doctest: +SKIP
        >>> result = fit_stream(module, bench, callbacks=[ssr], logger=logger)  # doctest: +SKIP
        >>> logger.finalize_stream(result)  # doctest: +SKIP
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _require_wandb()
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # wandb >= 0.22 warns about the key even when unset
            self._wandb_init.pop("anonymous", None)

    def finalize_stream(self, result: StreamResult) -> None:
        """Log ``result`` (unless the stream runner already did) and finish the W&B run.

        Args:
            result: the stream's result.
        """
        if rank_zero_only.rank != 0:
            return
        if not getattr(self, "_lightning_ssr_result_logged", False):
            log_stream_result(self, result)
        self.experiment.finish()
        self._experiment = None
        self._lightning_ssr_result_logged = False


def _avalanche_logger_class() -> type:
    """``avalanche.logging.WandBLogger`` with ``finalize_stream`` (built on first use: Avalanche is optional)."""
    global _AVALANCHE_CLASS
    if _AVALANCHE_CLASS is None:
        import numpy as np
        from avalanche.evaluation.metric_results import AlternativeValues, TensorImage
        from avalanche.logging import WandBLogger
        from matplotlib.figure import Figure
        from PIL.Image import Image

        class AvalancheStreamWandbLogger(WandBLogger):
            """Avalanche's ``WandBLogger`` whose ``finalize_stream(result)`` logs the result and finishes the run.

            It also runs with current ``wandb``: avalanche-lib 0.6 looks up ``wandb.viz.CustomChart``
            (now ``wandb.plot.CustomChart``) for every metric, and ``wandb.util.generate_id`` when
            no run id is given (the factory gives one).
            """

            def log_single_metric(self, name: str, value: Any, x_plot: int) -> None:
                plot = getattr(self.wandb, "plot", None)
                chart = getattr(plot, "CustomChart", None) or getattr(getattr(self.wandb, "viz", None),
                                                                      "CustomChart", float)
                self.step = x_plot
                if name.startswith("WeightCheckpoint"):
                    if self.log_artifacts:
                        self._log_checkpoint(name, value, x_plot)
                    return
                if isinstance(value, AlternativeValues):
                    value = value.best_supported_value(Image, torch.Tensor, TensorImage, Figure, float, int, chart)
                if isinstance(value, Image):
                    self.wandb.log({name: self.wandb.Image(value)}, step=self.step)
                elif isinstance(value, torch.Tensor):
                    hist = np.histogram(value.view(-1).numpy())
                    self.wandb.log({name: self.wandb.Histogram(np_histogram=hist)}, step=self.step)
                elif isinstance(value, (float, int, Figure, chart)):
                    self.wandb.log({name: value}, step=self.step)
                elif isinstance(value, TensorImage):
                    self.wandb.log({name: self.wandb.Image(np.array(value))}, step=self.step)

            def finalize_stream(self, result: StreamResult) -> None:
                log_stream_result(self.wandb.run, result)
                self.wandb.run.finish()

        _AVALANCHE_CLASS = AvalancheStreamWandbLogger
    return _AVALANCHE_CLASS


_AVALANCHE_CLASS: Optional[type] = None


def _run_id() -> str:
    """A fresh W&B run id: 8 lowercase letters and digits, as W&B makes them."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _is_main_process() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return rank_zero_only.rank == 0


def wandb_logger_factory(project: str, out_dir: Union[str, os.PathLike], **init_kwargs: Any) -> LoggerFactory:
    """One W&B run per (scenario, method, seed) stream of ``lightning-ssr bench``.

    The factory returns, for a method run by the Lightning stream runner, a
    :class:`StreamWandbLogger`; for an Avalanche strategy, Avalanche's ``WandBLogger`` (created only
    on the main process; ``None`` elsewhere). Both are named ``"{scenario}-{method}-s{seed}"``,
    grouped by scenario, tagged with the runner, have ``meta`` as their config, write under
    ``out_dir/wandb`` and have ``finalize_stream(result)``, which logs the accuracy matrix as a
    table and a heatmap and the summary (see :func:`~lightning_ssr.loggers.log_stream_result`)
    and finishes the run. W&B's own settings apply: ``WANDB_MODE=offline`` writes runs to disk only.

    Args:
        project: the W&B project.
        out_dir: directory under which W&B writes (``out_dir/wandb``); created if missing.
        **init_kwargs: further ``wandb.init`` arguments (``entity``, ``tags``, ``mode``, ...).

    Returns:
        ``factory(scenario, method, seed, meta)``, where ``method`` has ``name`` and ``runner``
        (``"lightning"`` or ``"avalanche"``), as :func:`lightning_ssr.bench.run_bench` calls it.

    Raises:
        TypeError / ValueError: for an empty project or a bad directory; from the factory, for a
            ``method.runner`` other than ``"lightning"``/``"avalanche"``.

    Example::

        >>> from lightning_ssr.bench import BenchOptions, run_bench
        >>> factory = wandb_logger_factory("lightning-ssr", "bench_results")  # doctest: +SKIP
        >>> run_bench(BenchOptions(methods="ssr,ewc"), logger_factory=factory)  # doctest: +SKIP
        >>> wandb_logger_factory("", "bench_results")
        Traceback (most recent call last):
        ...
        ValueError: `project` must be a non-empty string, got ''
    """
    if not isinstance(project, str) or not project.strip():
        raise ValueError(f"`project` must be a non-empty string, got {project!r}")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"`out_dir` must be a path, got {out_dir!r}")
    _require_wandb()
    save_dir = Path(out_dir)

    def factory(scenario: str, method: Any, seed: int, meta: dict[str, Any]) -> Any:
        runner = getattr(method, "runner", None)
        name = f"{scenario}-{getattr(method, 'name', method)}-s{seed}"
        save_dir.mkdir(parents=True, exist_ok=True)
        kwargs = {"group": scenario, "tags": ["lightning-ssr", str(runner)], "job_type": str(runner), **init_kwargs}
        if runner == "lightning":
            return StreamWandbLogger(project=project, name=name, save_dir=os.fspath(save_dir), config=dict(meta),
                                     **kwargs)
        if runner == "avalanche":
            if not _is_main_process():
                return None
            cls = _avalanche_logger_class()
            # an id of our own: avalanche-lib 0.6 asks `wandb.util.generate_id`, which wandb >= 0.19 lacks
            kwargs.setdefault("id", _run_id())
            return cls(project_name=project, run_name=name, dir=os.fspath(save_dir), config=dict(meta),
                       save_code=False, params=kwargs)
        raise ValueError(f"`method.runner` must be 'lightning' or 'avalanche', got {runner!r}")

    return factory
