"""The networks of the benchmark: van de Ven & Tolias's MLPs, or a small CNN, single- or multi-headed."""

from __future__ import annotations

import math

from avalanche.models import MultiHeadClassifier, MultiTaskModule
from torch import Tensor, nn

from lightning_ssr.bench.options import CNN_CHANNELS, MODELS

__all__ = ["MultiHeadNet", "MultiHeadMLP", "mlp_body", "cnn_body", "make_body", "make_model"]


def mlp_body(in_features: int, hidden: int, layers: int = 2) -> nn.Sequential:
    """``Flatten`` then ``layers`` fully connected ReLU layers of ``hidden`` units.

    Example:
        >>> mlp_body(64, 400)
        Sequential(
          (0): Flatten(start_dim=1, end_dim=-1)
          (1): Linear(in_features=64, out_features=400, bias=True)
          (2): ReLU()
          (3): Linear(in_features=400, out_features=400, bias=True)
          (4): ReLU()
        )
    """
    mods: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*mods)


def cnn_body(in_features: int, hidden: int, channels: tuple[int, int] = CNN_CHANNELS) -> nn.Sequential:
    """A small CNN over square one-channel images of ``in_features`` pixels: two 3x3 convolutions
    (``channels``, ReLU, 2x2 max-pooling each) and one fully connected ReLU layer of ``hidden`` units.

    Whatever shape the images come in (flat, ``(H, W)`` or ``(1, H, W)``), they are read as
    ``(1, side, side)``.

    Raises:
        ValueError: ``in_features`` is not the square of a side of at least 4 pixels.

    Example:
        >>> body = cnn_body(64, 100)  # scikit-learn's 8x8 digits
        >>> import torch
        >>> body(torch.zeros(2, 64)).shape
        torch.Size([2, 100])
        >>> cnn_body(60, 100)
        Traceback (most recent call last):
        ...
        ValueError: `model='cnn'` needs square one-channel images of at least 4x4 pixels, got 60 input features
    """
    side = math.isqrt(in_features)
    if side * side != in_features or side < 4:
        raise ValueError("`model='cnn'` needs square one-channel images of at least 4x4 pixels, "
                         f"got {in_features} input features")
    c1, c2 = channels
    return nn.Sequential(
        nn.Flatten(), nn.Unflatten(1, (1, side, side)),
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * (side // 4) ** 2, hidden), nn.ReLU(),
    )


def make_body(in_features: int, hidden: int, layers: int = 2, model: str = "mlp") -> nn.Sequential:
    """The feature extractor: :func:`mlp_body` (``layers`` hidden layers) or :func:`cnn_body`.

    Raises:
        ValueError: ``model`` is not one of :data:`~lightning_ssr.bench.options.MODELS`.

    Example:
        >>> make_body(64, 32, model="vgg")
        Traceback (most recent call last):
        ...
        ValueError: `model` must be one of ('mlp', 'cnn'), got 'vgg'
    """
    if model == "mlp":
        return mlp_body(in_features, hidden, layers)
    if model == "cnn":
        return cnn_body(in_features, hidden)
    raise ValueError(f"`model` must be one of {MODELS}, got {model!r}")


def make_model(in_features: int, hidden: int, n_classes: int, multi_head: bool, layers: int = 2,
               model: str = "mlp") -> nn.Module:
    """A classifier (an MLP, or with ``model="cnn"`` a small CNN); with ``multi_head`` an Avalanche
    multi-task model with a head per task.

    The multi-head model is an Avalanche ``MultiTaskModule`` whose ``MultiHeadClassifier`` grows a
    head for each new task label, in Avalanche's strategies and in the Lightning stream runner alike.

    Example:
        >>> net = make_model(64, 32, 10, multi_head=False)
        >>> net[-1]
        Linear(in_features=32, out_features=10, bias=True)
        >>> make_model(64, 32, 10, multi_head=True, model="cnn").body[2]
        Conv2d(1, 16, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
    """
    body = make_body(in_features, hidden, layers, model)
    if not multi_head:
        return nn.Sequential(*body, nn.Linear(hidden, n_classes))
    return MultiHeadNet(body, hidden, n_classes)


class MultiHeadNet(MultiTaskModule):
    """A body shared by all tasks and one linear head per task label (grown by Avalanche).

    Args:
        body: the shared feature extractor, ending in ``hidden`` features.
        hidden: its output width.
        n_classes: the units of each head.
    """

    def __init__(self, body: nn.Module, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.body = body
        self.classifier = MultiHeadClassifier(hidden, initial_out_features=n_classes, masking=False)

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        return self.classifier.forward_single_task(self.body(x), task_label)


class MultiHeadMLP(MultiHeadNet):
    """An MLP body shared by all tasks and one linear head per task label (grown by Avalanche)."""

    def __init__(self, in_features: int, hidden: int, n_classes: int, layers: int = 2) -> None:
        super().__init__(mlp_body(in_features, hidden, layers), hidden, n_classes)
