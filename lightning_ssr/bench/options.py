"""The options of ``lightning-ssr bench``, checked without importing torch (the command line
validates its arguments before it loads anything heavy)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from lightning_ssr.bench.methods import DEFAULT_METHODS, resolve_methods
from lightning_ssr.bench.presets import PRESETS
from lightning_ssr.data.names import DATASETS, PROTOCOLS, SCENARIOS

__all__ = ["CNN_CHANNELS", "MODELS", "BenchOptions", "available_cores"]

#: The networks ``lightning-ssr bench --model`` offers: van de Ven & Tolias's MLP, or a small CNN.
MODELS: tuple[str, ...] = ("mlp", "cnn")
#: The channels of the CNN's two convolutions (``--model cnn``), named in its tables and help.
CNN_CHANNELS: tuple[int, int] = (16, 32)


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity where the platform has one), at least 1.

    Example:
        >>> available_cores() >= 1
        True
    """
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class BenchOptions:
    """Everything ``lightning-ssr bench`` takes; see ``lightning-ssr bench --help``."""

    dataset: str = "digits"
    protocol: str = "split"
    scenarios: tuple[str, ...] = SCENARIOS
    n_tasks: Optional[int] = None
    methods: str = ",".join(DEFAULT_METHODS)
    seeds: int = 3
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    hidden: Optional[int] = None
    model: str = "mlp"
    data_dir: Optional[str] = None
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    search_budget: int = 3
    val_fraction: float = 0.2
    out: str = "bench_results"
    plots: bool = True
    progress: bool = True
    wandb: bool = False
    wandb_project: str = "lightning-ssr"
    workers: int = 1
    iterations: Optional[int] = None
    pad: int = 0
    download: bool = False
    preset: Optional[str] = None
    partial_batches_all: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_preset(cls, preset: str, **changes: Any) -> "BenchOptions":
        """A published protocol (:data:`~lightning_ssr.bench.presets.PRESETS`), with ``changes`` over it.

        Example:
            >>> opts = BenchOptions.from_preset("vdv2019-permuted", n_tasks=20)
            >>> opts.dataset, opts.n_tasks, opts.hidden_units, opts.lr, opts.iterations, opts.pad
            ('mnist', 20, 1000, 0.0001, 5000, 2)
        """
        if preset not in PRESETS:
            raise ValueError(f"`preset` must be one of {list(PRESETS)}, got {preset!r}")
        return cls(**{**PRESETS[preset].options, **changes, "preset": preset})

    def __post_init__(self) -> None:
        for name, value, allowed in (("dataset", self.dataset, DATASETS), ("protocol", self.protocol, PROTOCOLS),
                                     ("model", self.model, MODELS)):
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}")
        if isinstance(self.scenarios, str):
            self.scenarios = tuple(s.strip() for s in self.scenarios.split(",") if s.strip())
        for s in self.scenarios:
            if s not in SCENARIOS:
                raise ValueError(f"`scenario` must be one or more of {list(SCENARIOS)}, got {s!r}")
        if not self.scenarios:
            raise ValueError(f"`scenario` must be one or more of {list(SCENARIOS)}, got none")
        for name, low in (("seeds", 1), ("epochs", 1), ("batch_size", 1), ("search_budget", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"`lr` must be a positive number, got {self.lr!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"`workers` must be an int >= 1, got {self.workers!r}")
        if self.iterations is not None and (
                isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1):
            raise ValueError(f"`iterations` must be an int >= 1 or None (epochs decide), got {self.iterations!r}")
        if isinstance(self.pad, bool) or not isinstance(self.pad, int) or not 0 <= self.pad <= 64:
            raise ValueError(f"`pad` must be an int in [0, 64], got {self.pad!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"`preset` must be one of {list(PRESETS)}, got {self.preset!r}")
        if not isinstance(self.partial_batches_all, bool):
            raise TypeError(f"`partial_batches_all` must be a bool, got {self.partial_batches_all!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {self.val_fraction!r}")
        for s in self.scenarios:
            resolve_methods(self.methods, s, self.model)  # unknown methods, impossible scenarios or models fail here

    @property
    def hidden_units(self) -> int:
        """van de Ven & Tolias: 400 units for Split, 1000 for Permuted."""
        return self.hidden if self.hidden is not None else (400 if self.protocol == "split" else 1000)

    @property
    def budget(self) -> str:
        """The training budget per task in words, e.g. ``"2000 iterations/task"`` or ``"5 epochs/task"``."""
        return f"{self.iterations} iterations/task" if self.iterations is not None else f"{self.epochs} epochs/task"
