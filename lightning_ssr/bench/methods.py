"""The methods the benchmark compares, each with its hyperparameter candidates.

Baselines are Avalanche's own plugins inside Avalanche's ``Naive`` template (and Avalanche's
``PNNStrategy``); SSR runs as the Lightning callback through the stream runner (``ssr``) and as
the Avalanche plugin (``ssr-plugin``). Every method's first candidate is its default; a search
budget of ``k`` tries the first ``k`` candidates of every method alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from lightning_ssr.data.names import SCENARIOS

__all__ = ["METHODS", "SSR_BESIDE_REPLAY", "SSR_DEFAULTS", "Method", "method_names", "resolve_methods"]

#: SSR's benchmark settings: the library's defaults (chosen on Split and Permuted Fashion-MNIST,
#: see the README), so ``lightning-ssr bench`` measures what ``SynapticScaling()`` does.
SSR_DEFAULTS: dict[str, Any] = {}
#: SSR beside a replay buffer: rehearsal already holds the old tasks, so the pull is lighter. Chosen on
#: validation splits (``validation_benchmark``, 3 seeds, buffer 200; see the README): with anchor_rate
#: 0.02, digits class / domain 87.5 / 87.5 % (the default 0.1: 62.7 / 85.7; replay alone 83.9 / 86.5)
#: and Split Fashion-MNIST class 76.2 % (0.1: 74.6; replay alone 72.5).
#: It was chosen with output units weighed by their argmax wins (``output_targets=False``, the
#: default then) and without recycling, which it keeps: neither later default was measured beside replay.
#: Input-subspace protection (on by default) is off beside a ReplayPlugin: ``SSRPlugin`` leaves it out
#: there unless ``subspace_energy`` is given (it lowered class-incremental accuracy beside replay).
#: The pull after every step (``protect_every=1``): every second step (the default since) lost beside the
#: buffer on validation, digits class / domain 80.1 / 87.5 against 81.7 / 87.6 and Split Fashion-MNIST
#: class 74.4 against 74.8 (replay alone 80.3 / 87.2 / 71.3; ``choose_replay_rate.py --protect-every 1 2``).
#: On the test sets it helps on Split Fashion-MNIST class-IL (75.6 against replay's 73.8, 5 seeds) and not on digits
#: class-IL (89.1 against 89.6, 10 seeds): there the validation splits, a fifth of each task held out, measure
#: another regime (see benchmarks/RESULTS.md, "Beside replay on the test sets"). Without homeostatic scaling
#: (``scaling_rate=0``), the setting all of this was measured with; the one-sided scaling on by default since
#: was not measured beside replay.
SSR_BESIDE_REPLAY: dict[str, Any] = {"anchor_rate": 0.02, "output_targets": False, "recycle_below": 0.0,
                                     "protect_every": 1, "scaling_rate": 0.0}
#: The anchoring rate and the strength matter most (Split prefers more, Permuted less).
_SSR_GRID: tuple[dict[str, Any], ...] = (
    {},
    {"anchor_rate": 0.05},
    {"consolidation": 30.0},
    {"anchor_rate": 0.2},
)


#: Buffer sizes of replay, and of SSR beside replay (the same, so the two compare at equal memory).
_REPLAY_GRID: tuple[dict[str, Any], ...] = ({"mem_size": 200}, {"mem_size": 500}, {"mem_size": 100}, {"mem_size": 1000})


@dataclass(frozen=True)
class Method:
    """A benchmarked method.

    Attributes:
        name: the command-line name.
        runner: ``"avalanche"`` (an Avalanche strategy) or ``"lightning"`` (the stream runner).
        description: one line for the report.
        plugin: for Avalanche methods, the plugin to add to ``Naive`` (``None`` for plain Naive
            and for PNN, which is its own strategy).
        base: fixed keyword arguments of the plugin or of the SSR config.
        grid: hyperparameter candidates, merged over ``base``; the first is the default.
        scenarios: the scenarios it can run in.
        keeps_buffer: whether it stores past samples (replay).
        models: the networks (``--model``) it can train.
    """

    name: str
    runner: str
    description: str
    plugin: Optional[str] = None
    base: Mapping[str, Any] = field(default_factory=dict)
    grid: tuple[Mapping[str, Any], ...] = ({},)
    scenarios: tuple[str, ...] = SCENARIOS
    keeps_buffer: bool = False
    models: tuple[str, ...] = ("mlp", "cnn")

    @property
    def baseline(self) -> str:
        """The naive run of the same runner, against which wall time is compared."""
        return "naive" if self.runner == "avalanche" else "naive-lightning"

    def candidates(self, budget: int) -> list[dict[str, Any]]:
        """The first ``budget`` hyperparameter sets, each merged over :attr:`base`."""
        return [{**self.base, **g} for g in self.grid[:budget]]


def _ssr(name: str, description: str, runner: str = "lightning", **change: Any) -> Method:
    base = {**SSR_DEFAULTS, **change}
    grid = tuple({k: v for k, v in g.items() if k not in change} for g in _SSR_GRID)
    unique: list[dict[str, Any]] = []
    for g in grid:
        if g not in unique:
            unique.append(g)
    return Method(name, runner, description, plugin="ssr" if runner == "avalanche" else None, base=base, grid=tuple(unique))


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("naive", "avalanche", "Avalanche Naive: fine-tuning, no protection"),
        Method("naive-lightning", "lightning", "fine-tuning through the Lightning stream runner (time baseline of SSR)"),
        Method("ewc", "avalanche", "Avalanche EWCPlugin (separate penalties)", "ewc", {"mode": "separate"},
               ({"ewc_lambda": 1000.0}, {"ewc_lambda": 100.0}, {"ewc_lambda": 10000.0}, {"ewc_lambda": 10.0})),
        Method("online-ewc", "avalanche", "Avalanche EWCPlugin, online mode", "ewc", {"mode": "online", "decay_factor": 0.9},
               ({"ewc_lambda": 1000.0}, {"ewc_lambda": 100.0}, {"ewc_lambda": 10000.0}, {"ewc_lambda": 10.0})),
        Method("si", "avalanche", "Avalanche SynapticIntelligencePlugin", "si", {},
               ({"si_lambda": 1.0}, {"si_lambda": 10.0}, {"si_lambda": 0.1}, {"si_lambda": 100.0})),
        Method("mas", "avalanche", "Avalanche MASPlugin", "mas", {"alpha": 0.5},
               ({"lambda_reg": 1.0}, {"lambda_reg": 10.0}, {"lambda_reg": 0.1}, {"lambda_reg": 100.0})),
        Method("lwf", "avalanche", "Avalanche LwFPlugin (distillation)", "lwf", {"temperature": 2.0},
               ({"alpha": 1.0}, {"alpha": 10.0}, {"alpha": 0.1}, {"alpha": 3.0})),
        Method("replay", "avalanche", "Avalanche ReplayPlugin (a buffer of past samples)", "replay", {},
               _REPLAY_GRID, keeps_buffer=True),
        Method("pnn", "avalanche", "Avalanche PNNStrategy (a new column per task)", scenarios=("task",),
               models=("mlp",)),
        Method("joint", "avalanche", "upper bound: Avalanche's Cumulative strategy, each task trained on the union of "
               "every task so far, the last on all at once (van de Ven & Tolias 2019's offline)", keeps_buffer=True),
        _ssr("ssr", "SSR: the SynapticScaling Lightning callback"),
        _ssr("ssr-plugin", "SSR: the SSRPlugin inside Avalanche's Naive", runner="avalanche"),
        Method("ssr-replay", "avalanche", "SSRPlugin beside Avalanche's ReplayPlugin, the same buffer candidates as replay",
               "ssr+replay", SSR_BESIDE_REPLAY, _REPLAY_GRID, keeps_buffer=True),
        _ssr("ssr-update", "SSR ablation: gate important neurons' updates instead of anchoring (the earlier default)",
             protection="update"),
        _ssr("ssr-fixed-strength", "SSR ablation: one fixed strength, no capacity adaptation (the earlier default)",
             min_plasticity=0.0),
        _ssr("ssr-capacity", "SSR ablation: capacity-adaptive strength at 0.5 (each layer keeps half its plasticity)",
             min_plasticity=0.5),
        _ssr("ssr-fixed-pull", "SSR ablation: the anchoring pull fixed per step, not shrunk with a learning rate below "
             "1e-3 (the earlier default)", anchor_lr=None),
        _ssr("ssr-no-recycle", "SSR ablation: no recycling of unused neurons (the earlier default)", recycle_below=0.0),
        _ssr("ssr-recycle-shared", "SSR ablation: recycling after every task also where the tasks share a head (the "
             "earlier default)", recycle_shared_head=True),
        _ssr("ssr-recycle-zero", "SSR ablation: recycled neurons' outgoing weights set to zero, not kept (the "
             "earlier default)", recycle_outgoing="zero"),
        _ssr("ssr-full-partial", "SSR ablation: a smaller last batch takes a full optimizer step, not one scaled by "
             "its samples (the earlier behaviour)", scale_partial_batches=False),
        _ssr("ssr-every-step", "SSR ablation: the anchoring pull and the input-subspace projection after every "
             "optimizer step, not every second (the earlier default)", protect_every=1),
        _ssr("ssr-no-subspace", "SSR ablation: no input-subspace protection (the earlier default)", subspace_energy=0.0),
        _ssr("ssr-no-overlap", "SSR ablation: the anchoring pull in full on every task, not scaled by the task's input "
             "overlap (overlap_power=0, the earlier default)", overlap_power=0.0),
        _ssr("ssr-no-scaling", "SSR ablation: no homeostatic scaling (scaling_rate=0, the earlier default)",
             scaling_rate=0.0),
        _ssr("ssr-scaling-both", "SSR ablation: homeostatic scaling both ways, too active neurons scaled down too "
             "(scale_down=True, the proposal's symmetric rule)", scale_down=True),
        _ssr("ssr-norm", "SSR ablation: with synaptic-total (norm) homeostasis", norm_rate=0.05),
        _ssr("ssr-no-consolidation", "SSR ablation: no consolidation (nothing protected)", consolidation=0.0),
        _ssr("ssr-sum", "SSR ablation: importance summed over tasks, not saturating", accumulate="sum"),
        _ssr("ssr-layer-mean", "SSR ablation: layer-mean set points (load balancing)", set_point="layer_mean"),
        _ssr("ssr-gradient", "SSR ablation: protection on gradients, not anchoring", protection="gradient"),
        _ssr("ssr-no-outgoing", "SSR ablation: protect incoming weights only", gate_outgoing=False),
        _ssr("ssr-free-output", "SSR ablation: synapses into the output layer unprotected", protect_output=False),
        _ssr("ssr-output-wins", "SSR ablation: output units weighed by their argmax wins, not their targets "
             "(the earlier default)", output_targets=False),
    )
}

#: The methods of the default command: SSR against every baseline that runs in every scenario.
DEFAULT_METHODS: tuple[str, ...] = ("naive", "ewc", "online-ewc", "si", "mas", "lwf", "replay", "ssr", "ssr-plugin")
#: ``--methods all``: everything, ablations included.
ALL = "all"
#: SSR rows that are not one part switched: the other front end, and SSR combined with replay.
_NOT_ABLATIONS = ("ssr-plugin", "ssr-replay")
ABLATIONS = "ablations"


def method_names() -> list[str]:
    """Every method name, in the report's order."""
    return list(METHODS)


def resolve_methods(names: str, scenario: str, model: str = "mlp") -> list[Method]:
    """Parse ``--methods`` (comma-separated names, ``all``, ``ablations``) for a scenario and a network
    (``--model``); ``all`` names every method that can run both.

    The naive baseline of each runner used is added, so that every time ratio has its baseline in
    the same run.

    Raises:
        ValueError: an unknown method, or one that cannot run in ``scenario`` or train ``model``.

    Example:
        >>> [m.name for m in resolve_methods("ewc,ssr", "domain")]
        ['naive', 'naive-lightning', 'ewc', 'ssr']
        >>> resolve_methods("pnn", "class")
        Traceback (most recent call last):
        ...
        ValueError: method 'pnn' cannot run in the 'class' scenario (it needs one of ['task'])
        >>> resolve_methods("pnn", "task", model="cnn")
        Traceback (most recent call last):
        ...
        ValueError: method 'pnn' cannot train the 'cnn' model (it needs one of ['mlp'])
    """
    if not isinstance(names, str) or not names.strip():
        raise ValueError(f"`methods` must be comma-separated method names, got {names!r}")
    wanted: list[str] = []
    for raw in names.split(","):
        name = raw.strip()
        if name == ALL:
            wanted += [n for n, m in METHODS.items() if scenario in m.scenarios and model in m.models]
        elif name == ABLATIONS:
            wanted += ["ssr"] + [n for n in METHODS if n.startswith("ssr-") and n not in _NOT_ABLATIONS]
        elif name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose from {method_names()}, 'all' or 'ablations'")
        else:
            if scenario not in METHODS[name].scenarios:
                raise ValueError(
                    f"method {name!r} cannot run in the {scenario!r} scenario (it needs one of {list(METHODS[name].scenarios)})"
                )
            if model not in METHODS[name].models:
                raise ValueError(f"method {name!r} cannot train the {model!r} model (it needs one of {list(METHODS[name].models)})")
            wanted.append(name)
    runners = {METHODS[n].runner for n in wanted}
    baselines = [b for b in ("naive", "naive-lightning") if METHODS[b].runner in runners]
    ordered = [n for n in METHODS if n in set(wanted) | set(baselines)]
    return [METHODS[n] for n in ordered]
