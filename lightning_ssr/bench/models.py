"""The networks of the benchmark: van de Ven & Tolias's MLPs, single- or multi-headed."""

from __future__ import annotations

from avalanche.models import MultiHeadClassifier, MultiTaskModule
from torch import Tensor, nn

__all__ = ["MultiHeadMLP", "mlp_body", "make_model"]


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


def make_model(in_features: int, hidden: int, n_classes: int, multi_head: bool, layers: int = 2) -> nn.Module:
    """An MLP classifier; with ``multi_head`` an Avalanche multi-task model with a head per task.

    The multi-head model is an Avalanche ``MultiTaskModule`` whose ``MultiHeadClassifier`` grows a
    head for each new task label, in Avalanche's strategies and in the Lightning stream runner alike.

    Example:
        >>> net = make_model(64, 32, 10, multi_head=False)
        >>> net[-1]
        Linear(in_features=32, out_features=10, bias=True)
    """
    if not multi_head:
        return nn.Sequential(*mlp_body(in_features, hidden, layers), nn.Linear(hidden, n_classes))
    return MultiHeadMLP(in_features, hidden, n_classes, layers)


class MultiHeadMLP(MultiTaskModule):
    """An MLP body shared by all tasks and one linear head per task label (grown by Avalanche)."""

    def __init__(self, in_features: int, hidden: int, n_classes: int, layers: int = 2) -> None:
        super().__init__()
        self.body = mlp_body(in_features, hidden, layers)
        self.classifier = MultiHeadClassifier(hidden, initial_out_features=n_classes, masking=False)

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        return self.classifier.forward_single_task(self.body(x), task_label)
