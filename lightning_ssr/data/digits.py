"""scikit-learn's handwritten digits: the embedded default dataset (no download, ever)."""

from __future__ import annotations

import math

import torch

from lightning_ssr.data.tensors import TensorSplit

__all__ = ["load_digits"]


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> TensorSplit:
    """Load scikit-learn's 1,797 handwritten digits (8x8) with a fixed stratified train/test split.

    The images ship inside scikit-learn, so this never touches the network. Pixel values
    (``0..16``) are scaled to ``[0, 1]``; every class keeps the same share in train and test.

    Args:
        test_fraction: share of the images held out for testing, in ``(0, 1)``. Default: ``0.25``.
        seed: seed of the split; the same seed always gives the same split. Default: ``0``.

    Returns:
        A :class:`TensorSplit` with float32 images ``[N, 1, 8, 8]`` and int64 labels ``0..9``.

    Example:
        >>> data = load_digits()
        >>> tuple(data.train_x.shape), tuple(data.test_x.shape)
        ((1347, 1, 8, 8), (450, 1, 8, 8))
        >>> float(data.train_x.min()), float(data.train_x.max()), data.n_classes
        (0.0, 1.0, 10)
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise TypeError(f"`test_fraction` must be a float in (0, 1), got {test_fraction!r}")
    if not (math.isfinite(test_fraction) and 0.0 < test_fraction < 1.0):
        raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int, got {seed!r}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"`seed` must be in [0, 2**32), got {seed!r}")
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = _sk_load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_fraction, random_state=seed, stratify=y.numpy()
    )
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return TensorSplit("digits", x[idx_train], y[idx_train], x[idx_test], y[idx_test])
