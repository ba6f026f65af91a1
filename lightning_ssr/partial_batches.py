"""``PartialBatchScaling``: a smaller last batch counts by its samples, in any Lightning training.

:class:`~lightning_ssr.SynapticScaling` does this itself (``scale_partial_batches``, on by
default); this callback gives plain training, or any other method, the same treatment, so that a
comparison with SSR can be read both ways. It drives the engine's own
:class:`~lightning_ssr.core.partial.PartialBatches`, nothing else.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_ssr.core.partial import PartialBatches, refuse_double_scaling

__all__ = ["PartialBatchScaling"]


def observe_batch(partial: PartialBatches, batch: Any, owner: str) -> None:
    """Report a training batch's size, as Lightning reads it, to ``partial``; warn and switch it off if unreadable.

    An ``(x, y, ...)`` batch led by a tensor is read directly (Lightning's ``extract_batch_size``
    returns the same, the first tensor's length, at about ten times the cost per step).
    """
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        partial.observe(batch[0].shape[0] if batch[0].dim() else 1)
        return
    try:
        partial.observe(extract_batch_size(batch))
    except MisconfigurationException:
        partial.enabled = False
        rank_zero_warn(
            f"{owner} could not read the batch size from the training batch (no tensor in it), so "
            "`scale_partial_batches` is off from now on: a smaller last batch takes a full step"
        )


class PartialBatchScaling(Callback):
    """Count an optimizer step on fewer samples than the task's largest as that fraction of a step.

    A step on ``n`` samples, where the current ``fit``'s largest step had ``N``, has its gradients
    and then the optimizer's change to every trainable parameter multiplied by ``n / N``. Each
    ``fit`` is one task: the largest step is measured afresh in the next one. Under gradient
    accumulation the samples of the step's batches count together; under DDP each replica counts
    its own batch. The state (the task's largest step) is saved in checkpoints.

    Do not add it beside a :class:`~lightning_ssr.SynapticScaling` with ``scale_partial_batches=True``:
    the step would be scaled twice (``setup`` raises).

    Example:
        >>> import torch
        >>> from lightning_ssr.continual import ClassifierModule
        >>> ds = torch.utils.data.TensorDataset(torch.randn(40, 4), torch.randint(0, 2, (40,)))
        >>> module = ClassifierModule(torch.nn.Linear(4, 2), lr=0.1)
        >>> scaling = PartialBatchScaling()
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[scaling], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module, torch.utils.data.DataLoader(ds, batch_size=16))  # 16, 16, then 8
        >>> scaling.partial.scaled  # the step on 8 samples counted as half a step
        1
    """

    def __init__(self) -> None:
        super().__init__()
        self.partial = PartialBatches(enabled=True)
        self._hooks: list[Any] = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_double_scaling(trainer.callbacks, "callbacks", type(self).__name__, "a SynapticScaling")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        for opt in trainer.optimizers:
            self._hooks.append(opt.register_step_post_hook(lambda *_: self.partial.after_step()))

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.partial.enabled:
            observe_batch(self.partial, batch, type(self).__name__)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if not trainer.sanity_checking:
            self.partial.before_step(pl_module.parameters())

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.partial.new_task()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._remove_hooks()

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.partial.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.partial.load_state_dict(state_dict)
