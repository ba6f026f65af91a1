"""Weights & Biases for continual-learning streams: one run per stream, SSR histograms, offline read-back.

``wandb`` is imported only when one of these functions or classes is used, so the core, the
callback and the stream runner never need it. The modules, by what they talk to:

* :mod:`~lightning_ssr.loggers.stream`: :func:`log_stream_result`, the accuracy matrix of a
  finished stream as a ``wandb.Table`` and a heatmap (``wandb.Image`` of :func:`accuracy_heatmap`),
  and the summary numbers (``stream/average_accuracy``, ...) in the run's summary, for any W&B run.
  :func:`~lightning_ssr.continual.fit_stream` calls it for every ``WandbLogger`` at the end of the
  stream.
* :mod:`~lightning_ssr.loggers.wandb_logging`: :class:`SSRWandbHistograms`, a callback that logs
  per-neuron histograms of the SSR state of every tracked layer; :class:`StreamWandbLogger`,
  Lightning's ``WandbLogger`` with ``finalize_stream``; :func:`wandb_logger_factory`, one W&B run
  per (scenario, method, seed) stream of ``lightning-ssr bench`` for Lightning and Avalanche runners.
* :mod:`~lightning_ssr.loggers.wandb_reader`: :func:`read_wandb_run`, what a run wrote, read back
  from its ``.wandb`` file with wandb's own reader (``wandb leet inspect``), offline.

Offline: set ``WANDB_MODE=offline``; runs go to ``<save_dir>/wandb/offline-run-*`` and can be
uploaded later with ``wandb sync <run dir>``.

Example:
    >>> from lightning_ssr import SynapticScaling
    >>> from lightning_ssr.loggers import SSRWandbHistograms
    >>> ssr = SynapticScaling()
    >>> callbacks = [ssr, SSRWandbHistograms(ssr, every_n_steps=50)]
    >>> type(callbacks[1]).__module__
    'lightning_ssr.loggers.wandb_logging'
"""

from lightning_ssr.loggers.stream import StreamResultLike, accuracy_heatmap, log_stream_result
from lightning_ssr.loggers.wandb_logging import (
    LoggerFactory,
    SSRWandbHistograms,
    StreamWandbLogger,
    wandb_logger_factory,
)
from lightning_ssr.loggers.wandb_reader import WandbRun, read_wandb_run

__all__ = [
    "LoggerFactory",
    "SSRWandbHistograms",
    "StreamResultLike",
    "StreamWandbLogger",
    "WandbRun",
    "accuracy_heatmap",
    "log_stream_result",
    "read_wandb_run",
    "wandb_logger_factory",
]
