"""Weights & Biases for continual-learning streams: one run per stream, SSR histograms, offline read-back.

``wandb`` is imported only when one of these functions or classes is used, so the core, the
callback and the stream runner never need it.

* :func:`log_stream_result`: the accuracy matrix of a finished stream as a ``wandb.Table`` and a
  heatmap (``wandb.Image``), and the summary numbers (``stream/average_accuracy``, ...) in the
  run's summary. :func:`~lightning_ssr.continual.fit_stream` calls it for every
  ``WandbLogger`` at the end of the stream.
* :class:`SSRWandbHistograms`: a callback that logs, per tracked layer, histograms of each
  neuron's long-run activity, of activity minus set point, of the last scale factors and of the
  importance, from the global-zero process only.
* :class:`StreamWandbLogger`: Lightning's ``WandbLogger`` with :meth:`~StreamWandbLogger.finalize_stream`,
  which logs the result and finishes the run.
* :func:`wandb_logger_factory`: one W&B run per (scenario, method, seed) stream of
  ``lightning-ssr bench``, a Lightning logger for the stream runner and an Avalanche logger for
  Avalanche strategies.
* :func:`read_wandb_run`: what a run wrote, read back from its ``.wandb`` file (offline runs
  have no ``wandb-summary.json`` or ``config.yaml``, and ``wandb.Api`` needs the server).

Offline: set ``WANDB_MODE=offline``; runs go to ``<save_dir>/wandb/offline-run-*`` and can be
uploaded later with ``wandb sync <run dir>``.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lightning_ssr.callback import SynapticScaling
from lightning_ssr.continual.metrics import StreamResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "SSRWandbHistograms",
    "StreamWandbLogger",
    "WandbRun",
    "accuracy_heatmap",
    "log_stream_result",
    "read_wandb_run",
    "wandb_logger_factory",
]

#: What :func:`wandb_logger_factory` returns: ``factory(scenario, method, seed, meta) -> logger``.
LoggerFactory = Callable[[str, Any, int, dict[str, Any]], Any]


def _require_wandb() -> Any:
    try:
        import wandb
    except ImportError as err:  # pragma: no cover - wandb is installed in the test environment
        raise ImportError(
            "Weights & Biases logging needs the `wandb` package: pip install wandb (or lightning-ssr[wandb])"
        ) from err
    return wandb


def _run_of(target: Any) -> Any:
    """The ``wandb`` run behind a Lightning ``WandbLogger`` (or the stream runner's wrapper of one), or a run."""
    inner = getattr(target, "logger", None) if not isinstance(target, WandbLogger) else None
    if isinstance(inner, WandbLogger):  # fit_stream's step-offsetting wrapper
        target = inner
    if isinstance(target, WandbLogger):
        return target.experiment
    if callable(getattr(target, "log", None)) and hasattr(target, "summary"):
        return target
    raise TypeError(
        f"`logger` must be a lightning.pytorch WandbLogger or a wandb Run, got {type(target).__name__}"
    )


# ---------------------------------------------------------------------------- the result
def accuracy_heatmap(result: StreamResult, title: Optional[str] = None) -> "Figure":
    """The accuracy matrix as an annotated heatmap (a matplotlib ``Figure``, not registered with pyplot).

    Args:
        result: a (possibly partial) stream result.
        title: the figure's title. Default: ``None`` (``"<method>: accuracy %"``).

    Returns:
        A ``matplotlib.figure.Figure``: rows are the training experiences, columns the test
        experiences, values in percent.

    Example:
        >>> from lightning_ssr.continual import StreamResult
        >>> fig = accuracy_heatmap(StreamResult("ssr", accuracy=[[0.9, 0.1], [0.6, 0.8]], n_experiences=2))
        >>> fig.axes[0].get_xlabel()
        'test experience'
    """
    if not isinstance(result, StreamResult):
        raise TypeError(f"`result` must be a StreamResult, got {type(result).__name__}")
    from matplotlib.figure import Figure

    mat = 100 * result.matrix.numpy()
    rows, cols = mat.shape if mat.ndim == 2 else (0, 0)
    fig = Figure(figsize=(1.2 + 0.6 * max(cols, 2), 1.0 + 0.5 * max(rows, 2)), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(mat if rows else [[math.nan]], vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for i in range(rows):
        for j in range(cols):
            if math.isfinite(mat[i, j]):
                ax.text(j, i, f"{mat[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if mat[i, j] < 60 else "black")
    ax.set_xlabel("test experience")
    ax.set_ylabel("after training experience")
    ax.set_title(title if title is not None else f"{result.method}: accuracy %", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def _finite_or_none(value: float) -> Optional[float]:
    return float(value) if math.isfinite(value) else None


def log_stream_result(logger: Any, result: StreamResult, *, prefix: str = "stream") -> None:
    """Log a stream's accuracy matrix as a ``wandb.Table`` and a heatmap image, and its summary.

    Logged: ``<prefix>/accuracy_matrix`` (a table: one row per finished training experience,
    a column ``acc_exp{j}`` per test experience), ``<prefix>/accuracy_heatmap`` (an image of
    :func:`accuracy_heatmap`); the run's summary gets ``<prefix>/average_accuracy``,
    ``average_forgetting``, ``backward_transfer``, ``stream_accuracy``, ``wall_time_s``,
    ``extra_state_bytes`` and ``completed``. Only the global-zero process logs.

    Args:
        logger: a Lightning ``WandbLogger`` or a ``wandb`` run.
        result: the stream's result.
        prefix: the keys' prefix. Default: ``"stream"``.

    Raises:
        TypeError: when ``logger`` is neither a ``WandbLogger`` nor a run, or ``result`` is not a
            :class:`~lightning_ssr.continual.StreamResult`.

    Example::

        >>> from lightning.pytorch.loggers import WandbLogger
        >>> result = fit_stream(module, bench, logger=WandbLogger(project="ssr"))  # doctest: +SKIP
        >>> log_stream_result(other_logger, result)  # doctest: +SKIP
    """
    if not isinstance(result, StreamResult):
        raise TypeError(f"`result` must be a StreamResult, got {type(result).__name__}")
    if rank_zero_only.rank != 0:
        return
    run = _run_of(logger)
    wandb = _require_wandb()
    n_cols = len(result.accuracy[0]) if result.accuracy else result.n_experiences
    table = wandb.Table(
        columns=["after_experience", *(f"acc_exp{j}" for j in range(n_cols))],
        data=[[i, *(_finite_or_none(v) for v in row)] for i, row in enumerate(result.accuracy)],
    )
    fig = accuracy_heatmap(result)
    run.log({f"{prefix}/accuracy_matrix": table, f"{prefix}/accuracy_heatmap": wandb.Image(fig)})
    summary = {f"{prefix}/{k}": v for k, v in result.summary().items() if math.isfinite(v)}
    summary[f"{prefix}/extra_state_bytes"] = result.extra_state_bytes
    summary[f"{prefix}/completed"] = result.completed
    run.summary.update(summary)
    if isinstance(logger, Logger):  # so that StreamWandbLogger.finalize_stream does not log it twice
        logger._lightning_ssr_result_logged = True  # type: ignore[attr-defined]


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
        """Log the histograms now (global-zero process only). Users may override it to log more."""
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
    table and a heatmap and the summary (see :func:`log_stream_result`) and finishes the run.
    W&B's own settings apply: ``WANDB_MODE=offline`` writes runs to disk only.

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


# ---------------------------------------------------------------------------- reading back
#: The ``.wandb`` file: a 7-byte header, then LevelDB-log records in 32 KiB blocks.
_HEADER = struct.Struct("<4sHB")
_RECORD = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class WandbRun:
    """What one W&B run wrote, as read back by :func:`read_wandb_run`.

    Attributes:
        path: the ``.wandb`` file.
        run_id / name / project / group: the run's identity.
        config: the final config (``wandb.init(config=...)`` and every later update).
        history: one dict per ``log`` call, in order (histograms, tables and images as the dicts
            W&B stores for them, e.g. ``{"_type": "histogram", "bins": [...], "values": [...]}``).
        summary: the final summary.
        finished: whether the run's exit record was read (the file is complete).
    """

    path: Path
    run_id: str = ""
    name: str = ""
    project: str = ""
    group: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    finished: bool = False

    def values(self, key: str) -> list[Any]:
        """Every value logged under ``key``, in order."""
        return [row[key] for row in self.history if key in row]


def _records(path: Path) -> Any:
    data = path.read_bytes()
    if len(data) < _HEADER.size:
        raise ValueError(f"{path} is not a W&B run file: {len(data)} bytes, shorter than its header")
    ident, magic, _version = _HEADER.unpack_from(data)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B run file: header {ident!r}/{magic:#x}, expected b':W&B'/0xbee1")
    pos, chunks = _HEADER.size, []
    while pos + _RECORD.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _RECORD.size:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        crc, length, kind = _RECORD.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero fill: the rest of the block is unused
            pos += left
            continue
        payload = data[pos + _RECORD.size: pos + _RECORD.size + length]
        if len(payload) < length:
            break  # a record cut short by a process still writing
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: checksum mismatch in the record at byte {pos}")
        pos += _RECORD.size + length
        chunks.append(payload)
        if kind in (_FULL, _LAST):
            yield b"".join(chunks)
            chunks = []


def _put(target: dict[str, Any], item: Any) -> None:
    """Set an item of a record: ``key``, or ``nested_key`` (the path of a logged dict, e.g. a histogram's fields)."""
    path = [item.key] if item.key else list(item.nested_key)
    for part in path[:-1]:
        nested = target.get(part)
        if not isinstance(nested, dict):
            nested = target[part] = {}
        target = nested
    target[path[-1]] = json.loads(item.value_json)


def _pop(target: dict[str, Any], item: Any) -> None:
    path = [item.key] if item.key else list(item.nested_key)
    for part in path[:-1]:
        target = target.get(part, {})
    if isinstance(target, dict):
        target.pop(path[-1], None)


def _parse(path: Path) -> WandbRun:
    from wandb.proto import wandb_internal_pb2 as pb

    out = WandbRun(path=path)
    for raw in _records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":  # the first holds everything; later ones (updates) may leave fields empty
            out.run_id = rec.run.run_id or out.run_id
            out.name = rec.run.display_name or out.name
            out.project = rec.run.project or out.project
            out.group = rec.run.run_group or out.group
            for i in rec.run.config.update:
                _put(out.config, i)
        elif kind == "config":
            for i in rec.config.update:
                _put(out.config, i)
            for i in rec.config.remove:
                _pop(out.config, i)
        elif kind == "history":
            row: dict[str, Any] = {}
            for i in rec.history.item:
                _put(row, i)
            out.history.append(row)
        elif kind == "summary":
            for i in rec.summary.update:
                _put(out.summary, i)
            for i in rec.summary.remove:
                _pop(out.summary, i)
        elif kind == "exit":
            out.finished = True
    out.config.pop("_wandb", None)
    return out


def read_wandb_run(path: Union[str, os.PathLike], *, wait: float = 10.0) -> WandbRun:
    """Read a W&B run's config, history and summary back from its ``.wandb`` file, offline.

    Offline runs (``WANDB_MODE=offline``) keep everything in ``run-<id>.wandb`` (wandb 0.31 writes
    no ``wandb-summary.json`` or ``config.yaml`` for them, and ``wandb.Api`` needs the server).
    That file is the transaction log that ``wandb sync`` uploads: a ``:W&B`` header, then
    LevelDB-log records (32 KiB blocks, CRC-32 checked) that each hold a
    ``wandb.proto.wandb_internal_pb2.Record``. This reads the run, config, history, summary and
    exit records of it, and works on online runs' files as well.

    W&B's service process writes the file asynchronously: right after ``run.finish()`` (or after
    the training process exited) it may still hold only part of the run. A finished run's file
    ends with its exit record, so this waits up to ``wait`` seconds for that record.

    Args:
        path: the ``.wandb`` file or the run directory that holds one
            (``.../wandb/offline-run-<time>-<id>``).
        wait: seconds to wait for the run's exit record; ``0`` reads what is there now (a run in
            progress). Default: ``10.0``.

    Returns:
        A :class:`WandbRun`; ``finished`` tells whether the exit record was read.

    Raises:
        FileNotFoundError: when there is no ``.wandb`` file at ``path``.
        ValueError: when the file is not a W&B run file or a record is corrupt, or ``wait`` is negative.

    Example::

        >>> run_dir = next(Path("runs/wandb").glob("offline-run-*"))  # doctest: +SKIP
        >>> run = read_wandb_run(run_dir)  # doctest: +SKIP
        >>> run.finished, run.summary["stream/average_accuracy"], run.config["method"]  # doctest: +SKIP
        (True, 0.83, 'SynapticScaling')
    """
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not wait >= 0:
        raise ValueError(f"`wait` must be a number of seconds >= 0, got {wait!r}")
    _require_wandb()
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.wandb"))
        if len(files) != 1:
            raise FileNotFoundError(
                f"`path` must be a W&B run directory with one .wandb file, got {p} with {len(files)}"
            )
        p = files[0]
    if not p.is_file():
        raise FileNotFoundError(f"`path` must be a .wandb file or a run directory, got {p} (not found)")
    deadline = time.monotonic() + wait
    while True:
        out = _parse(p)
        if out.finished or time.monotonic() >= deadline:
            return out
        time.sleep(0.05)
