"""Continual-learning metrics: the accuracy matrix, average accuracy, forgetting and backward transfer.

The accuracy matrix ``R`` has one row per finished training experience and one column per test
experience: ``R[i, j]`` is the accuracy on test experience ``j`` after training on experience ``i``
(training experience ``i`` and test experience ``i`` hold the same classes or task). The summary
numbers follow Avalanche (``avalanche.evaluation.metrics.forgetting_bwt``) exactly, so that a
figure computed here and one logged by an Avalanche strategy on the same predictions agree:

* average accuracy: the mean of the last row, ``mean_j R[T-1, j]``;
* forgetting of experience ``j < T-1``: ``R[j, j] - R[T-1, j]`` (accuracy right after learning it
  minus accuracy at the end), averaged over ``j < T-1`` (``0.0`` when ``T == 1``);
* backward transfer (Lopez-Paz & Ranzato 2017): ``mean_{j < T-1} (R[T-1, j] - R[j, j])``, the
  negated average forgetting.

The counts behind the matrix come from :class:`~lightning_ssr.continual.ExperienceAccuracy`
(``accuracy.py``, a torchmetrics ``Metric``); this module needs torch alone, so that a process
that only reads results (the benchmark's main process) does not import torchmetrics.
:class:`StreamResult` holds one run: the matrix, the counts, the summary, timings and configuration,
and round-trips through JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor

__all__ = [
    "StreamResult",
    "average_accuracy",
    "average_forgetting",
    "backward_transfer",
    "plasticity",
    "forgetting",
]

MatrixLike = Union[Tensor, Sequence[Sequence[float]]]
_REFERENCES = ("first", "max")
_RESULT_VERSION = 1


# ------------------------------------------------------------------------------------ functions
def _as_matrix(matrix: MatrixLike) -> Tensor:
    """``matrix`` as a float64 CPU tensor, checked: 2-D, at least one row, rows <= columns, finite."""
    if isinstance(matrix, Tensor):
        r = matrix.detach().to(device="cpu", dtype=torch.float64)
    else:
        try:
            r = torch.as_tensor(matrix, dtype=torch.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"`matrix` must be a 2-D tensor or a list of equal-length rows of floats, got {type(matrix).__name__}"
            ) from err
    if r.dim() != 2 or r.shape[0] < 1:
        raise ValueError(
            f"`matrix` must be 2-D with at least one row (rows = trained experiences, columns = test "
            f"experiences), got shape {tuple(r.shape)}"
        )
    if r.shape[0] > r.shape[1]:
        raise ValueError(
            f"`matrix` must have no more rows (trained experiences) than columns (test experiences), "
            f"got shape {tuple(r.shape)}"
        )
    if not bool(torch.isfinite(r).all()):
        raise ValueError("`matrix` must be finite, got NaN or infinite entries")
    return r


def average_accuracy(matrix: MatrixLike, *, seen_only: bool = False) -> float:
    """Mean accuracy over the test experiences after the last training experience (the last row).

    Args:
        matrix: accuracy matrix ``[T, E]`` (``T`` trained experiences, ``E >= T`` test experiences).
        seen_only: average only over the first ``T`` test experiences, those trained on so far.
            Default: ``False`` (all test experiences, as in van de Ven & Tolias 2019 at ``T == E``).

    Returns:
        The average accuracy, in the units of ``matrix``.

    Example:
        >>> R = [[0.9, 0.1, 0.0], [0.6, 0.8, 0.1]]
        >>> round(average_accuracy(R), 4), round(average_accuracy(R, seen_only=True), 4)
        (0.5, 0.7)
    """
    r = _as_matrix(matrix)
    last = r[-1, : r.shape[0]] if seen_only else r[-1]
    return float(last.mean())


def forgetting(matrix: MatrixLike, *, reference: Literal["first", "max"] = "first") -> Tensor:
    """Forgetting of each experience trained before the last one.

    With ``T`` rows, for each ``j < T - 1``:

    * ``reference="first"`` (Avalanche's ``ExperienceForgetting``): ``R[j, j] - R[T-1, j]``;
    * ``reference="max"`` (Chaudhry et al. 2018): ``max_{j <= i < T-1} R[i, j] - R[T-1, j]``,
      the drop from the best accuracy the experience had once learned.

    Args:
        matrix: accuracy matrix ``[T, E]``, ``E >= T``.
        reference: what the final accuracy is compared with. Default: ``"first"``.

    Returns:
        A float64 tensor ``[T - 1]`` (empty when ``T == 1``); positive values mean accuracy was lost.

    Example:
        >>> R = [[0.8, 0.0, 0.0], [0.9, 0.9, 0.0], [0.5, 0.7, 0.8]]
        >>> forgetting(R)
        tensor([0.3000, 0.2000], dtype=torch.float64)
        >>> forgetting(R, reference="max")
        tensor([0.4000, 0.2000], dtype=torch.float64)
    """
    if reference not in _REFERENCES:
        raise ValueError(f"`reference` must be one of {_REFERENCES}, got {reference!r}")
    r = _as_matrix(matrix)
    t = r.shape[0]
    if t < 2:
        return torch.zeros(0, dtype=torch.float64)
    idx = torch.arange(t - 1)
    final = r[t - 1, idx]
    if reference == "first":
        return r[idx, idx] - final
    # rows j..T-2 of column j; rows above the diagonal are masked out
    earlier = r[: t - 1, : t - 1]
    mask = idx[:, None] >= idx[None, :]
    best = earlier.masked_fill(~mask, -math.inf).amax(dim=0)
    return best - final


def average_forgetting(matrix: MatrixLike, *, reference: Literal["first", "max"] = "first") -> float:
    """Mean of :func:`forgetting` over the experiences trained before the last one.

    With the default ``reference="first"`` this is Avalanche's ``StreamForgetting`` after the last
    training experience; ``0.0`` when only one experience has been trained (as in Avalanche).

    Args:
        matrix: accuracy matrix ``[T, E]``, ``E >= T``.
        reference: ``"first"`` (Avalanche) or ``"max"`` (Chaudhry et al. 2018). Default: ``"first"``.

    Example:
        >>> R = [[0.8, 0.0, 0.0], [0.9, 0.9, 0.0], [0.5, 0.7, 0.8]]
        >>> round(average_forgetting(R), 4), round(average_forgetting(R, reference="max"), 4)
        (0.25, 0.3)
        >>> average_forgetting([[0.9, 0.1]])
        0.0
    """
    f = forgetting(matrix, reference=reference)
    return float(f.mean()) if f.numel() else 0.0


def backward_transfer(matrix: MatrixLike) -> float:
    """Backward transfer (Lopez-Paz & Ranzato 2017): ``mean_{j < T-1} (R[T-1, j] - R[j, j])``.

    Negative when learning later experiences hurt earlier ones. Equal to Avalanche's ``StreamBWT``
    and to ``-average_forgetting(matrix)``; ``0.0`` when ``T == 1``.

    Example:
        >>> R = [[0.8, 0.0, 0.0], [0.9, 0.9, 0.0], [0.5, 0.7, 0.8]]
        >>> round(backward_transfer(R), 4)
        -0.25
    """
    f = forgetting(matrix, reference="first")
    return float(-f.mean()) if f.numel() else 0.0


def plasticity(matrix: MatrixLike) -> float:
    """Mean accuracy on each experience right after training on it: ``mean_i R[i, i]``.

    How well new experiences are still learned; a method that protects too much loses here, not
    in forgetting. The diagonal of the matrix over the experiences trained so far.

    Example:
        >>> R = [[0.8, 0.0, 0.0], [0.9, 0.9, 0.0], [0.5, 0.7, 0.8]]
        >>> round(plasticity(R), 4)
        0.8333
    """
    r = _as_matrix(matrix)
    t = r.shape[0]
    return float(torch.diagonal(r[:, :t]).mean()) if t else math.nan


# ---------------------------------------------------------------------------------- the result
def _jsonable(value: Any) -> Any:
    """``value`` made of JSON types only (dataclasses and mappings become dicts, tuples lists)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, Tensor):
        return value.tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return _jsonable(value.item())
        except (TypeError, ValueError):
            pass
    return repr(value)


@dataclass
class StreamResult:
    """The outcome of one run through a continual-learning stream.

    Attributes:
        method: a short name of what was run (``"naive"``, ``"SynapticScaling"``, ...).
        accuracy: the accuracy matrix as a list of rows; ``accuracy[i][j]`` is the accuracy on test
            experience ``j`` after training experience ``i``. A stopped run holds fewer rows than
            ``n_experiences``.
        correct: the number of correct test predictions behind each entry of ``accuracy`` (same
            shape), or ``None`` when only accuracies are known.
        total: the number of test samples behind each entry, or ``None``.
        n_experiences: number of training experiences in the whole stream.
        train_time_s: seconds spent training on each finished experience.
        train_cpu_s: CPU seconds of this process spent training on each finished experience (all
            its threads; unlike the wall time, it does not grow when other processes share the
            cores). Empty where it was not measured.
        eval_time_s: seconds spent evaluating after each finished experience.
        wall_time_s: seconds of the whole run (summed over resumed parts).
        extra_state_bytes: bytes the method stores beyond the model (e.g. SSR's per-neuron state).
        config: how the stream was run (epochs, batch size, seed, the model's hyperparameters...).
        method_config: the method's hyperparameters.

    The summary numbers (:attr:`average_accuracy`, :attr:`average_forgetting`,
    :attr:`backward_transfer`, :attr:`stream_accuracy`) are computed from the matrix.

    Example:
        >>> r = StreamResult("naive", accuracy=[[0.9, 0.1], [0.6, 0.8]], n_experiences=2)
        >>> round(r.average_accuracy, 4), round(r.average_forgetting, 4), round(r.backward_transfer, 4)
        (0.7, 0.3, -0.3)
        >>> StreamResult.from_dict(r.to_dict()) == r
        True
    """

    method: str
    accuracy: list[list[float]]
    n_experiences: int
    correct: Optional[list[list[int]]] = None
    total: Optional[list[list[int]]] = None
    train_time_s: list[float] = field(default_factory=list)
    train_cpu_s: list[float] = field(default_factory=list)
    eval_time_s: list[float] = field(default_factory=list)
    wall_time_s: float = 0.0
    extra_state_bytes: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    method_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.method, str):
            raise TypeError(f"`method` must be a str, got {self.method!r}")
        self.accuracy = [[float(v) for v in row] for row in self.accuracy]
        if self.accuracy:
            _as_matrix(self.accuracy)
        if isinstance(self.n_experiences, bool) or not isinstance(self.n_experiences, int):
            raise TypeError(f"`n_experiences` must be an int, got {self.n_experiences!r}")
        if self.n_experiences < len(self.accuracy):
            raise ValueError(
                f"`n_experiences` must be >= the number of rows of `accuracy` ({len(self.accuracy)}), "
                f"got {self.n_experiences}"
            )
        for name in ("correct", "total"):
            counts = getattr(self, name)
            if counts is None:
                continue
            counts = [[int(v) for v in row] for row in counts]
            if [len(row) for row in counts] != [len(row) for row in self.accuracy]:
                raise ValueError(
                    f"`{name}` must have the shape of `accuracy`, got rows of lengths {[len(r) for r in counts]}"
                )
            setattr(self, name, counts)

    # ------------------------------------------------------------------ derived
    @property
    def matrix(self) -> Tensor:
        """The accuracy matrix as a float64 tensor ``[completed, n_test_experiences]``."""
        return torch.tensor(self.accuracy, dtype=torch.float64)

    @property
    def completed(self) -> int:
        """Number of training experiences finished (rows of the matrix)."""
        return len(self.accuracy)

    @property
    def average_accuracy(self) -> float:
        """Mean of the last row (NaN before any experience)."""
        return average_accuracy(self.accuracy) if self.accuracy else math.nan

    @property
    def average_forgetting(self) -> float:
        """Avalanche's stream forgetting after the last finished experience (NaN before any)."""
        return average_forgetting(self.accuracy) if self.accuracy else math.nan

    @property
    def backward_transfer(self) -> float:
        """Avalanche's stream BWT after the last finished experience (NaN before any)."""
        return backward_transfer(self.accuracy) if self.accuracy else math.nan

    @property
    def plasticity(self) -> float:
        """Mean accuracy on each experience right after learning it (NaN before any)."""
        return plasticity(self.accuracy) if self.accuracy else math.nan

    @property
    def stream_accuracy(self) -> float:
        """Sample-weighted accuracy over the whole test stream after the last finished experience.

        This is Avalanche's ``Top1_Acc_Stream``; it differs from :attr:`average_accuracy` (the
        unweighted mean over experiences) when test experiences differ in size. NaN without counts.
        """
        if not self.accuracy or self.correct is None or self.total is None:
            return math.nan
        return sum(self.correct[-1]) / max(sum(self.total[-1]), 1)

    def summary(self) -> dict[str, float]:
        """The summary numbers as a dict (fractions, not percentages)."""
        return {
            "average_accuracy": self.average_accuracy,
            "average_forgetting": self.average_forgetting,
            "backward_transfer": self.backward_transfer,
            "plasticity": self.plasticity,
            "stream_accuracy": self.stream_accuracy,
            "wall_time_s": self.wall_time_s,
        }

    def format(self, percent: bool = True) -> str:
        """The accuracy matrix and the summary as a text table.

        Example:
            >>> print(StreamResult("naive", accuracy=[[0.9, 0.1], [0.6, 0.8]], n_experiences=2).format())
            naive: accuracy (%) on test experience j (columns) after training experience i (rows)
                   j=0   j=1
            i=0   90.0  10.0
            i=1   60.0  80.0
            average accuracy 70.0, forgetting 30.0, backward transfer -30.0 (%)
        """
        scale, unit = (100.0, " (%)") if percent else (1.0, "")
        n_cols = len(self.accuracy[0]) if self.accuracy else 0
        lines = [f"{self.method}: accuracy{unit} on test experience j (columns) after training experience i (rows)"]
        lines.append("     " + "".join(f"{'j=' + str(j):>6}" for j in range(n_cols)))
        for i, row in enumerate(self.accuracy):
            lines.append(f"{'i=' + str(i):<5}" + "".join(f"{v * scale + 0.0:6.1f}" for v in row))
        acc, fgt, bwt = (v * scale + 0.0 for v in (self.average_accuracy, self.average_forgetting,
                                                   self.backward_transfer))  # + 0.0: no "-0.0"
        lines.append(f"average accuracy {acc:.1f}, forgetting {fgt:.1f}, backward transfer {bwt:.1f}{unit}")
        return "\n".join(lines)

    # --------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field plus ``"summary"`` (ignored by :meth:`from_dict`)."""
        out = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["summary"] = self.summary()
        out["version"] = _RESULT_VERSION
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StreamResult":
        """Rebuild a result from :meth:`to_dict`'s output (derived keys are ignored)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"`data` must be a mapping from StreamResult.to_dict(), got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names - {"summary", "version"}
        if unknown:
            raise ValueError(f"`data` has unknown StreamResult fields: {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self, path: Union[str, os.PathLike]) -> None:
        """Write :meth:`to_dict` to ``path`` as JSON (floats round-trip exactly)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]) -> "StreamResult":
        """Read a result written by :meth:`to_json`."""
        return cls.from_dict(json.loads(Path(path).read_text()))
