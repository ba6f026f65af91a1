"""A train/test pair of image tensors: what every offline loader returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TensorSplit"]


@dataclass(frozen=True)
class TensorSplit:
    """Images and labels of one dataset, already split into train and test.

    Images are float32 in ``[0, 1]`` with shape ``[N, C, H, W]``; labels are int64 class indices.

    Attributes:
        name: the dataset's short name (``"digits"``, ``"fmnist"``, ``"mnist"``).
        train_x: training images, ``[N_train, C, H, W]``.
        train_y: training labels, ``[N_train]``.
        test_x: test images, ``[N_test, C, H, W]``.
        test_y: test labels, ``[N_test]``.

    Example:
        >>> data = TensorSplit("toy", torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 0, 1]),
        ...                    torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]))
        >>> data.input_shape, data.n_classes, len(data.train_y), len(data.test_y)
        ((1, 2, 2), 2, 4, 2)
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if not isinstance(x, Tensor) or x.dim() != 4:
                raise ValueError(f"`{split}_x` must be a 4-D tensor [N, C, H, W], got {_describe(x)}")
            if not isinstance(y, Tensor) or y.dim() != 1 or len(y) != len(x):
                raise ValueError(f"`{split}_y` must be a 1-D tensor of {len(x)} labels, got {_describe(y)}")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(
                f"train and test images differ in shape: {tuple(self.train_x.shape[1:])} "
                f"vs {tuple(self.test_x.shape[1:])}"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one image, ``(C, H, W)``."""
        return tuple(self.train_x.shape[1:])

    @property
    def n_classes(self) -> int:
        """Number of classes (largest label + 1)."""
        return int(torch.cat([self.train_y, self.test_y]).max()) + 1


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__}"
