"""Continual learning with Lightning: run a module through a stream and measure what it forgets.

* :func:`fit_stream` / :class:`StreamRunner`: train on each experience of a stream (one fresh,
  lean ``Trainer`` per experience with the same callbacks, one logger run), evaluate on every test
  experience, checkpoint and resume exactly.
* :func:`stream_seed`: an independent seed per (seed, purpose, experience), used by both runners.
* :class:`ClassifierModule`: any ``nn.Module`` classifier as a LightningModule for the stream.
* :class:`ExperienceAccuracy` (a torchmetrics ``Metric``), :func:`average_accuracy`,
  :func:`average_forgetting`, :func:`forgetting`, :func:`backward_transfer` and
  :class:`StreamResult`, with Avalanche's definitions.
"""

from lightning_ssr.continual.metrics import (
    ExperienceAccuracy,
    StreamResult,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    plasticity,
    forgetting,
)
from lightning_ssr.continual.module import OPTIMIZERS, ClassifierModule, unpack_batch
from lightning_ssr.continual.runner import StreamRunner, fit_stream
from lightning_ssr.continual.seeding import PURPOSES, seed_stream, stream_seed

__all__ = [
    "OPTIMIZERS",
    "PURPOSES",
    "ClassifierModule",
    "ExperienceAccuracy",
    "StreamResult",
    "StreamRunner",
    "average_accuracy",
    "average_forgetting",
    "backward_transfer",
    "plasticity",
    "fit_stream",
    "forgetting",
    "seed_stream",
    "stream_seed",
    "unpack_batch",
]
