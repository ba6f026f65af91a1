"""A finished stream's result for any W&B run: the accuracy matrix as a table and a heatmap, and the summary.

Nothing here depends on how the run was created (Lightning's ``WandbLogger``, the stream runner's
wrapper of one, Avalanche's ``WandBLogger`` or a bare ``wandb`` run), and nothing imports
:mod:`lightning_ssr.continual`: a result is recognised by its attributes
(:class:`StreamResultLike`), so the loggers stay below the stream runner that calls them.
``wandb`` and ``matplotlib`` are imported only when used.

Example:
    >>> from lightning_ssr.continual import StreamResult
    >>> result = StreamResult("ssr", accuracy=[[0.9, 0.1], [0.6, 0.8]], n_experiences=2)
    >>> isinstance(result, StreamResultLike), isinstance([[0.9]], StreamResultLike)
    (True, False)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Protocol, runtime_checkable

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import Tensor

    from lightning_ssr.continual.metrics import StreamResult

__all__ = ["StreamResultLike", "accuracy_heatmap", "log_stream_result"]


@runtime_checkable
class StreamResultLike(Protocol):
    """What this package reads of a :class:`~lightning_ssr.continual.StreamResult` (checked at run time).

    Example:
        >>> from lightning_ssr.continual import StreamResult
        >>> isinstance(StreamResult("naive", accuracy=[[0.5]], n_experiences=1), StreamResultLike)
        True
    """

    method: str
    accuracy: list[list[float]]
    n_experiences: int
    extra_state_bytes: int

    @property
    def matrix(self) -> Tensor: ...  # noqa: D102

    @property
    def completed(self) -> int: ...  # noqa: D102

    def summary(self) -> dict[str, float]: ...  # noqa: D102


def _check_result(result: Any) -> None:
    if not isinstance(result, StreamResultLike):
        raise TypeError(f"`result` must be a StreamResult, got {type(result).__name__}")


def _require_wandb() -> Any:
    """``import wandb``, or an ``ImportError`` that says how to install it."""
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


def accuracy_heatmap(result: StreamResult, title: Optional[str] = None) -> Figure:
    """The accuracy matrix as an annotated heatmap (a matplotlib ``Figure``, not registered with pyplot).

    Args:
        result: a (possibly partial) stream result.
        title: the figure's title. Default: ``None`` (``"<method>: accuracy %"``).

    Returns:
        A ``matplotlib.figure.Figure``: rows are the training experiences, columns the test
        experiences, values in percent.

    Raises:
        TypeError: when ``result`` is not a :class:`~lightning_ssr.continual.StreamResult`.

    Example:
        >>> from lightning_ssr.continual import StreamResult
        >>> fig = accuracy_heatmap(StreamResult("ssr", accuracy=[[0.9, 0.1], [0.6, 0.8]], n_experiences=2))
        >>> fig.axes[0].get_xlabel(), fig.axes[0].get_title()
        ('test experience', 'ssr: accuracy %')
    """
    _check_result(result)
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
    :func:`~lightning_ssr.continual.fit_stream` calls it for every ``WandbLogger`` at the end of
    the stream.

    Args:
        logger: a Lightning ``WandbLogger`` (or the stream runner's wrapper of one) or a ``wandb``
            run (anything with ``log`` and ``summary``).
        result: the stream's result.
        prefix: the keys' prefix. Default: ``"stream"``.

    Raises:
        TypeError: when ``logger`` is neither a ``WandbLogger`` nor a run, or ``result`` is not a
            :class:`~lightning_ssr.continual.StreamResult`.

    Example:
        >>> from lightning_ssr.continual import StreamResult
        >>> class Run:  # what is used of a wandb run, e.g. ``wandb.run``
        ...     def __init__(self) -> None:
        ...         self.logged, self.summary = {}, {}
        ...     def log(self, data: dict) -> None:
        ...         self.logged.update(data)
        >>> run = Run()
        >>> log_stream_result(run, StreamResult("ssr", accuracy=[[0.9, 0.1], [0.6, 0.8]], n_experiences=2))
        >>> sorted(run.logged)
        ['stream/accuracy_heatmap', 'stream/accuracy_matrix']
        >>> run.logged["stream/accuracy_matrix"].columns
        ['after_experience', 'acc_exp0', 'acc_exp1']
        >>> run.summary["stream/average_accuracy"], run.summary["stream/completed"]
        (0.7, 2)
    """
    _check_result(result)
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
