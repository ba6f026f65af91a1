"""The SSR engine: activity sensing, set points, scaling, synaptic totals and consolidation.

Plain PyTorch: no Lightning or Avalanche import. The Lightning callback and the Avalanche plugin
drive one :class:`SSREngine` through four calls:

* :meth:`SSREngine.before_step` once gradients are final (after backward, DDP all-reduce and
  AMP unscaling), right before ``optimizer.step()``;
* :meth:`SSREngine.after_step` right after an optimizer step that really happened;
* :meth:`SSREngine.consolidate` at the end of each task;
* :meth:`SSREngine.penalty` where the front end owns the loss.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_ssr.core import rules
from lightning_ssr.core.config import SSRConfig
from lightning_ssr.core.layers import (
    DEFAULT_LAYER_TYPES,
    channel_dim,
    find_layers,
    find_output_layers,
    input_groups,
    num_neurons,
    weight_rows,
)

__all__ = ["ReduceFn", "LayerState", "SSREngine", "NonFiniteActivityWarning"]

#: Averages a float32 tensor across processes (identity on one process).
ReduceFn = Callable[[Tensor], Tensor]

_STATE_VERSION = 1
#: Per-neuron tensors every tracked layer keeps; all O(neurons), float32.
_FIELDS = ("acc", "activity", "set_point", "norm_target", "task_activity", "task_grad",
           "importance", "anchor", "factor")


class NonFiniteActivityWarning(RuntimeWarning):
    """An update was skipped because a tracked layer's activity was NaN or infinite."""


class LayerState:
    """The O(neurons) state of one tracked layer.

    Attributes:
        acc: sum of batch activities since the last update.
        activity: long-run activity (bias-corrected moving average, time constant ``tau``).
        set_point: per-neuron target activity (NaN until measured).
        norm_target: per-neuron set point of the incoming-weight norm (NaN until measured).
        task_activity / task_grad: sums over the current task, for importance.
        importance: accumulated importance over finished tasks.
        anchor: mean activity on the last finished task (the penalty's reference).
        factor: the last combined scale factor applied (for diagnostics).
    """

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.n = num_neurons(module)
        self.cdim = channel_dim(module)
        dev = module.weight.device
        zeros = lambda: torch.zeros(self.n, dtype=torch.float32, device=dev)  # noqa: E731
        nans = lambda: torch.full((self.n,), math.nan, dtype=torch.float32, device=dev)  # noqa: E731
        self.acc, self.activity, self.task_activity, self.task_grad = zeros(), zeros(), zeros(), zeros()
        self.importance, self.anchor = zeros(), zeros()
        self.set_point, self.norm_target = nans(), nans()
        self.factor = torch.ones(self.n, dtype=torch.float32, device=dev)
        self.acc_count = 0
        self.seen = 0
        self.task_steps = 0
        self.has_set_point = False
        self.has_norm_target = False
        self.gate: Optional[Tensor] = None
        self.consumer: Optional[tuple[nn.Module, int]] = None
        self.live: Optional[Tensor] = None

    @property
    def device(self) -> torch.device:
        return self.acc.device

    def to(self, device: torch.device) -> None:
        for f in _FIELDS:
            setattr(self, f, getattr(self, f).to(device))
        if self.gate is not None:
            self.gate = self.gate.to(device)

    def tensors(self) -> dict[str, Tensor]:
        return {f: getattr(self, f) for f in _FIELDS}


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
        self.config = config if config is not None else SSRConfig()
        self.phi = rules.activity_function(self.config.activity)
        self.layers: dict[str, LayerState] = {
            name: LayerState(name, m)
            for name, m in find_layers(model, layer_types, include, exclude, track_output).items()
        }
        #: Output layers left untracked: sensed (which unit wins the argmax) for importance only, so that
        #: the synapses into them can be protected by pre- and post-synaptic importance together.
        self.outputs: dict[str, LayerState] = {}
        if self.config.protect_output and self.config.gate_outgoing:
            self.outputs = {
                name: LayerState(name, m) for name, m in find_output_layers(model, layer_types).items()
                if name not in self.layers
            }
        self.reduce_fn = reduce_fn
        self.step = 0
        self.task_step = 0
        self.tasks = 0
        self.skipped = 0
        self._window = 0  # optimizer steps sensed since the last update
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._order_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._order: list[nn.Module] = []
        self._snapshots: dict[int, Tensor] = {}  # reused buffers: large fresh CPU allocations page-fault
        self._snapped: list[tuple[nn.Parameter, tuple[int, ...], Tensor]] = []  # this step's gate_cache entries
        #: Per gated parameter: its view shape and combined gate, rebuilt only when gates change.
        self._gate_cache: list[tuple[nn.Parameter, tuple[int, ...], Tensor]] = []
        self._consolidated: set[int] = set()  # ids of the parameters that existed at the last consolidation
        self._gated: list[tuple[nn.Parameter, list[tuple[str, LayerState, Optional[LayerState]]]]] = []

    # ------------------------------------------------------------------ hooks
    def attach(self) -> None:
        """Register the sensing hooks (idempotent)."""
        if self._hooks:
            return
        for st in self.layers.values():
            self._hooks.append(st.module.register_forward_hook(self._make_hook(st)))
        for st in self.outputs.values():
            self._hooks.append(st.module.register_forward_hook(self._make_hook(st, output_layer=True)))
        self._record_order()

    def detach(self) -> None:
        """Remove every hook; the model no longer refers to the engine."""
        for h in [*self._hooks, *self._order_hooks]:
            h.remove()
        self._hooks.clear()
        self._order_hooks.clear()
        self._snapshots.clear()
        self._snapped = []
        for st in self.layers.values():
            st.live = None

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def _all_states(self) -> list[LayerState]:
        return [*self.layers.values(), *self.outputs.values()]

    def _make_hook(self, st: LayerState, output_layer: bool = False) -> Callable[..., None]:
        cdim = st.cdim
        phi = (lambda z: torch.zeros_like(z).scatter_(cdim, z.argmax(cdim, keepdim=True), 1.0)) if output_layer else self.phi
        want_live = self.config.protection == "penalty" and self.config.consolidation > 0 and not output_layer

        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            if not (module.training and torch.is_grad_enabled()) or not isinstance(output, Tensor):
                return
            if output.device != st.device:
                st.to(output.device)
            st.acc.add_(rules.neuron_activity(output, phi, cdim))
            st.acc_count += 1
            if want_live and self.tasks > 0:
                a = phi(output.float().clone())  # an in-place activation may overwrite ``output`` next
                dims = [d for d in range(a.dim()) if d != (cdim % a.dim())]
                st.live = a.mean(dim=dims)

        return hook

    def _record_order(self) -> None:
        """Note the order in which Linear/Conv modules run on the next training forward, to find
        the layer that consumes each tracked layer's neurons (its outgoing weights)."""
        if self._order_hooks or not self.config.gate_outgoing:
            return
        self._order.clear()

        def pre(module: nn.Module, inputs: Any) -> None:
            if module.training:
                self._order.append(module)

        for m in self.model.modules():
            if isinstance(m, DEFAULT_LAYER_TYPES):
                self._order_hooks.append(m.register_forward_pre_hook(pre))

    def _resolve_consumers(self) -> None:
        if not self._order_hooks or not self._order:
            return
        for h in self._order_hooks:
            h.remove()
        self._order_hooks.clear()
        order = self._order
        for st in self.layers.values():
            st.consumer = None
            if st.module not in order:
                continue
            i = next(k for k, m in enumerate(order) if m is st.module)
            for m in order[i + 1:]:
                groups = input_groups(m, st.n)
                if groups is not None:
                    st.consumer = (m, groups)
                    break
        self._order = []
        self._build_gated()

    # ------------------------------------------------------------- protection
    @property
    def protecting(self) -> bool:
        """Whether important neurons are being protected (a task was consolidated)."""
        return self.tasks > 0 and self.config.consolidation > 0

    def _build_gated(self) -> None:
        """List, per parameter, the gates acting on it.

        A tracked layer's incoming weights and bias are gated by its neurons (``rows``); the
        weights of a tracked consumer by its producer's neurons too (``cols``); the output layer's
        weights (``protect_output``) by pre- and post-synaptic importance together (``hebb``), so
        that synapses into output units that past tasks never used (new classes) stay plastic.
        Parameters created after the last consolidation (a new task's head) are never gated.
        """
        groups: dict[int, tuple[nn.Parameter, list[tuple[str, LayerState, Optional[LayerState]]]]] = {}

        def add(p: Optional[nn.Parameter], kind: str, st: LayerState, other: Optional[LayerState] = None) -> None:
            if p is None or not p.requires_grad:
                return
            groups.setdefault(id(p), (p, []))[1].append((kind, st, other))

        tracked = {id(st.module): st for st in self.layers.values()}
        outputs = {id(st.module): st for st in self.outputs.values()}
        for st in self.layers.values():
            add(st.module.weight, "rows", st)
            add(getattr(st.module, "bias", None), "rows", st)
            if st.consumer is None or not self.config.gate_outgoing:
                continue
            cons = st.consumer[0]
            if id(cons.weight) not in self._consolidated:
                continue
            if id(cons) in tracked:
                add(cons.weight, "cols", st)
            elif id(cons) in outputs:
                add(cons.weight, "hebb", st, outputs[id(cons)])
        self._gated = list(groups.values())
        self._gate_cache = []
        if self.protecting and all(st.gate is not None for st in self.layers.values()):
            for p, views in self._gated:
                shape, gate = self._gate_of(p, views)
                self._gate_cache.append((p, shape, gate.to(device=p.device, dtype=p.dtype)))

    def _gate_of(self, p: nn.Parameter, views: list[tuple[str, LayerState, Optional[LayerState]]]) -> tuple[tuple[int, ...], Tensor]:
        """One view shape of ``p`` and one broadcastable gate combining all the gates on it."""
        lam = self.config.consolidation
        if all(kind == "rows" for kind, _, _ in views):
            st = views[0][1]
            shape = (st.n,) if p.dim() == 1 else (st.n, -1)
            return shape, st.gate.view(st.n, *([1] * (len(shape) - 1)))
        producer = next(st for kind, st, _ in views if kind != "rows")
        shape = (p.shape[0], producer.n, -1)
        gate = torch.ones((p.shape[0], producer.n, 1), dtype=torch.float32, device=producer.gate.device)
        for kind, st, other in views:
            if kind == "rows":
                gate = gate * st.gate.view(-1, 1, 1)
            elif kind == "cols":
                gate = gate * st.gate.view(1, -1, 1)
            else:  # hebb: a synapse between an important output unit and an important neuron
                post = other.importance.view(-1, 1, 1)
                gate = gate / (1.0 + lam * post * st.importance.view(1, -1, 1))
        return shape, gate

    def _refresh_gates(self) -> None:
        for st in self.layers.values():
            st.gate = rules.protection_gate(st.importance, self.config.consolidation)
        self._build_gated()

    # -------------------------------------------------------------- the steps
    def before_step(self) -> None:
        """Call once gradients are final, right before ``optimizer.step()``.

        Accumulates gradient-based importance, divides the gradients of protected neurons
        (``protection="gradient"``), or snapshots their weights (``protection="update"``).
        """
        self._resolve_consumers()
        cfg = self.config
        if cfg.importance == "activity_grad":
            with torch.no_grad():
                for st in self.layers.values():
                    g = st.module.weight.grad
                    if g is not None:
                        w = st.module.weight
                        st.task_grad.add_(weight_rows(w.detach() * g, st.module).abs().sum(1).float())
        if not self.protecting:
            return
        if any(gate.device != p.device for p, _, gate in self._gate_cache):
            self._build_gated()  # the model moved to another device
        with torch.no_grad():
            if cfg.protection == "gradient":
                for p, shape, gate in self._gate_cache:
                    if p.grad is not None:
                        p.grad.view(shape).mul_(gate)
            elif cfg.protection == "update":
                self._snapped = []
                for entry in self._gate_cache:
                    p = entry[0]
                    if p.grad is None:
                        continue
                    buf = self._snapshots.get(id(p))
                    if buf is None or buf.shape != p.shape or buf.device != p.device or buf.dtype != p.dtype:
                        buf = self._snapshots[id(p)] = torch.empty_like(p, memory_format=torch.contiguous_format)
                    buf.copy_(p.detach())
                    self._snapped.append(entry)

    def after_step(self) -> bool:
        """Call right after an optimizer step that really happened (not one AMP skipped).

        Applies the protection of the optimizer's update, then every ``update_every`` steps
        reduces the sensed activity across processes, updates long-run activity and set points,
        and rescales each neuron's incoming weights.

        Returns:
            Whether a homeostatic update was made this step (see :meth:`diagnostics`).
        """
        self._resolve_consumers()
        if self._snapped:
            self._gate_update()
        self.step += 1
        self.task_step += 1
        self._window += 1
        if self.step % self.config.update_every:
            return False
        return self._update()

    def _gate_update(self) -> None:
        """``p <- old + gate * (p - old)`` in one fused ``lerp`` per parameter."""
        with torch.no_grad():
            for p, shape, gate in self._snapped:
                old = self._snapshots[id(p)]
                torch.lerp(old.view(shape), p.view(shape), gate, out=p.view(shape))
        self._snapped = []

    def _update(self, scale: bool = True) -> bool:
        cfg = self.config
        steps, self._window = max(self._window, 1), 0
        active = [st for st in self._all_states() if st.acc_count > 0]
        if not active:
            return False
        means = torch.cat([st.acc / st.acc_count for st in active])
        if self.reduce_fn is not None:
            means = self.reduce_fn(means)
        for st in active:
            st.acc.zero_()
            st.acc_count = 0
        if not bool(torch.isfinite(means).all()):
            self.skipped += 1
            warnings.warn(
                f"SSR skipped update {self.step}: non-finite activity in a tracked layer "
                f"({self.skipped} skipped so far); no weight was changed",
                NonFiniteActivityWarning,
                stacklevel=3,
            )
            return False
        offset = 0
        scaling = scale and (cfg.scaling_rate > 0 or cfg.norm_rate > 0)
        warm = self.task_step > cfg.warmup_steps
        with torch.no_grad():
            for st in active:
                batch = means[offset:offset + st.n]
                offset += st.n
                st.seen += 1
                rules.ema_update(st.activity, batch, st.seen, cfg.tau / steps)
                st.task_activity.add_(batch, alpha=steps)
                st.task_steps += steps
                if st.name in self.outputs:
                    continue  # output layers are sensed for importance only
                set_point = self._set_point(st, warm)
                if scaling and warm:
                    st.factor = self._scale(st, set_point)
                elif scaling:
                    st.factor.fill_(1.0)
        return True

    def neuron_statistics(self) -> dict[str, dict[str, Tensor]]:
        """Per-neuron state of every tracked layer, as float32 CPU copies (for histograms).

        For each layer: ``activity`` (long-run), ``set_point`` (the layer's mean activity under
        ``set_point="layer_mean"``; NaN until measured), ``activity_minus_set_point``, ``factor``
        (the last scale factors applied to the incoming weights) and ``importance`` (accumulated
        over consolidated tasks). Identical on every process under DDP.
        """
        out: dict[str, dict[str, Tensor]] = {}
        for name, st in self.layers.items():
            activity = st.activity.detach().float().cpu()
            set_point = self._current_set_point(st).detach().float().cpu()
            out[name] = {
                "activity": activity,
                "set_point": set_point,
                "activity_minus_set_point": activity - set_point,
                "factor": st.factor.detach().float().cpu(),
                "importance": st.importance.detach().float().cpu(),
            }
        return out

    def diagnostics(self) -> dict[str, dict[str, Tensor]]:
        """Per-layer summaries of the last update, computed on demand (0-dim float32 tensors).

        ``activity``: mean long-run activity; ``deviation``: mean ``|activity - set point|``
        (NaN while set points are still being measured); ``factor_mean/min/max``: the last scale
        factors applied to incoming weights.
        """
        out: dict[str, dict[str, Tensor]] = {}
        for st in self.layers.values():
            out[st.name] = {
                "activity": st.activity.mean(),
                "deviation": (st.activity - self._current_set_point(st)).abs().mean(),
                "factor_mean": st.factor.mean(),
                "factor_min": st.factor.min(),
                "factor_max": st.factor.max(),
            }
        return out

    def _current_set_point(self, st: LayerState) -> Tensor:
        if self.config.set_point == "layer_mean":
            return st.activity.mean().expand_as(st.activity)
        return st.set_point

    def _set_point(self, st: LayerState, warm: bool) -> Tensor:
        sp = self.config.set_point
        if sp == "layer_mean":
            return st.activity.mean().expand_as(st.activity)
        if sp == "self":
            if warm and not st.has_set_point:
                st.set_point.copy_(st.activity)
                st.has_set_point = True
            return st.set_point
        if not st.has_set_point:
            st.set_point.fill_(float(sp))
            st.has_set_point = True
        return st.set_point

    def _scale(self, st: LayerState, set_point: Tensor) -> Tensor:
        cfg = self.config
        mod = st.module
        w = mod.weight
        factor = torch.ones_like(st.activity)
        if cfg.scaling_rate > 0 and (st.has_set_point or cfg.set_point == "layer_mean"):
            factor = rules.scaling_factor(st.activity, set_point, cfg.scaling_rate, cfg.max_change)
        if cfg.norm_rate > 0:
            norms = weight_rows(w.detach(), mod).float().norm(dim=1)
            if not st.has_norm_target:
                st.norm_target.copy_(norms)
                st.has_norm_target = True
            factor = factor * rules.norm_factor(norms, st.norm_target, cfg.norm_rate, cfg.max_change, cfg.eps)
            factor.clamp_(1.0 - cfg.max_change, 1.0 + cfg.max_change)
        w.view(st.n, -1).mul_(factor.to(w.dtype).unsqueeze(1))
        bias = getattr(mod, "bias", None)
        if cfg.scale_bias and bias is not None:
            bias.mul_(factor.to(bias.dtype))
        return factor

    # ---------------------------------------------------------- consolidation
    def consolidate(self) -> None:
        """End of a task: fold what the task used into per-neuron importance and set points.

        Importance grows by each neuron's use of the task (its mean activity, or ``|w * grad|``,
        relative to its layer); later tasks then protect it. With ``remeasure_set_points`` the
        next task measures new set points in its warm-up; the long-run activity restarts.
        """
        cfg = self.config
        if any(st.acc_count for st in self._all_states()):
            self._update(scale=False)  # fold in what was sensed since the last update
        with torch.no_grad():
            for st in self._all_states():
                if st.task_steps > 0:
                    by_grad = cfg.importance == "activity_grad" and st.name in self.layers
                    use = st.task_grad if by_grad else st.task_activity
                    rel = rules.relative_importance(use / st.task_steps, cfg.eps)
                    if cfg.accumulate == "sum":
                        st.importance.add_(rel)
                    else:
                        torch.maximum(st.importance, rel, out=st.importance)
                    st.anchor.copy_(st.task_activity / st.task_steps)
                st.task_activity.zero_()
                st.task_grad.zero_()
                st.task_steps = 0
                st.seen = 0
                if cfg.set_point == "self" and cfg.remeasure_set_points:
                    st.set_point.fill_(math.nan)
                    st.has_set_point = False
                if cfg.norm_rate > 0:
                    st.norm_target.copy_(weight_rows(st.module.weight.detach(), st.module).float().norm(dim=1))
                    st.has_norm_target = True
        self.tasks += 1
        self.task_step = 0
        self._consolidated = {id(p) for p in self.model.parameters()}
        self._refresh_gates()
        if self.attached:
            self._record_order()

    def penalty(self) -> Tensor:
        """Loss term keeping important neurons' activity near what they carried on past tasks.

        ``consolidation * sum_i importance_i * (a_i - anchor_i)^2`` over tracked neurons, with
        ``a_i`` the activity of the last training forward (differentiable). Zero before the first
        consolidation or when ``protection`` is not ``"penalty"``.
        """
        total: Optional[Tensor] = None
        if self.protecting and self.config.protection == "penalty":
            for st in self.layers.values():
                if st.live is None:
                    continue
                term = (st.importance.to(st.live.device) * (st.live - st.anchor) ** 2).mean()
                total = term if total is None else total + term
                st.live = None
        if total is None:
            return torch.zeros((), device=next(iter(self.layers.values())).device)
        return self.config.consolidation * total

    # ------------------------------------------------------------------ state
    def extra_state_bytes(self) -> int:
        """Bytes the engine stores beyond the model (all O(neurons))."""
        return sum(t.numel() * t.element_size() for st in self._all_states() for t in st.tensors().values())

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: counters and every per-neuron tensor."""
        return {
            "version": _STATE_VERSION,
            "step": self.step,
            "task_step": self.task_step,
            "tasks": self.tasks,
            "skipped": self.skipped,
            "window": self._window,
            "layers": {name: self._layer_state(st) for name, st in self.layers.items()},
            "outputs": {name: self._layer_state(st) for name, st in self.outputs.items()},
        }

    @staticmethod
    def _layer_state(st: LayerState) -> dict[str, Any]:
        return {**{k: v.detach().clone() for k, v in st.tensors().items()},
                "acc_count": st.acc_count, "seen": st.seen, "task_steps": st.task_steps,
                "has_set_point": st.has_set_point, "has_norm_target": st.has_norm_target}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the tracked layers must be the same."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"SSR state version {state.get('version')!r} is not supported (expected {_STATE_VERSION})")
        saved, ours = sorted(state["layers"]), sorted(self.layers)
        if saved != ours:
            raise ValueError(f"SSR state holds layers {saved}, but this model tracks {ours}")
        saved_out, our_out = sorted(state.get("outputs", {})), sorted(self.outputs)
        if saved_out != our_out:
            raise ValueError(f"SSR state holds output layers {saved_out}, but this model senses {our_out}")
        self.step, self.task_step = int(state["step"]), int(state["task_step"])
        self.tasks, self.skipped = int(state["tasks"]), int(state["skipped"])
        self._window = int(state["window"])
        for name, st in [*self.layers.items(), *self.outputs.items()]:
            s = state["layers"][name] if name in self.layers else state["outputs"][name]
            for f in _FIELDS:
                setattr(st, f, s[f].detach().clone().to(device=st.device, dtype=torch.float32))
            st.acc_count, st.seen, st.task_steps = int(s["acc_count"]), int(s["seen"]), int(s["task_steps"])
            st.has_set_point, st.has_norm_target = bool(s["has_set_point"]), bool(s["has_norm_target"])
        if self.tasks:
            self._consolidated = {id(p) for p in self.model.parameters()}
            self._refresh_gates()

    def named_parameters_gated(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters whose gradients or updates protection changes (for inspection)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        for p, _ in self._gated:
            yield names.get(id(p), "?"), p
