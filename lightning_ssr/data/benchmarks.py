"""Split and Permuted continual-learning benchmarks, in the three scenarios of van de Ven & Tolias.

:func:`make_benchmark` builds an Avalanche benchmark (``train_stream`` / ``test_stream`` of
experiences) from in-memory tensors: no per-sample transform, no download. It follows
van de Ven & Tolias, "Three scenarios for continual learning" (2019):

========== ============================================ ==========================================
scenario   Split (5 tasks of 2 classes)                 Permuted (a fixed pixel permutation a task)
========== ============================================ ==========================================
``task``   task label = experience id; targets are the  task label = experience id; targets are
           position in the pair (0/1): a head per task  the digit (0-9): a head per task
``domain`` task label 0; targets 0/1 (first or second  task label 0; targets 0-9; one shared head
           class of the pair); one shared head
``class``  task label 0; the original labels (0-9);     task label 0; targets ``digit + 10 * task``
           one head over all classes                    (``10 * n_tasks`` classes), as in the paper
========== ============================================ ==========================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_ssr.core.validation import check_choice, check_int
from lightning_ssr.data.digits import load_digits
from lightning_ssr.data.idx import PathLike, load_idx_dataset
from lightning_ssr.data.names import DATASETS, PROTOCOLS, SCENARIOS
from lightning_ssr.data.tensors import TensorSplit

__all__ = ["DATASETS", "PROTOCOLS", "SCENARIOS", "ContinualBenchmark", "load_dataset", "make_benchmark", "stream_length"]



_MAX_PERMUTED_TASKS = 100


@dataclass(frozen=True)
class ContinualBenchmark:
    """An Avalanche benchmark with what a model and a report need to know about it.

    Attributes:
        benchmark: the Avalanche benchmark; iterate ``benchmark.train_stream`` and
            ``benchmark.test_stream``. Experiences carry ``task_label`` and
            ``classes_in_this_experience``; mini-batches are ``(x, y, task_label)``.
        dataset: ``"digits"``, ``"fmnist"`` or ``"mnist"``.
        protocol: ``"split"`` or ``"permuted"``.
        scenario: ``"task"``, ``"domain"`` or ``"class"``.
        n_tasks: number of experiences in each stream.
        n_classes: output units the model needs: per head in the task scenario (use a multi-head
            model such as Avalanche's ``MultiHeadClassifier``), for the single head otherwise.
        input_shape: shape of one image, ``(C, H, W)``.
        seed: the seed of permutations and subsets.
        classes_per_experience: the original class ids each experience draws from.
        permutations: for ``"permuted"``, each task's permutation of the ``H * W`` pixel
            positions (task 0 is the identity); ``None`` for ``"split"``.

    Example:
        >>> bench = make_benchmark("digits", "split", "domain")
        >>> bench.n_tasks, bench.n_classes, bench.input_shape, bench.multi_head
        (5, 2, (1, 8, 8), False)
        >>> bench.classes_per_experience[1]
        (2, 3)
    """

    benchmark: Any = field(repr=False)
    dataset: str
    protocol: str
    scenario: str
    n_tasks: int
    n_classes: int
    input_shape: tuple[int, ...]
    seed: int
    classes_per_experience: tuple[tuple[int, ...], ...] = field(repr=False)
    permutations: Optional[tuple[Tensor, ...]] = field(default=None, repr=False)

    @property
    def train_stream(self) -> Any:
        """The training stream (one experience per task)."""
        return self.benchmark.train_stream

    @property
    def test_stream(self) -> Any:
        """The test stream (one experience per task, in the same order)."""
        return self.benchmark.test_stream

    @property
    def multi_head(self) -> bool:
        """Whether the scenario gives task identity (a head per task), i.e. ``scenario == "task"``."""
        return self.scenario == "task"

    @property
    def input_size(self) -> int:
        """Number of input values of one image (``C * H * W``), for an MLP."""
        return math.prod(self.input_shape)


class _ImageDataset(Dataset):
    """Images and integer labels, with an optional fixed permutation of pixel positions.

    Holds a reference to the image tensor (no copy), so every permuted task of a dataset
    shares one copy of the images; the permutation is applied per sample on access.
    """

    def __init__(self, x: Tensor, y: Sequence[int], perm: Tensor | None = None) -> None:
        self.x, self.y, self.perm = x, list(y), perm
        self._flat = (x.shape[1], -1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img = self.x[i]
        if self.perm is not None:
            img = img.reshape(self._flat)[:, self.perm].view_as(img)
        return img, self.y[i]


# ------------------------------------------------------------------------------ building
def load_dataset(
    dataset: str = "digits", data_dir: PathLike | None = None, cache_dir: PathLike | None = None,
    download: bool = False,
) -> TensorSplit:
    """Load one of :data:`DATASETS` as float tensors (offline; see :func:`load_idx_dataset`).

    Args:
        dataset: ``"digits"`` (scikit-learn's, embedded), ``"fmnist"`` or ``"mnist"``
            (local IDX files). Default: ``"digits"``.
        data_dir: directory of the IDX files (ignored for ``"digits"``). Default: ``None``.
        cache_dir: where IDX files are laid out for torchvision. Default: ``None``.
        download: download ``"fmnist"``/``"mnist"`` with torchvision when the files are missing
            (needs a network). Default: ``False``.

    Example:
        >>> load_dataset("digits").input_shape
        (1, 8, 8)
    """
    check_choice("dataset", dataset, DATASETS)
    if dataset == "digits":
        return load_digits()
    return load_idx_dataset(dataset, data_dir=data_dir, cache_dir=cache_dir, download=download)


def _pick(y: Tensor, n: int | None, gen: torch.Generator) -> Tensor:
    """Indices of ``n`` samples drawn without replacement, classes interleaved (stratified)."""
    if n is None or n >= len(y):
        return torch.arange(len(y))
    order = torch.randperm(len(y), generator=gen)
    rank = torch.empty(len(y), dtype=torch.long)
    ys = y[order]
    for c in ys.unique():
        where = (ys == c).nonzero().squeeze(1)
        rank[where] = torch.arange(len(where))
    # stable sort by rank within class: one of each class, then the next of each class, ...
    chosen = order[torch.sort(rank, stable=True).indices[:n]]
    return chosen.sort().values


def _pad(x: Tensor, pad: int) -> Tensor:
    return torch.nn.functional.pad(x, (pad, pad, pad, pad))


def _avalanche_dataset(x: Tensor, y: Tensor, task: int, perm: Tensor | None) -> Any:
    from avalanche.benchmarks.utils import _make_taskaware_classification_dataset

    targets = y.tolist()
    return _make_taskaware_classification_dataset(_ImageDataset(x, targets, perm), targets=targets, task_labels=task)


def stream_length(protocol: str = "split", n_tasks: int | None = None) -> int:
    """The number of experiences :func:`make_benchmark` builds for ``protocol`` and ``n_tasks``, checked.

    Needs no data (the benchmark's main process reads it before any benchmark is built).

    Args:
        protocol: ``"split"`` or ``"permuted"``. Default: ``"split"``.
        n_tasks: the number asked for: Split 2 or 5, Permuted 1 to 100; ``None`` for the
            protocol's default (5 for Split, 10 for Permuted). Default: ``None``.

    Raises:
        ValueError / TypeError: ``protocol`` or ``n_tasks`` is not allowed.

    Example:
        >>> stream_length("split"), stream_length("permuted"), stream_length("permuted", 20)
        (5, 10, 20)
        >>> stream_length("split", 3)
        Traceback (most recent call last):
        ...
        ValueError: `n_tasks` must be one of [2, 5] for protocol='split' (10 classes in equal groups of at least two), got 3
    """
    check_choice("protocol", protocol, PROTOCOLS)
    if protocol == "split":
        allowed = (2, 5)
        if n_tasks is None:
            return 5
        check_int("n_tasks", n_tasks, 1)
        if n_tasks not in allowed:
            raise ValueError(
                f"`n_tasks` must be one of {list(allowed)} for protocol='split' (10 classes in equal "
                f"groups of at least two), got {n_tasks!r}"
            )
        return n_tasks
    if n_tasks is None:
        return 10
    check_int("n_tasks", n_tasks, 1, _MAX_PERMUTED_TASKS)
    return n_tasks


def make_benchmark(
    dataset: str = "digits",
    protocol: str = "split",
    scenario: str = "task",
    n_tasks: int | None = None,
    seed: int = 0,
    data_dir: PathLike | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    *,
    class_order: Sequence[int] | None = None,
    cache_dir: PathLike | None = None,
    pad: int = 0,
    download: bool = False,
) -> ContinualBenchmark:
    """Build a Split or Permuted benchmark in the task, domain or class scenario, offline.

    Split divides the classes into ``n_tasks`` groups (5 tasks of 2 classes by default, in the
    order 0/1, 2/3, ...); Permuted shows every class in every task, each task with its own
    fixed permutation of the pixel positions (task 0 unpermuted). Targets and task labels follow
    van de Ven & Tolias (2019), see the module docstring. Built from tensors: the digits
    benchmark takes a fraction of a second.

    Args:
        dataset: ``"digits"`` (scikit-learn's 8x8 digits, embedded), ``"fmnist"`` or ``"mnist"``
            (local IDX files, see :func:`~lightning_ssr.data.load_idx_dataset`).
            Default: ``"digits"``.
        protocol: ``"split"`` or ``"permuted"``. Default: ``"split"``.
        scenario: ``"task"``, ``"domain"`` or ``"class"``. Default: ``"task"``.
        n_tasks: number of experiences. Split: 2 or 5 (the classes divide evenly, at least two
            per task); Permuted: 1 to 100 (the literature uses 10 or 20). Default: ``None``
            (5 for Split, 10 for Permuted).
        seed: seeds the permutations and the subsets. Default: ``0``.
        data_dir: directory of the IDX files for ``"fmnist"``/``"mnist"``. Default: ``None``
            (the system package's directory, e.g. ``/usr/share/datasets/fashion-mnist``).
        train_subset: keep at most this many training samples per experience, drawn at random
            (seeded) with the classes balanced; ``None`` keeps all. Default: ``None``.
        test_subset: the same for the test stream. Default: ``None``.
        class_order: Split only: the order in which classes are grouped into tasks, a
            permutation of ``0..9``. Default: ``None`` (``0, 1, ..., 9``).
        cache_dir: where IDX files are laid out for torchvision. Default: ``None``
            (``~/.cache/lightning_ssr``).
        pad: zero pixels added on each side of every image before anything else (van de Ven &
            Tolias pad MNIST to 32x32 for Permuted: ``pad=2``, so permutations move 1024
            positions). Default: ``0``.
        download: download ``"fmnist"``/``"mnist"`` with torchvision when the files are missing
            (needs a network). Default: ``False``.

    Returns:
        A :class:`ContinualBenchmark`; its ``benchmark`` is an Avalanche benchmark whose
        mini-batches are ``(x, y, task_label)`` with ``x`` float32 ``[B, C, H, W]`` in ``[0, 1]``.

    Raises:
        ValueError / TypeError: an argument is not allowed; the message names it, the allowed
            values and the value received.
        DatasetNotFoundError: the IDX files of ``"fmnist"``/``"mnist"`` are missing.

    Example:
        >>> bench = make_benchmark("digits", "split", "task")
        >>> [exp.task_label for exp in bench.train_stream]
        [0, 1, 2, 3, 4]
        >>> [sorted(exp.classes_in_this_experience) for exp in bench.train_stream][:2]
        [[0, 1], [0, 1]]
        >>> perm = make_benchmark("digits", "permuted", "class", n_tasks=3, train_subset=50)
        >>> perm.n_classes, [len(exp.dataset) for exp in perm.train_stream]
        (30, [50, 50, 50])
    """
    check_choice("dataset", dataset, DATASETS)
    check_choice("protocol", protocol, PROTOCOLS)
    check_choice("scenario", scenario, SCENARIOS)
    check_int("seed", seed, 0, 2**63 - 1)
    check_int("train_subset", train_subset, 1, optional=True)
    check_int("test_subset", test_subset, 1, optional=True)
    check_int("pad", pad, 0, 64)
    n_tasks = stream_length(protocol, n_tasks)
    if protocol == "permuted" and class_order is not None:
        raise ValueError(f"`class_order` applies to protocol='split' only, got {class_order!r} with 'permuted'")

    data = load_dataset(dataset, data_dir=data_dir, cache_dir=cache_dir, download=download)
    if pad:
        data = TensorSplit(data.name, _pad(data.train_x, pad), data.train_y, _pad(data.test_x, pad), data.test_y)
    n_data_classes = data.n_classes
    if class_order is not None:
        order = list(class_order) if isinstance(class_order, Sequence) and not isinstance(class_order, str) else None
        if order is None or sorted(order) != list(range(n_data_classes)) or not all(
            isinstance(c, int) and not isinstance(c, bool) for c in order
        ):
            raise ValueError(
                f"`class_order` must be a permutation of 0..{n_data_classes - 1}, got {class_order!r}"
            )
    else:
        order = list(range(n_data_classes))

    gen = torch.Generator().manual_seed(seed)
    train_sets, test_sets, classes = [], [], []
    perms: list[Tensor] | None = None
    if protocol == "split":
        per_task = n_data_classes // n_tasks
        for t in range(n_tasks):
            group = order[t * per_task:(t + 1) * per_task]
            classes.append(tuple(group))
            position = torch.full((n_data_classes,), -1, dtype=torch.int64)
            position[torch.tensor(group)] = torch.arange(len(group))
            for x, y, subset, out in (
                (data.train_x, data.train_y, train_subset, train_sets),
                (data.test_x, data.test_y, test_subset, test_sets),
            ):
                idx = torch.isin(y, torch.tensor(group)).nonzero().squeeze(1)
                idx = idx[_pick(y[idx], subset, gen)]
                ys = y[idx]
                if scenario != "class":
                    ys = position[ys]
                task = t if scenario == "task" else 0
                out.append(_avalanche_dataset(x[idx], ys, task, None))
        n_classes = n_data_classes if scenario == "class" else per_task
    else:
        c, h, w = data.input_shape
        perms = [torch.arange(h * w)] + [torch.randperm(h * w, generator=gen) for _ in range(n_tasks - 1)]
        for t in range(n_tasks):
            classes.append(tuple(range(n_data_classes)))
            for x, y, subset, out in (
                (data.train_x, data.train_y, train_subset, train_sets),
                (data.test_x, data.test_y, test_subset, test_sets),
            ):
                if subset is None:
                    xs, ys = x, y  # shared by every task: no copy
                else:
                    idx = _pick(y, subset, gen)
                    xs, ys = x[idx], y[idx]
                if scenario == "class":
                    ys = ys + n_data_classes * t
                task = t if scenario == "task" else 0
                out.append(_avalanche_dataset(xs, ys, task, perms[t] if t > 0 else None))
        n_classes = n_data_classes * n_tasks if scenario == "class" else n_data_classes

    from avalanche.benchmarks import dataset_benchmark

    benchmark = dataset_benchmark(train_sets, test_sets)
    return ContinualBenchmark(
        benchmark=benchmark,
        dataset=dataset,
        protocol=protocol,
        scenario=scenario,
        n_tasks=n_tasks,
        n_classes=n_classes,
        input_shape=data.input_shape,
        seed=seed,
        classes_per_experience=tuple(classes),
        permutations=tuple(perms) if perms is not None else None,
    )
