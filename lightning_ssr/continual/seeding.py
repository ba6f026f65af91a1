"""Independent random streams for a run: one per (seed, purpose, experience).

A stream run draws random numbers for several purposes: the network's initial weights, each
experience's new heads and dropout, each experience's shuffling order. Seeding them with
``seed + experience`` (as this package's runners did until this change) makes runs overlap: seed ``s``, experience
``i`` replays seed ``s + 1``, experience ``i - 1``, and a head created after seeding with the
model's own seed copies the body's first initial weights. :func:`stream_seed` derives each
stream's seed with numpy's :class:`~numpy.random.SeedSequence` (``spawn_key=(purpose,
experience)``), so every (seed, purpose, experience) gets its own statistically independent
stream. Both runners of the benchmark (Avalanche's strategies and the Lightning stream runner)
use it alike.

Example:
    >>> stream_seed(0, "data", 1) == stream_seed(1, "data", 0)
    False
    >>> stream_seed(3, "model") == stream_seed(3, "model", 0)
    True
    >>> 0 <= stream_seed(0, "train", 4) < 2**63
    True
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["PURPOSES", "seed_stream", "stream_seed"]

#: What a stream's random numbers are for: ``"model"`` the initial weights, ``"train"`` the
#: global generators during an experience (new heads, dropout, Avalanche's shuffling), ``"data"``
#: the training data order of the Lightning stream runner, ``"eval"`` the global generators while
#: the test stream is evaluated after an experience (Avalanche's model adaptation grows the heads
#: of the test stream's tasks there).
PURPOSES: tuple[str, ...] = ("model", "train", "data", "eval")


def stream_seed(seed: int, purpose: str, experience: int = 0) -> int:
    """The seed of one independent random stream of a run.

    Args:
        seed: the run's seed, ``>= 0``.
        purpose: one of :data:`PURPOSES`.
        experience: the experience's index, ``>= 0``. Default: ``0``.

    Returns:
        An int in ``[0, 2**63)`` for ``torch.manual_seed`` or a ``torch.Generator`` (numpy and
        Python's ``random`` take it modulo ``2**32``).

    Raises:
        ValueError: ``seed`` or ``experience`` is not an int ``>= 0``, or ``purpose`` is unknown.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(stream_seed(0, "data", 2))
        >>> torch.randperm(4, generator=g).tolist() == torch.randperm(
        ...     4, generator=torch.Generator().manual_seed(stream_seed(0, "data", 2))).tolist()
        True
    """
    for name, value in (("seed", seed), ("experience", experience)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"`{name}` must be an int >= 0, got {value!r}")
    if purpose not in PURPOSES:
        raise ValueError(f"`purpose` must be one of {list(PURPOSES)}, got {purpose!r}")
    sequence = np.random.SeedSequence(int(seed), spawn_key=(PURPOSES.index(purpose), int(experience)))
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_stream(seed: int, purpose: str, experience: int = 0) -> int:
    """Seed torch (every device), numpy and Python's ``random`` from :func:`stream_seed`.

    Args:
        seed: the run's seed, ``>= 0``.
        purpose: one of :data:`PURPOSES`.
        experience: the experience's index, ``>= 0``. Default: ``0``.

    Returns:
        The seed used (:func:`stream_seed`'s value).

    Example:
        >>> _ = seed_stream(0, "train", 1); a = torch.rand(2)
        >>> _ = seed_stream(0, "train", 1); torch.equal(a, torch.rand(2))
        True
    """
    value = stream_seed(seed, purpose, experience)
    random.seed(value)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    return value
