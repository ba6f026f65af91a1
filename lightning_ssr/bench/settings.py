"""The training budget every method gets alike (no torch import: the main process reads it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from lightning_ssr.bench.options import CNN_CHANNELS, BenchOptions

__all__ = ["RunSettings", "settings_of"]


@dataclass(frozen=True)
class RunSettings:
    """The budget every method gets alike: network, optimizer, epochs (or iterations), batch size.

    ``model`` is the network: ``"mlp"`` (``layers`` hidden layers of ``hidden`` units) or ``"cnn"``
    (:func:`~lightning_ssr.bench.models.cnn_body`: two convolutions, then ``hidden`` units).

    With ``iterations`` set, every method trains exactly that many mini-batches per task (the
    published protocols count iterations), whatever ``epochs`` says. With ``partial_batches_all``
    every method without SSR counts a smaller last batch by its samples, as SSR does by default (the baselines
    through :class:`~lightning_ssr.avalanche.PartialBatchPlugin` and
    :class:`~lightning_ssr.PartialBatchScaling`).
    """

    hidden: int = 400
    layers: int = 2
    model: str = "mlp"
    lr: float = 1e-3
    epochs: int = 1
    batch_size: int = 128
    eval_batch_size: int = 512
    iterations: Optional[int] = None
    partial_batches_all: bool = False

    @property
    def network(self) -> str:
        """The network in words, e.g. ``"MLP 2x400"`` or ``"CNN 16-32 conv, 400"``.

        Example:
            >>> RunSettings().network, RunSettings(model="cnn", hidden=100).network
            ('MLP 2x400', 'CNN 16-32 conv, 100')
        """
        if self.model == "mlp":
            return f"MLP {self.layers}x{self.hidden}"
        return f"CNN {'-'.join(map(str, CNN_CHANNELS))} conv, {self.hidden}"

    @property
    def max_epochs(self) -> int:
        """Epochs to allow: ``epochs``, or with ``iterations`` enough for them (every epoch has a batch)."""
        return self.iterations if self.iterations is not None else self.epochs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def settings_of(opts: BenchOptions) -> RunSettings:
    """The budget every method gets alike, from the options.

    Example:
        >>> settings_of(BenchOptions(epochs=2)).epochs, settings_of(BenchOptions(protocol="permuted")).hidden
        (2, 1000)
    """
    return RunSettings(hidden=opts.hidden_units, model=opts.model, lr=opts.lr, epochs=opts.epochs, batch_size=opts.batch_size,
                       iterations=opts.iterations, partial_batches_all=opts.partial_batches_all)
