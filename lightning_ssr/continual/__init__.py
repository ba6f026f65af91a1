"""Continual learning with Lightning: run a module through a stream and measure what it forgets.

* :func:`fit_stream` / :class:`StreamRunner`: train on each experience of a stream (one fresh,
  lean ``Trainer`` per experience with the same callbacks, one logger run), evaluate on every test
  experience, checkpoint and resume exactly.
* :func:`stream_seed`: an independent seed per (seed, purpose, experience), used by both runners.
* :class:`ClassifierModule`: any ``nn.Module`` classifier as a LightningModule for the stream.
* :class:`ExperienceAccuracy` (a torchmetrics ``Metric``), :func:`average_accuracy`,
  :func:`average_forgetting`, :func:`forgetting`, :func:`backward_transfer` and
  :class:`StreamResult`, with Avalanche's definitions.

Each name is imported on first use (so reading a :class:`StreamResult` needs torch alone).
"""

from typing import TYPE_CHECKING

from lightning_ssr._lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_ssr.continual.accuracy import ExperienceAccuracy
    from lightning_ssr.continual.metrics import (
        StreamResult,
        average_accuracy,
        average_forgetting,
        backward_transfer,
        forgetting,
        plasticity,
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

__getattr__, __dir__ = lazy_exports(globals(), {
    "ExperienceAccuracy": "lightning_ssr.continual.accuracy",
    **dict.fromkeys(("StreamResult", "average_accuracy", "average_forgetting", "backward_transfer", "forgetting",
                     "plasticity"), "lightning_ssr.continual.metrics"),
    **dict.fromkeys(("OPTIMIZERS", "ClassifierModule", "unpack_batch"), "lightning_ssr.continual.module"),
    **dict.fromkeys(("StreamRunner", "fit_stream"), "lightning_ssr.continual.runner"),
    **dict.fromkeys(("PURPOSES", "seed_stream", "stream_seed"), "lightning_ssr.continual.seeding"),
})
