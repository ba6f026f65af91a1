"""The SSR engine: composes the mechanism's parts over one model.

Plain PyTorch: no Lightning or Avalanche import. The parts, each in its own module:

* :class:`~lightning_ssr.core.sensing.ActivitySensor`: forward hooks, per-neuron batch activity;
* :class:`~lightning_ssr.core.homeostasis.Homeostasis`: set points and multiplicative scaling;
* :class:`~lightning_ssr.core.consolidation.Consolidation`: importance at the end of each task;
* :class:`~lightning_ssr.core.protection.Protection`: gates on important neurons' updates;
* :class:`~lightning_ssr.core.topology.ConsumerFinder`: which layer reads each layer's neurons;
* :class:`~lightning_ssr.core.partial.PartialBatches`: a smaller last batch's step scaled down;
* :class:`~lightning_ssr.core.subspace.InputSubspace`: drift kept off past inputs' directions.

The Lightning callback and the Avalanche plugin drive one :class:`SSREngine` through four calls
(and report each training batch's size to ``engine.partial.observe``):

* :meth:`SSREngine.before_step` once gradients are final (after backward, DDP all-reduce and
  AMP unscaling), right before ``optimizer.step()``;
* :meth:`SSREngine.after_step` right after an optimizer step that really happened;
* :meth:`SSREngine.consolidate` at the end of each task;
* :meth:`SSREngine.penalty` where the front end owns the loss.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_ssr.core import rules
from lightning_ssr.core.anchoring import Anchoring
from lightning_ssr.core.config import SSRConfig
from lightning_ssr.core.consolidation import Consolidation
from lightning_ssr.core.homeostasis import Homeostasis
from lightning_ssr.core.layers import DEFAULT_LAYER_TYPES, find_layers, find_output_layers
from lightning_ssr.core.partial import PartialBatches
from lightning_ssr.core.persistence import engine_state, load_engine_state
from lightning_ssr.core.protection import Protection
from lightning_ssr.core.recycling import Recycling, trained_apart
from lightning_ssr.core.sensing import ActivitySensor, ReduceFn, check_sensed, split_means
from lightning_ssr.core.state import LayerState
from lightning_ssr.core.subspace import InputSubspace
from lightning_ssr.core.topology import ConsumerFinder

__all__ = ["ReduceFn", "LayerState", "SSREngine", "NonFiniteActivityWarning"]


class NonFiniteActivityWarning(RuntimeWarning):
    """An update was skipped because a tracked layer's activity was NaN or infinite."""


def _warn_non_finite(message: str) -> None:
    warnings.warn(message, NonFiniteActivityWarning, stacklevel=4)


class SSREngine:
    """Synaptic Scaling Regularization on the Linear/Conv layers of any ``nn.Module``.

    Only training forwards are sensed: the module in train mode with autograd enabled (an
    evaluation pass, or a ``torch.no_grad()`` probe, does not count as activity).

    The engine keeps, per neuron, float32 statistics of its activity (``phi`` of the layer's
    output averaged over batch and positions), a set point, an importance and a few sums: O(neurons)
    state, never O(weights). It changes weights only in place under ``torch.no_grad()``, so
    optimizers and DDP keep the same parameter objects.

    Args:
        model: the network whose layers are tracked.
        config: the hyperparameters. Default: ``SSRConfig()``.
        layer_types / include / exclude / track_output: which layers to track, see
            :func:`~lightning_ssr.core.layers.find_layers`.
        reduce_fn: averages a float32 tensor across processes so every replica applies the same
            update; ``None`` on one process. Default: ``None``.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> engine = SSREngine(net, SSRConfig(scaling_rate=0.5, set_point=0.1, warmup_steps=0, update_every=1))
        >>> engine.attach()
        >>> _ = net(torch.randn(16, 4))
        >>> engine.before_step()
        >>> engine.after_step()
        True
        >>> sorted(engine.diagnostics()["0"])
        ['activity', 'deviation', 'factor_max', 'factor_mean', 'factor_min']
        >>> engine.detach()
    """

    def __init__(
        self,
        model: nn.Module,
        config: SSRConfig | None = None,
        *,
        layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        track_output: bool = False,
        reduce_fn: ReduceFn | None = None,
    ) -> None:
        self.model = model
        self.config = cfg = config if config is not None else SSRConfig()
        self.phi = rules.activity_function(cfg.activity)
        self.layers: dict[str, LayerState] = {
            name: LayerState(name, m)
            for name, m in find_layers(model, layer_types, include, exclude, track_output).items()
        }
        #: Output layers left untracked: sensed (which unit wins the argmax) for importance only, so that
        #: the synapses into them can be protected by pre- and post-synaptic importance together.
        self.outputs: dict[str, LayerState] = {}
        if cfg.protect_output and cfg.gate_outgoing:
            self.outputs = {
                name: LayerState(name, m) for name, m in find_output_layers(model, layer_types).items()
                if name not in self.layers
            }
        self.reduce_fn = reduce_fn
        self.step = self.task_step = self.tasks = self.skipped = 0
        self._window = 0  # optimizer steps sensed since the last update
        self._checked = False
        self._sense_period = min(cfg.sense_every, cfg.update_every)  # at least once per update
        #: Reports a skipped update (non-finite activity); front ends may route it to their own logging.
        self.warn: Callable[[str], None] = _warn_non_finite
        penalty_mode = cfg.protection == "penalty" and cfg.consolidation > 0
        self.subspace = InputSubspace(cfg.subspace_share)
        self.sensor = ActivitySensor(self.layers, self.outputs, self.phi,
                                     keep_live=(lambda: self.tasks > 0) if penalty_mode else None,
                                     sense=lambda: self.task_step % self._sense_period == 0, count_targets=cfg.output_targets,
                                     observe_input=self.subspace.observe if self.subspace.enabled else None)
        if cfg.subspace_energy is not None:  # asked for by name: say which layers it cannot hold
            self.subspace.check(self.sensor.states())
        self.homeostasis = Homeostasis(cfg)
        self.consolidation = Consolidation(cfg)
        self.protection = Protection(cfg)
        self.anchoring = Anchoring(cfg.anchor_rate if cfg.protection == "anchor" else 0.0, cfg.anchor_lr)
        self.recycling = Recycling(cfg.recycle_below, cfg.recycle_outgoing)
        self.partial = PartialBatches(cfg.scale_partial_batches)
        self.consumers = ConsumerFinder(model, enabled=cfg.gate_outgoing)
        self._consolidated: set[int] = set()  # ids of the parameters that existed at the last consolidation
        #: Per layer name, the factor on its pull from this task's input overlap (``overlap_power``; empty: full pull).
        self.overlap: dict[str, float] = {}

    # ------------------------------------------------------------------ hooks
    def attach(self) -> None:
        """Register the sensing hooks (idempotent)."""
        if self.sensor.attached:
            return
        self._checked = False  # the first sensed step of each attachment checks what was sensed
        self.sensor.attach(self.model)
        self.consumers.record()

    def detach(self) -> None:
        """Remove every hook; the model no longer refers to the engine."""
        self.sensor.detach()
        self.consumers.stop()
        self.protection.release()

    @property
    def attached(self) -> bool:
        return self.sensor.attached

    def _resolve_consumers(self) -> None:
        if self.consumers.resolve(self.layers.values()):
            self._build_gates()

    # ------------------------------------------------------------- protection
    @property
    def protecting(self) -> bool:
        """Whether important neurons are being protected (a task was consolidated)."""
        return self.tasks > 0 and self.config.consolidation > 0

    def _build_gates(self) -> None:
        self.protection.build(self.layers, self.outputs, self._consolidated, self.protecting)

    def _refresh_gates(self) -> None:
        self.protection.refresh(self.layers, self.outputs, self._consolidated, self.protecting)

    # -------------------------------------------------------------- the steps
    def before_step(self) -> None:
        """Call once gradients are final, right before ``optimizer.step()``.

        Scales a partial batch's gradients (``scale_partial_batches``), accumulates gradient-based
        importance, divides the gradients of protected neurons (``protection="gradient"``), or
        snapshots their weights (``protection="update"``).
        """
        self.partial.before_step(self.model.parameters())
        self._resolve_consumers()
        if not self._checked and self.sensor.sensing:
            check_sensed(self.layers)  # refuses before the first step when nothing is sensed
            self._checked = True
        self.consolidation.observe_gradients(self.layers.values())
        if not self.protecting:
            return
        if self.protection.moved():
            self._build_gates()  # the model moved to another device
        self.protection.before_step()

    def after_step(self, optimizer: Optional[torch.optim.Optimizer] = None) -> bool:
        """Call right after an optimizer step that really happened (not one AMP skipped).

        Applies the protection of the optimizer's update, then every ``update_every`` steps
        reduces the sensed activity across processes, updates long-run activity and set points,
        and rescales each neuron's incoming weights.

        Args:
            optimizer: the optimizer of the step; its learning rates set the pull (``anchor_lr``).

        Returns:
            Whether a homeostatic update was made this step (see :meth:`diagnostics`).
        """
        self._resolve_consumers()
        self.partial.after_step()
        self.protection.after_step()
        self.step += 1
        self.task_step += 1
        self._window += 1
        due = self.task_step % self.config.protect_every == 0
        if due:  # the cache is empty while nothing is protected
            self.anchoring.pull(self.protection.cache, optimizer, steps=self.config.protect_every)
        else:
            self.anchoring.check(optimizer)
        self.sensor.follow()  # the hooks are registered for the steps that sense only
        updated = self.step % self.config.update_every == 0 and self._update()
        if due:  # last: the pull and the scaling move weights in every direction
            self._project()
        return updated

    def set_overlap(self, overlap: Mapping[str, float]) -> None:
        """Scale each named layer's pull (its weight's and bias's) by a factor in ``[0, 1]`` (``overlap_power``)."""
        self.overlap, states = dict(overlap), {**self.layers, **self.outputs}
        self.anchoring.set_scales({id(p): v for n, v in self.overlap.items() for p in states[n].module.parameters(False)})

    def _project(self) -> None:
        """Take the drift from the anchors out of the old inputs' span (input-subspace protection)."""
        if self.protecting and self.subspace.enabled:
            self.subspace.project(self.sensor.states(), self.anchoring.anchor_of, self.anchoring.lr_factor_of)

    def _update(self, scale: bool = True) -> bool:
        cfg = self.config
        steps, self._window = max(self._window, 1), 0
        names, energies = self.subspace.task_energies() if cfg.overlap_exponent and self.protecting else ([], None)
        flushed = self.sensor.flush(self.reduce_fn, energies)  # the energies summed with the activity, in place
        if flushed is None:
            return False
        if energies is not None:  # the same on every replica, so every replica pulls alike
            self.set_overlap(self.subspace.overlaps(names, energies, cfg.overlap_exponent))
        active, means = flushed
        if not bool(torch.isfinite(means).all()):
            self.skipped += 1
            bad = [st.name for st, m in split_means(active, means) if not bool(torch.isfinite(m).all())]
            self.warn(
                f"SSR skipped its update at optimizer step {self.step}: the activity of layer(s) {bad} is NaN "
                f"or infinite ({self.skipped} update(s) skipped so far); no weight was changed. The model's "
                "outputs there are not finite: lower the learning rate, clip gradients (e.g. "
                "Trainer(gradient_clip_val=1.0)), or check the inputs and the loss for NaN"
            )
            return False
        warm = self.task_step > cfg.warmup_steps
        if cfg.output_targets and self.protecting:
            self.protection.refresh_output_gates()  # they follow this task's targets so far
            self.subspace.follow_targets(self.outputs, cfg.subspace_unused_outputs)
        with torch.no_grad():
            for st, batch in split_means(active, means):
                st.seen += 1
                rules.ema_update(st.activity, batch, st.seen, cfg.tau / steps)
                st.task_activity.add_(batch, alpha=steps)
                st.task_steps += steps
                if st.name in self.outputs:
                    continue  # output layers are sensed for importance only
                self.homeostasis.step(st, warm, scale)
        return True

    # ------------------------------------------------------------ inspection
    def neuron_statistics(self) -> dict[str, dict[str, Tensor]]:
        """Per-neuron state of every tracked layer, as float32 CPU copies (for histograms): ``activity``
        (long-run), ``set_point`` (NaN until measured), ``activity_minus_set_point``, ``factor`` (the last
        scale factors) and ``importance`` (over consolidated tasks). Identical on every process under DDP."""
        return {name: self.homeostasis.statistics(st) for name, st in self.layers.items()}

    def diagnostics(self) -> dict[str, dict[str, Tensor]]:
        """Per-layer summaries of the last update, on demand (0-dim float32 tensors): ``activity`` (mean
        long-run), ``deviation`` (mean ``|activity - set point|``, NaN while set points are measured) and
        ``factor_mean/min/max`` (the last scale factors applied to incoming weights)."""
        return {name: self.homeostasis.summary(st) for name, st in self.layers.items()}

    def named_parameters_gated(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters whose gradients or updates protection changes (for inspection)."""
        names = self.param_names()
        return ((names.get(id(p), "?"), p) for p in self.protection.parameters())

    # ---------------------------------------------------------- consolidation
    def consolidate(self) -> None:
        """End of a task: fold what the task used into per-neuron importance and set points.

        Importance grows by each neuron's use of the task (its mean activity, or ``|w * grad|``,
        relative to its layer); later tasks then protect it. With ``remeasure_set_points`` the
        next task measures new set points in its warm-up; the long-run activity restarts.
        """
        if self.task_step % self.config.protect_every:
            self._project()  # the task ends projected whatever protect_every
        if self.sensor.pending():
            self._update(scale=False)  # fold in what was sensed since the last update
        apart = trained_apart(self.outputs.values())  # read before the fold resets the task's counts
        with torch.no_grad():
            for st in self.sensor.states():
                self.consolidation.fold(st, by_grad=self.consolidation.by_gradient and st.name in self.layers)
                self.homeostasis.new_task(st)
        self.tasks, self.task_step = self.tasks + 1, 0
        self.set_overlap({})  # the next task pulls in full until its inputs are measured
        self.partial.new_task()
        self.sensor.follow()
        self.recycling.after_task(self.layers.values(), self.model, self.tasks, self.config.recycle_shared_head,
                                  self.outputs.values(), apart)
        self._consolidated = {id(p) for p in self.model.parameters()}
        self._refresh_gates()
        free = not self.config.subspace_unused_outputs  # output units no finished task used stay free
        self.subspace.consolidate(self.sensor.states(), self.reduce_fn,
                                  {n: st.importance > 0 for n, st in self.outputs.items()} if free else None)
        if self.protecting:
            self.anchoring.set_anchors(self.protection.parameters())
        if self.attached:
            self.consumers.record()

    def penalty(self) -> Tensor:
        """Loss term keeping important neurons' activity near what they carried on past tasks.

        ``consolidation * sum_i importance_i * (a_i - anchor_i)^2`` over tracked neurons, with
        ``a_i`` the activity of the last training forward (differentiable). Zero before the first
        consolidation or when ``protection`` is not ``"penalty"``.
        """
        total = None
        if self.protecting and self.config.protection == "penalty":
            total = self.consolidation.penalty(self.layers.values())
        if total is None:
            return torch.zeros((), device=next(iter(self.layers.values())).device)
        return total

    # ------------------------------------------------------------------ state
    def extra_state_bytes(self) -> int:
        """Bytes the engine stores beyond the model: O(neurons), plus one copy of the gated
        weights with ``protection="anchor"`` and input-subspace protection's bases and sketches
        (O(inputs) per layer)."""
        per_neuron = sum(t.numel() * t.element_size() for st in self.sensor.states() for t in st.tensors().values())
        return per_neuron + self.anchoring.nbytes() + self.subspace.nbytes()

    def param_names(self) -> dict[int, str]:
        """``id(parameter)`` to its name in the model."""
        return {id(p): n for n, p in self.model.named_parameters()}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (:func:`~lightning_ssr.core.persistence.engine_state`)."""
        return engine_state(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (same tracked layers)."""
        load_engine_state(self, state)
