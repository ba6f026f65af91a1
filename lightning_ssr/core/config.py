"""The hyperparameters of the SSR mechanism, validated once for every front end."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from lightning_ssr.core.recycling import OUTGOING_RULES
from lightning_ssr.core.validation import check_bool, check_choice, check_int, check_number

__all__ = ["ActivityFn", "DEFAULT_OVERLAP_POWER", "DEFAULT_SUBSPACE_ENERGY", "SSRConfig"]

ActivityFn = Union[str, Callable[[torch.Tensor], torch.Tensor]]

_ACTIVITIES = ("relu", "abs", "square")
_SET_POINTS = ("self", "layer_mean")
_IMPORTANCES = ("activity", "activity_grad")
_PROTECTIONS = ("gradient", "update", "penalty", "anchor")
#: The input-subspace energy of ``SSRConfig(subspace_energy=None)`` with anchoring (see ``subspace_energy``).
DEFAULT_SUBSPACE_ENERGY = 0.6
#: The ``overlap_power`` of ``SSRConfig(overlap_power=None)`` with input-subspace protection on.
DEFAULT_OVERLAP_POWER = 3.0


@dataclass
class SSRConfig:
    """Hyperparameters of Synaptic Scaling Regularization, shared by every front end.

    Every field is checked when the config is built; an error names the field, what is allowed
    and what was received. A rate or strength of ``0`` switches its part of the mechanism off, so
    an ablation is one changed field.

    Args:
        activity: the firing-rate proxy ``phi`` applied to each tracked layer's output:
            ``"relu"``, ``"abs"``, ``"square"`` or a callable on tensors. Default: ``"relu"``.
        tau: time constant, in optimizer steps, of each neuron's long-run activity (an
            exponential moving average). Default: ``50.0``.
        update_every: every ``k`` optimizer steps, reduce the activity sensed over those steps
            across processes, update long-run activity and apply homeostatic scaling (homeostasis
            is slow; fewer updates cost less). Default: ``10``.
        sense_every: sense the training forwards of one optimizer step in ``k`` (the first of each task,
            then every ``k``-th; at least one per update): consecutive batches sample the same activity.
            ``1`` senses every step. Default: ``10``: on Split digits (3 seeds) task / domain / class
            97.7 / 84.9 / 20.9 % against 97.7 / 85.1 / 20.8 sensing every step, at a tenth of the cost.
        set_point: each neuron's target activity: a float (the proposal's ``a_target``),
            ``"self"`` (the neuron's own long-run activity at the end of the warm-up) or
            ``"layer_mean"`` (the mean long-run activity of its layer: load balancing).
            Default: ``"self"``.
        warmup_steps: optimizer steps of each task during which activity is measured but no
            scaling is applied; with ``set_point="self"`` the set points are taken at its end.
            Default: ``10``.
        scaling_rate: ``eta_scale`` of the scaling rule ``f_i = 1 + eta_scale * (s_i - a_i)``; ``0`` is
            off. Default: ``1.0`` (``0.1`` at first, ``0`` before; README, "Neurons that fall silent scale
            up"). Validation (3 seeds, up only), Permuted MNIST 10 / 20 class: 73.8 / 70.5 % at ``1.0``,
            73.3 / 70.1 at 0.5, 72.8 / 67.6 at 0.3, 69.6 / 55.8 at 0.1; other streams within 0.3.
        scale_down: also scale down neurons more active than their set point (the proposal's symmetric
            rule). ``False`` (the default): only those below it, up. Validation (3 seeds, rate 0.1):
            Permuted MNIST 10 / 20 class 69.6 / 55.8 % against 66.5 / 50.1 both ways (plain 36.5 / 28.9).
        norm_rate: rate at which each neuron's incoming-weight norm is pulled back to its set
            point (synaptic-total homeostasis); ``0`` disables it. Default: ``0.0``.
        max_change: bound on the fractional change of any weight in one update, in ``(0, 1)``.
            Default: ``0.01``.
        remeasure_set_points: with ``set_point="self"``, measure new set points in the warm-up
            of every task (``True``) or keep those of the first task (``False``). Default: ``True``.
        consolidation: strength ``lambda`` of the protection of important neurons; ``0``
            disables consolidation. Default: ``10.0``.
        min_plasticity: capacity-adaptive protection: each layer's strength is lowered from
            ``consolidation`` just enough that the layer keeps, averaged over its neurons, this
            fraction of its plasticity (``mean 1 / (1 + lambda * importance)``). A layer whose
            importance sits on few neurons keeps the full strength; one whose every neuron is
            important (every task uses every neuron) is protected less. ``0`` keeps one fixed
            strength. Default: ``0.6``, chosen on validation splits (``benchmarks/choose_defaults.py``,
            see the README): with it no validation stream fell below plain training (worst gap +0.1
            points over digits with 5 seeds and Fashion-MNIST with 3; digits task / domain 99.2 /
            79.1 % against 98.6 / 77.8 at one fixed strength, naive 99.2 / 78.0), at the cost of
            Fashion-MNIST class (21.2 against 23.5 %, naive 19.6); 0.5 and 0.55 reached -0.15 and
            -0.3, 0.65 and 0.7 -0.8 and -2.7 (digits class).
        recycle_below: plasticity recovery: at each task's end, re-initialize the incoming weights
            of every neuron whose importance (relative to its layer's mean of 1, over all finished
            tasks) is below this, so that it is free for the next task. ``0`` switches recycling
            off. Default: ``0.1``, chosen on validation splits (``benchmarks/choose_defaults.py``,
            see the README): digits task / domain / class 99.4 / 79.4 / 18.5 % against 99.2 / 79.1
            / 18.0 without (5 seeds; domain plasticity 97.6 against 95.4, naive 98.4), Split
            Fashion-MNIST task 98.8 against 97.6 and Permuted Fashion-MNIST (10 tasks) 72.1 against
            71.2 (3 seeds); it cost Split Fashion-MNIST domain and class (84.2 / 19.8 against 86.8 /
            21.4 %, naive 74.8 / 19.6; measured with ``recycle_outgoing="zero"``).
        recycle_outgoing: what a recycled neuron's outgoing weights become: ``"keep"`` (as they
            were) or ``"zero"`` (cut, AGS-CL: the new unit starts with no effect on the output).
            Default: ``"keep"``, chosen on validation splits (3 seeds; RESULTS.md, "Recycling keeps the
            outgoing weights"): Permuted MNIST 10 / 20 class-incremental at ``lr=1e-4`` 48.2 / 31.3 %
            against 38.7 / 23.2 with ``"zero"`` (plain 36.5 / 28.9): a cut unit gets no gradient
            until its zero weights regrow, about ``lr`` a step; level elsewhere (digits, 10 seeds,
            99.2 / 82.4 / 18.7 against 99.3 / 82.2 / 18.5) but Split Fashion-MNIST domain 91.1
            against 89.3 and class 21.5 against 24.8 (plain 19.6).
        recycle_shared_head: recycle after every task also where the tasks share the output head
            (every tracked layer feeds the same modules as at the last task's end: domain- and
            class-incremental). ``False``: with a shared head, recycle after the first task only,
            and not even then where the output layer has units the first task never used (a
            class-incremental head: validation, 3 seeds, Permuted MNIST 10 / 20 class 55.7 / 34.4
            against 53.1 / 32.3, the other streams level); a new head per task (task-incremental):
            after every task either way. Default: ``False``, chosen on validation splits: Split
            Fashion-MNIST domain 85.4 against 84.2 % (3 seeds), every other stream within 0.2 points
            (README, "Old classes free of the projection").
        importance: what makes a neuron important at the end of a task: ``"activity"`` (its
            mean activity relative to its layer) or ``"activity_grad"`` (its incoming
            ``|w * grad|`` relative to its layer). Default: ``"activity"``.
        accumulate: how importance gathers over tasks: ``"sum"`` (protection keeps growing with
            every task a neuron served) or ``"max"`` (it saturates at the neuron's largest use of any
            one task, leaving plasticity for later tasks). Default: ``"max"``.
        protection: how important neurons are protected: ``"gradient"`` (gradients of their
            incoming and outgoing weights divided by ``1 + lambda * importance``), ``"update"``
            (the optimizer's change to those weights divided likewise, which also holds under
            Adam), ``"penalty"`` (a loss term, only where the front end owns the loss) or
            ``"anchor"`` (updates run free; after each step every synapse is pulled toward its
            value at the last task's end by ``anchor_rate * (1 - gate)``: node-importance
            anchoring, one copy of the gated weights). Default: ``"anchor"``, chosen on validation
            splits (``benchmarks/choose_defaults.py``, see the README): it never fell more than
            0.4 points below plain training on eight digits and Fashion-MNIST streams, where
            ``"update"`` fell up to 6.5 points below.
        anchor_rate: with ``protection="anchor"``, the fraction of its distance to the anchor a
            fully protected synapse loses per optimizer step, in ``(0, 1]``. Default: ``0.1``.
        anchor_lr: the learning rate at and above which ``anchor_rate`` holds as is; below it the
            pull shrinks in proportion, ``anchor_rate * lr / anchor_lr`` per step, as AdamW's
            decoupled weight decay scales with the learning rate: Adam moves a weight by about
            ``lr`` a step, so at a small learning rate a fixed pull would hold protected synapses
            (and the new task's learning) ever closer to their anchors. Read from the optimizer's
            parameter groups at every step (schedulers are followed). ``None``: ``anchor_rate``
            per step whatever the learning rate. Default: ``1e-3``, chosen on validation splits
            (``benchmarks/anchor_rate_vs_lr.py``, README): Permuted MNIST at ``lr=1e-4`` (3 seeds) 79.4 %
            against 74.6 with the fixed pull (plain 79.3); digits at ``lr=3e-4`` (5 seeds) task / domain /
            class 98.4 / 78.5 / 18.0 against 98.1 / 79.8 / 18.4 fixed (plain 98.6 / 75.8 / 19.6). Scaling
            the pull up above ``anchor_lr`` lost on every digits stream at ``lr=3e-3``, so it does not.
            Input-subspace protection's projection shrinks alike (``W <- W - f (W - A) U U^T``,
            ``f = min(lr / anchor_lr, 1)``): class-incremental validation at ``lr=1e-4``, Permuted MNIST
            38.8 % against 35.6 (plain 36.5), digits 67.8 against 28.9 (plain 31.9).
        protect_every: anchoring's pull and the input-subspace projection every ``k``-th optimizer
            step of a task: the pull removes what ``k`` pulls in a row would (``1 - (1 - w) ** k``,
            at the learning rate of the step that pulls), the projection runs once more at the
            task's end, so finished tasks end exactly projected (a task's last ``task_step % k``
            steps get no pull). Both read and write every protected weight: ``k`` divides their
            cost. Default: ``2``, chosen on validation splits (see the README, "Every second
            step"): level with or above ``1`` on every stream but three task-incremental ones (0.1
            below), e.g. Split Fashion-MNIST domain 90.0 % against 87.7, plasticity within 2 points
            of plain training's; the projection every 4th step lost plasticity past that line.
        subspace_energy: input-subspace protection, with ``protection="anchor"``: each anchored
            layer keeps an orthonormal basis of the directions that carry this share of every past
            task's input energy (Gradient Projection Memory's criterion, from a Nystrom sketch of
            the task's inputs), and after every optimizer step its weights' drift from their
            anchors is taken out of that span (:mod:`~lightning_ssr.core.subspace`), so old inputs
            keep the outputs they were learned with, whatever the importance of the neurons that
            moved. In ``[0, 1)``; ``0`` switches it off. State: the bases, and during a task
            ``in_features x 64`` floats (the sketch) per layer. ``None`` (the default): 0.6 with
            ``protection="anchor"`` and consolidation on, off otherwise; ``SSRPlugin`` also leaves
            it off beside Avalanche's ``ReplayPlugin`` (see :attr:`subspace_share`). Chosen on
            validation splits (``benchmarks/choose_defaults.py``, 3-5 seeds; see the README): above
            or level with ``0`` on every stream (digits domain 82.2 % against 79.4, Split
            Fashion-MNIST domain 87.7 against 85.4, Permuted Fashion-MNIST 10 / 20 77.6 / 70.1
            against 72.6 / 64.5, Split MNIST task 99.1 against 97.3), plasticity within 2 points of
            plain training's everywhere; 0.8 held more on domain streams but cost plasticity
            (digits domain 94.0 against plain training's 98.4).
        overlap_power: with input-subspace protection, each layer's pull during a task is scaled by
            ``s = rho ** overlap_power``, ``rho`` the share of the task's input energy (sensed so far)
            inside the layer's basis over ``subspace_energy``, at most 1: where a task's inputs miss the
            old ones (Permuted streams) the pull lifts, where they overlap (Split streams) it stays.
            Below ``anchor_lr``, where the projection removes only ``f = lr / anchor_lr`` of the drift,
            the pull keeps ``s + (1 - f) (1 - s)``. Each task starts at the full pull until its first
            update. ``0``: off; ``None`` (the default): 3 with input-subspace protection, else 0. Chosen
            on validation (3 seeds; README, "A pull that follows the input overlap"): Permuted digits
            domain / class 83.3 / 86.9 % against 74.3 / 42.0 with ``0``; the lift shrinking below
            ``anchor_lr``: Permuted MNIST 10 class at ``lr=1e-4`` 58.0 % (plasticity 61.8) against 55.7
            (58.4) without it. Level or above elsewhere but Permuted Fashion-MNIST 20 (70.0 against
            71.7) and Split Fashion-MNIST domain (89.3 against 90.4).
        subspace_unused_outputs: with ``subspace_energy``, also project the drift of the output
            units that no finished task used (importance 0: the classes not seen yet). ``False``
            leaves them free, so new classes are learned as without it; ``True`` keeps them from
            answering old inputs too, which separates the classes of different tasks in one head
            without replay, at the cost of learning the new classes less well (and of replay's
            gains beside it). Default: ``False`` (see the README, "Input-subspace protection").
        gate_outgoing: also protect each neuron's outgoing weights (the consumer layer's
            input columns) where the consumer is a tracked layer. Default: ``True``.
        protect_output: also protect the synapses into the (untracked) output layer, each by the
            importance of both its ends: the hidden neuron's and the output unit's (how often it
            won the argmax on past tasks, relative to the layer: an output unit "fires" when it
            wins). Synapses into output units that no past task used (new classes) stay free, and
            a head created for a new task is never gated. Default: ``True``.
        output_targets: with ``protect_output``, output units are weighed by how often they are
            the *target* (read without labels from the sign of the loss gradient at the output:
            under cross-entropy each sample's one negative entry) instead of how often they win
            the argmax; a synapse into an output unit is gated and pulled only as much as the
            current task also trains toward the unit (its share of the task's targets so far,
            updated every ``update_every`` steps), and projected (``subspace_energy``) only if it
            does at all: the old classes' units are left free in a class-incremental stream, the
            shared units stay protected in a domain-incremental one. Default: ``True``, chosen on validation
            splits (README, "Old classes free of the projection"): freeing them from the projection
            too lifts Permuted MNIST 10 / 20 and Permuted digits class-incremental to 53.1 / 32.3 /
            92.3 % (48.2 / 31.3 / 89.0 projected; plain 36.5 / 28.9 / 9.9) and costs Split
            Fashion-MNIST class 1.6 (19.9, plain 19.6); weighing by argmax wins (``False``) fell
            6.1 points below plain training on digits class.
        scale_partial_batches: an optimizer step on fewer samples than the task's largest step
            (a smaller last batch of an epoch, ``drop_last=False``) counts in proportion to its
            samples: its gradients and then the optimizer's change to every trainable parameter are
            both multiplied by ``n / N`` (:mod:`~lightning_ssr.core.partial`). Adam moves a weight by
            about the learning rate whatever the batch size, and protection leaves the new task in a
            narrow space near its anchors, so a full-size step on a few samples undoes part of it.
            Front ends report batch sizes (the callback reads them with Lightning's
            ``extract_batch_size``; the plugin counts Avalanche's minibatch). Under DDP each process
            scales by its own batch, which Lightning's ``DistributedSampler`` keeps the same on every
            process. Default: ``True``, chosen on validation splits (``python benchmarks/choose_defaults.py
            --candidates '{"default": {}, "no-partial": {"scale_partial_batches": false}}'``, every stream,
            5 seeds on digits, 3 elsewhere; see the README): Permuted Fashion-MNIST 10 / 20 / 10 at 5,000
            images a task 72.6 / 64.5 / 67.9 % against 71.8 / 63.9 / 67.3 (naive 59.6 / 48.7 / 58.0), digits
            task / domain / class 99.4 / 79.4 / 18.0 against 99.4 / 79.5 / 18.4 (naive 99.2 / 78.0 / 17.7),
            Split Fashion-MNIST unchanged (no partial batch there), Permuted MNIST 79.2 against 79.3
            (naive 79.3).
        scale_bias: scale a neuron's bias with its incoming weights. Default: ``True``.
        eps: numerical floor for divisions. Default: ``1e-8``.

    Example:
        >>> cfg = SSRConfig(scaling_rate=0.01, consolidation=5.0)
        >>> cfg.tau
        50.0
        >>> SSRConfig(tau=0.5)
        Traceback (most recent call last):
        ...
        ValueError: `tau` must be in [1.0, inf], got 0.5
    """

    activity: ActivityFn = "relu"
    tau: float = 50.0
    update_every: int = 10
    sense_every: int = 10
    set_point: Union[str, float] = "self"
    warmup_steps: int = 10
    scaling_rate: float = 1.0
    scale_down: bool = False
    norm_rate: float = 0.0
    max_change: float = 0.01
    remeasure_set_points: bool = True
    consolidation: float = 10.0
    min_plasticity: float = 0.6
    recycle_below: float = 0.1
    recycle_shared_head: bool = False
    recycle_outgoing: str = "keep"
    importance: str = "activity"
    accumulate: str = "max"
    protection: str = "anchor"
    anchor_rate: float = 0.1
    anchor_lr: Optional[float] = 1e-3
    protect_every: int = 2
    subspace_energy: Optional[float] = None
    subspace_unused_outputs: bool = False
    overlap_power: Optional[float] = None
    gate_outgoing: bool = True
    protect_output: bool = True
    output_targets: bool = True
    scale_partial_batches: bool = True
    scale_bias: bool = True
    eps: float = field(default=1e-8)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def subspace_share(self) -> float:
        """The input-subspace energy in effect: ``subspace_energy`` where it is set; where it is
        ``None``, :data:`DEFAULT_SUBSPACE_ENERGY` with ``protection="anchor"`` and consolidation on,
        else ``0`` (off).

        Example:
            >>> SSRConfig().subspace_share, SSRConfig(protection="update").subspace_share
            (0.6, 0.0)
            >>> SSRConfig(subspace_energy=0.0).subspace_share
            0.0
        """
        if self.subspace_energy is not None:
            return float(self.subspace_energy) if self.consolidation > 0 else 0.0
        return DEFAULT_SUBSPACE_ENERGY if self.protection == "anchor" and self.consolidation > 0 else 0.0

    @property
    def overlap_exponent(self) -> float:
        """The ``overlap_power`` in effect: where it is ``None``, :data:`DEFAULT_OVERLAP_POWER` with
        input-subspace protection on, else ``0`` (the pull is not scaled).

        Example:
            >>> SSRConfig().overlap_exponent, SSRConfig(subspace_energy=0.0).overlap_exponent
            (3.0, 0.0)
        """
        if self.overlap_power is not None:
            return float(self.overlap_power)
        return DEFAULT_OVERLAP_POWER if self.subspace_share > 0 else 0.0

    @classmethod
    def from_kwargs(cls, config: SSRConfig | None = None, **kwargs: Any) -> SSRConfig:
        """Build a config from an optional base and keyword overrides, rejecting unknown keys.

        Example:
            >>> SSRConfig.from_kwargs(scaling_rate=0.1).scaling_rate
            0.1
            >>> SSRConfig.from_kwargs(rate=0.1)
            Traceback (most recent call last):
            ...
            TypeError: Unexpected keyword arguments: ['rate']; SSR hyperparameters are: [...]
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(k for k in kwargs if k not in names)
        if unknown:
            raise TypeError(f"Unexpected keyword arguments: {unknown}; SSR hyperparameters are: {names}")
        if config is not None and not isinstance(config, SSRConfig):
            raise TypeError(f"`config` must be an SSRConfig or None, got {type(config).__name__}")
        base = dataclasses.asdict(config) if config is not None else {}
        if config is not None:
            base["activity"] = config.activity  # asdict would not copy a callable faithfully
        base.update(kwargs)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dictionary (a callable activity is written by its name)."""
        out = dataclasses.asdict(self)
        if callable(self.activity):
            out["activity"] = getattr(self.activity, "__name__", repr(self.activity))
        return out

    def replace(self, **changes: Any) -> SSRConfig:
        """A copy with some fields changed (validated again)."""
        return SSRConfig.from_kwargs(self, **changes)


def _validate(cfg: SSRConfig) -> None:
    """Refuse a bad value, naming the argument, what is allowed and what was given."""
    if not callable(cfg.activity):
        check_choice("activity", cfg.activity, _ACTIVITIES)
    check_number("tau", cfg.tau, 1.0)
    cfg.tau = float(cfg.tau)
    check_int("update_every", cfg.update_every, 1)
    check_int("sense_every", cfg.sense_every, 1)
    if isinstance(cfg.set_point, str):
        check_choice("set_point", cfg.set_point, _SET_POINTS)
    else:
        check_number("set_point", cfg.set_point, 0.0)
    check_int("warmup_steps", cfg.warmup_steps, 0)
    check_number("scaling_rate", cfg.scaling_rate, 0.0, 10.0)
    check_number("norm_rate", cfg.norm_rate, 0.0, 1.0)
    check_number("max_change", cfg.max_change, 0.0, 1.0, low_open=True, high_open=True)
    check_number("consolidation", cfg.consolidation, 0.0)
    check_number("min_plasticity", cfg.min_plasticity, 0.0, 1.0, high_open=True)
    check_number("recycle_below", cfg.recycle_below, 0.0)
    check_choice("recycle_outgoing", cfg.recycle_outgoing, OUTGOING_RULES)
    check_choice("importance", cfg.importance, _IMPORTANCES)
    check_choice("accumulate", cfg.accumulate, ("sum", "max"))
    check_choice("protection", cfg.protection, _PROTECTIONS)
    check_number("anchor_rate", cfg.anchor_rate, 0.0, 1.0, low_open=True)
    if cfg.anchor_lr is not None:
        check_number("anchor_lr", cfg.anchor_lr, 0.0, low_open=True)
    check_int("protect_every", cfg.protect_every, 1)
    if cfg.subspace_energy is not None:
        check_number("subspace_energy", cfg.subspace_energy, 0.0, 1.0, high_open=True)
        if cfg.subspace_energy > 0 and cfg.protection != "anchor":
            raise ValueError(f"`subspace_energy={cfg.subspace_energy:g}` projects the drift from the anchors, so it "
                             f"needs protection=\"anchor\", got protection={cfg.protection!r}")
    check_number("eps", cfg.eps, 0.0, 1.0, low_open=True)
    for flag in ("scale_down", "subspace_unused_outputs", "remeasure_set_points", "gate_outgoing", "protect_output",
                 "scale_bias", "output_targets", "recycle_shared_head", "scale_partial_batches"):
        check_bool(flag, getattr(cfg, flag))
    if cfg.overlap_power is not None:
        check_number("overlap_power", cfg.overlap_power, 0.0)
        if cfg.overlap_power > 0 and cfg.subspace_share == 0:
            raise ValueError(f"`overlap_power={cfg.overlap_power:g}` measures a task's inputs against input-subspace "
                             f"protection's bases, which is off here (subspace_energy={cfg.subspace_energy}, "
                             f"protection={cfg.protection!r}, consolidation={cfg.consolidation:g}): set "
                             "subspace_energy in (0, 1) with protection=\"anchor\" and consolidation > 0, or "
                             "overlap_power=0")
    if cfg.subspace_unused_outputs and cfg.subspace_share == 0:
        raise ValueError("`subspace_unused_outputs=True` widens input-subspace protection, which is off here "
                         f"(subspace_energy={cfg.subspace_energy}, protection={cfg.protection!r}, "
                         f"consolidation={cfg.consolidation:g}): set subspace_energy in (0, 1) with "
                         "protection=\"anchor\" and consolidation > 0")


def config_from_mapping(values: Mapping[str, Any]) -> SSRConfig:
    """Build an :class:`SSRConfig` from a mapping, e.g. one read back from JSON."""
    return SSRConfig.from_kwargs(**dict(values))
