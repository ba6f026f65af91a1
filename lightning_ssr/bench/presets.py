"""Published protocols as named presets of ``lightning-ssr bench`` (no torch import).

A preset fixes the data, network, optimizer and budget of a paper's protocol; any option given
beside it overrides that one value (``--preset vdv2019-permuted --tasks 20 --iterations 500``),
and the results record both the preset and what was changed.

Numbers from van de Ven & Tolias, "Three scenarios for continual learning" (2019,
arXiv:1904.07734), as their public code sets them (GMvandeVen/continual-learning, branch
``preprints``, ``param_values.py`` and ``main.py``; unchanged in ``params/param_values.py`` of the
2022 version): a 2-hidden-layer ReLU MLP, Adam (betas 0.9, 0.999), batch 128, no input
normalization. Split MNIST: 400 units, learning rate 0.001, 2000 iterations per task, 28x28
inputs. Permuted MNIST: 1000 units, learning rate 0.0001, 5000 iterations per task, 10
permutations of the images zero-padded to 32x32 (the first task unpermuted). Their upper bound
("offline") trains each task on the union of every task so far: the ``joint`` method, which the
presets add to the default methods.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lightning_ssr.bench.methods import DEFAULT_METHODS

__all__ = ["PRESETS", "Preset"]


@dataclass(frozen=True)
class Preset:
    """A published protocol.

    Attributes:
        name: the command-line name.
        description: one line for ``--help`` and the results.
        source: where the numbers come from.
        options: :class:`~lightning_ssr.bench.BenchOptions` fields and their values.
    """

    name: str
    description: str
    source: str
    options: Mapping[str, Any]


_VDV = ("van de Ven & Tolias 2019 (arXiv:1904.07734), GMvandeVen/continual-learning "
        "(branch preprints: param_values.py, main.py)")
#: The default methods and the upper bound the papers report beside them.
_WITH_JOINT = ",".join((*DEFAULT_METHODS, "joint"))

#: The presets, by name.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("vdv2019-split", "Split MNIST, 5 tasks: MLP 2x400, Adam lr 0.001, batch 128, 2000 iterations/task",
               _VDV, {"dataset": "mnist", "protocol": "split", "n_tasks": 5, "hidden": 400, "lr": 1e-3,
                      "batch_size": 128, "iterations": 2000, "pad": 0,
                      "methods": _WITH_JOINT}),
        Preset("vdv2019-permuted", "Permuted MNIST, 10 tasks (padded to 32x32): MLP 2x1000, Adam lr 0.0001, batch 128, "
               "5000 iterations/task", _VDV, {"dataset": "mnist", "protocol": "permuted", "n_tasks": 10, "hidden": 1000,
                                              "lr": 1e-4, "batch_size": 128, "iterations": 5000, "pad": 2,
                                              "methods": _WITH_JOINT}),
    )
}
