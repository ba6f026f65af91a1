"""``ClassifierModule``: any ``nn.Module`` classifier as a LightningModule for a continual stream."""

from __future__ import annotations

import sys
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import override

__all__ = ["ClassifierModule", "OPTIMIZERS", "unpack_batch"]

#: Optimizers :class:`ClassifierModule` builds.
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd")


def unpack_batch(batch: Any) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Split a mini-batch into inputs, targets and task labels.

    Avalanche's classification datasets yield ``(x, y, task_label)``; plain datasets ``(x, y)``,
    which gives task labels ``None``.

    Raises:
        ValueError: for anything but a 2- or 3-element sequence.

    Example:
        >>> x, y, t = unpack_batch([torch.zeros(2, 4), torch.tensor([0, 1]), torch.tensor([3, 3])])
        >>> t.tolist()
        [3, 3]
        >>> unpack_batch((torch.zeros(2, 4), torch.tensor([0, 1])))[2] is None
        True
    """
    if isinstance(batch, (list, tuple)) and len(batch) in (2, 3):
        x, y = batch[0], batch[1]
        t = batch[2] if len(batch) == 3 else None
        return x, y, t
    kind = f"a sequence of length {len(batch)}" if isinstance(batch, (list, tuple)) else type(batch).__name__
    raise ValueError(f"a batch must be (x, y) or (x, y, task_labels), got {kind}")


def _is_multitask(model: nn.Module) -> bool:
    """Whether ``model`` is an Avalanche ``MultiTaskModule`` (without importing Avalanche)."""
    dynamic = sys.modules.get("avalanche.models.dynamic_modules")
    return dynamic is not None and isinstance(model, dynamic.MultiTaskModule)


class ClassifierModule(pl.LightningModule):
    """Train any ``nn.Module`` classifier with cross-entropy, on ``(x, y)`` or ``(x, y, t)`` batches.

    The model is called as ``model(x, t)`` when it takes task labels (an Avalanche
    ``MultiTaskModule`` such as ``MultiHeadClassifier``, or ``task_labels=True``), else ``model(x)``.
    :meth:`predict_step` returns the logits, which is what
    :func:`~lightning_ssr.continual.fit_stream` evaluates.

    Logged: ``train_loss`` every step (see ``log_train_loss``); ``test_loss``/``test_acc`` per epoch
    under ``trainer.test``.
    (No ``validation_step``, so that a Trainer without validation data does not warn each
    experience; subclass to add one.)

    Args:
        model: the classifier; its output is the logits ``[N, C]``.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``. Default: ``"adam"``.
        lr: learning rate, ``> 0``. Default: ``1e-3``.
        momentum: SGD momentum in ``[0, 1)`` (``"sgd"`` only). Default: ``0.0``.
        weight_decay: weight decay, ``>= 0``. Default: ``0.0``.
        task_labels: pass the batch's task labels to the model: ``True``, ``False`` or ``None``
            (when the model is an Avalanche ``MultiTaskModule``). Default: ``None``.
        log_train_loss: ``self.log("train_loss", ...)`` every step: ``True``, ``False`` or ``None``
            (only when something can read it: the Trainer has a logger, or a callback with a
            ``monitor`` such as ``ModelCheckpoint``/``EarlyStopping``; ``self.log`` costs about as
            much as the rest of Lightning's per-step work). Default: ``None``.
        fused: passed to the torch optimizer: ``True`` for its fused implementation (one kernel for
            every parameter; on CPU about 0.8 ms less per step for a 2x400 MLP),
            ``None`` for torch's choice. Default: ``None``.

    Raises:
        TypeError / ValueError: for an invalid argument (the message names it, what is allowed
            and what was received).

    Example:
        >>> module = ClassifierModule(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), optimizer="sgd", lr=0.1)
        >>> batch = (torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), torch.zeros(4, dtype=torch.long))
        >>> module.predict_step(batch, 0).shape
        torch.Size([4, 10])
        >>> ClassifierModule(nn.Linear(2, 2), optimizer="rmsprop")
        Traceback (most recent call last):
        ...
        ValueError: `optimizer` must be one of ('adam', 'adamw', 'sgd'), got 'rmsprop'
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: Literal["adam", "adamw", "sgd"] = "adam",
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        task_labels: Optional[bool] = None,
        log_train_loss: Optional[bool] = None,
        fused: Optional[bool] = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {optimizer!r}")
        for name, value, low, high in (("lr", lr, 0.0, None), ("momentum", momentum, 0.0, 1.0),
                                       ("weight_decay", weight_decay, 0.0, None)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"`{name}` must be a float, got {value!r}")
            if (name == "lr" and not value > 0) or value < low or (high is not None and value >= high):
                allowed = "> 0" if name == "lr" else (f"in [{low}, {high})" if high is not None else f">= {low}")
                raise ValueError(f"`{name}` must be {allowed}, got {value!r}")
        for name, flag in (("task_labels", task_labels), ("log_train_loss", log_train_loss), ("fused", fused)):
            if flag is not None and not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be True, False or None, got {flag!r}")
        self.model = model
        self.optimizer_name = optimizer
        self.fused = fused
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.pass_task_labels = _is_multitask(model) if task_labels is None else task_labels
        self.log_train_loss = log_train_loss
        self._log_loss = log_train_loss is not False
        self.save_hyperparameters(ignore=["model"])

    @override
    def forward(self, x: Tensor, task_labels: Optional[Tensor] = None) -> Tensor:
        """Logits of ``x``; ``task_labels`` reach the model only when it takes them."""
        if self.pass_task_labels:
            if task_labels is None:
                raise ValueError(
                    f"{type(self.model).__name__} takes task labels, but the batch has none: "
                    "use (x, y, task_labels) batches or ClassifierModule(..., task_labels=False)"
                )
            return self.model(x, task_labels)
        return self.model(x)

    def _shared_step(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        x, y, t = unpack_batch(batch)
        logits = self(x, t)
        return F.cross_entropy(logits, y), logits, y

    @override
    def on_train_start(self) -> None:
        if self.log_train_loss is None:
            trainer = self.trainer
            self._log_loss = bool(trainer.loggers) or any(
                getattr(cb, "monitor", None) is not None for cb in trainer.callbacks
            )

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, _, y = self._shared_step(batch)
        if self._log_loss:
            self.log("train_loss", loss, on_step=True, on_epoch=False, batch_size=y.shape[0], sync_dist=True)
        return loss

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self._eval_step(batch, "test")

    def _eval_step(self, batch: Any, stage: str) -> Tensor:
        loss, logits, y = self._shared_step(batch)
        acc = (logits.argmax(dim=1) == y).float().mean()
        self.log_dict({f"{stage}_loss": loss, f"{stage}_acc": acc}, on_epoch=True, batch_size=y.shape[0])
        return loss

    @override
    def predict_step(self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> Tensor:
        """The logits of a batch ``(x, y, t)`` or ``(x, y)`` (or a bare input tensor)."""
        if isinstance(batch, Tensor):
            return self(batch)
        x, _, t = unpack_batch(batch)
        return self(x, t)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                                   fused=self.fused)
        cls = torch.optim.AdamW if self.optimizer_name == "adamw" else torch.optim.Adam
        return cls(params, lr=self.lr, weight_decay=self.weight_decay, fused=self.fused)
