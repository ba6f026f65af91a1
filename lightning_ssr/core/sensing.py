"""Activity sensing: forward hooks that measure each neuron's batch activity.

Part 1 of the mechanism. A hook on every tracked layer adds ``phi(z)``, averaged over the batch
and positions, to the layer's accumulator; :meth:`ActivitySensor.flush` turns what was summed
since the last update into one flat float32 tensor of per-neuron means, averaged across processes.
The hooks are registered only for the optimizer steps that sense (one in ``sense_every``): the
other steps' forwards run without them. Output layers are sensed too, with "fires when it wins
the argmax" as their activity, and with ``output_targets`` also by how often each unit is the
target (the one entry per sample where the loss gradient at the output is negative, as under
cross-entropy) and which units the gradient reached at all, counted in a gradient hook.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_ssr.core import rules
from lightning_ssr.core.state import LayerState

__all__ = ["ActivitySensor", "ReduceFn", "check_sensed", "split_means"]

#: Averages a float32 tensor across processes (identity on one process).
ReduceFn = Callable[[Tensor], Tensor]


class ActivitySensor:
    """Forward hooks on the tracked (and output) layers, and the flush of what they sensed.

    Only training forwards are sensed: the module in train mode with autograd enabled.

    Args:
        layers: the tracked layers' states (hooked with ``phi``).
        outputs: the untracked output layers' states (hooked with :func:`~lightning_ssr.core.rules.winner_counts`).
        phi: the firing-rate proxy.
        keep_live: keep each tracked layer's differentiable activity of the last forward (for a
            loss-side penalty) once ``keep_live()`` returns true.
        sense: whether this step's forwards are sensed, asked at each forward (the engine senses
            one optimizer step in ``sense_every``); ``None`` senses every forward.
        observe_input: called with each hooked layer and its input on the sensed forwards
            (:class:`~lightning_ssr.core.subspace.InputSubspace` reads a few rows).
        count_targets: also count, on the output layers, how often each unit is the target
            (:func:`~lightning_ssr.core.rules.target_counts`, in a gradient hook) and which units
            the loss gradient reached (:func:`~lightning_ssr.core.rules.gradient_reach`); the counts
            travel in the same flush and add up in each output state's ``targets`` and ``reached``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> sensor = ActivitySensor({"0": LayerState("0", net[0])}, {}, torch.relu)
        >>> sensor.attach()
        >>> _ = net(torch.randn(5, 4))
        >>> active, means = sensor.flush(None)
        >>> [st.name for st in active], means.shape
        (['0'], torch.Size([3]))
        >>> sensor.detach()
    """

    def __init__(
        self,
        layers: dict[str, LayerState],
        outputs: dict[str, LayerState],
        phi: Callable[[Tensor], Tensor],
        keep_live: Optional[Callable[[], bool]] = None,
        sense: Optional[Callable[[], bool]] = None,
        count_targets: bool = False,
        observe_input: Optional[Callable[[LayerState, Tensor], None]] = None,
    ) -> None:
        self.layers = layers
        self.outputs = outputs
        for st in outputs.values():
            st.count_targets = count_targets
        self.phi = phi
        self.keep_live = keep_live
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._hook_fns: list[tuple[nn.Module, Callable[..., None]]] = []  # built once per attachment
        self._attached = False
        self._sense = sense
        self.observe_input = observe_input

    @property
    def sensing(self) -> bool:
        """Whether the hooks sense the forwards of this step (``sense()``; always without one)."""
        return self._sense is None or self._sense()

    @property
    def attached(self) -> bool:
        return self._attached

    def attach(self, model: Optional[nn.Module] = None) -> None:
        """Start sensing (idempotent): the hooks are registered for the steps that sense (:meth:`follow`);
        with ``model``, first check that each layer is still the model's module of that name, with the
        width its state was made for."""
        if self._attached:
            return
        for st in self.layers.values():  # output layers may grow (Avalanche's incremental heads): not checked
            st.check_width(model)  # a resized or replaced tracked layer fails here, naming itself
        self._attached = True
        self._hook_fns = [(st.module, self._make_hook(st)) for st in self.layers.values()]
        self._hook_fns += [(st.module, self._make_hook(st, output_layer=True)) for st in self.outputs.values()]
        self.follow()

    def follow(self) -> None:
        """Register the hooks when this step's forwards are sensed (or live activity may be kept), remove
        them otherwise; the owner calls it whenever its step count changes. A module without hooks runs
        torch's fast call path: nine steps in ten cost nothing in the forward."""
        if not self._attached:
            return
        wanted = self.keep_live is not None or self.sensing
        if wanted and not self._hooks:
            self._hooks = [module.register_forward_hook(fn) for module, fn in self._hook_fns]
        elif not wanted and self._hooks:
            self._remove_hooks()

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def detach(self) -> None:
        """Remove the hooks and drop any live activity."""
        self._attached = False
        self._remove_hooks()
        for st in self.layers.values():
            st.live = None

    def _make_hook(self, st: LayerState, output_layer: bool = False) -> Callable[..., None]:
        cdim = st.cdim
        phi = self.phi
        keep_live = None if output_layer else self.keep_live

        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            if not (module.training and torch.is_grad_enabled()) or not isinstance(output, Tensor):
                return
            live = keep_live is not None and keep_live()
            sensing = self.sensing
            if not (sensing or live):
                return
            if output.device != st.device:
                st.to(output.device)
            if sensing:
                st.acc.add_(rules.winner_counts(output, cdim) if output_layer else rules.neuron_activity(output, phi, cdim))
                st.acc_count += 1
                if self.observe_input is not None and inputs and isinstance(inputs[0], Tensor):
                    self.observe_input(st, inputs[0])
                if output_layer and st.count_targets and output.requires_grad:
                    def count_targets(grad: Tensor) -> None:  # reads the gradient, returns nothing
                        st.target_acc.add_(rules.target_counts(grad, cdim))
                        st.reach_acc.add_(rules.gradient_reach(grad, cdim))

                    output.register_hook(count_targets)
            if live:  # the penalty needs this step's differentiable activity, sensed or not
                a = phi(output.float().clone())  # an in-place activation may overwrite ``output`` next
                dims = [d for d in range(a.dim()) if d != (cdim % a.dim())]
                st.live = a.mean(dim=dims)

        return hook

    def states(self) -> list[LayerState]:
        """Tracked layers, then output layers."""
        return [*self.layers.values(), *self.outputs.values()]

    def pending(self) -> bool:
        """Whether anything was sensed since the last flush."""
        return any(st.acc_count for st in self.states())

    def flush(self, reduce_fn: Optional[ReduceFn], extra: Optional[Tensor] = None
              ) -> Optional[tuple[list[LayerState], Tensor]]:
        """The mean batch activity of every neuron since the last flush, and reset the sums.

        Args:
            reduce_fn: averages a flat float32 tensor across processes (``None`` on one process).
            extra: a flat float32 tensor of the caller's to average in the same collective: it is
                overwritten in place with its average (left as is when nothing was sensed).

        Returns:
            The layers that sensed something and one flat float32 tensor of their per-neuron
            means (reduced across processes by ``reduce_fn``: one collective for all layers), or
            ``None`` when nothing was sensed.
        """
        active = [st for st in self.states() if st.acc_count > 0]
        if not active:
            return None
        counting = [st for st in self.outputs.values() if st.count_targets]
        parts = [st.acc / st.acc_count for st in active] + [t for st in counting for t in (st.target_acc, st.reach_acc)]
        flat = torch.cat(parts + ([] if extra is None else [extra.to(parts[0].device)]))
        if reduce_fn is not None:
            flat = reduce_fn(flat)  # one collective for the activity, the targets and the caller's sums alike
        size = sum(st.n for st in active)
        if extra is not None:
            extra.copy_(flat[flat.numel() - extra.numel():])
            flat = flat[:flat.numel() - extra.numel()]
        offset = size
        for st in counting:  # each counting layer's targets, then its reach
            st.targets.add_(flat[offset:offset + st.n])
            st.reached.add_(flat[offset + st.n:offset + 2 * st.n])
            offset += 2 * st.n
            st.target_acc.zero_()
            st.reach_acc.zero_()
        for st in active:
            st.acc.zero_()
            st.acc_count = 0
        return active, flat[:size]


def split_means(active: Sequence[LayerState], means: Tensor) -> list[tuple[LayerState, Tensor]]:
    """Pair each layer with its slice of the flat tensor :meth:`ActivitySensor.flush` returns.

    Example:
        >>> a, b = LayerState("a", nn.Linear(2, 2)), LayerState("b", nn.Linear(2, 3))
        >>> [(st.name, m.tolist()) for st, m in split_means([a, b], torch.arange(5.0))]
        [('a', [0.0, 1.0]), ('b', [2.0, 3.0, 4.0])]
    """
    out, offset = [], 0
    for st in active:
        out.append((st, means[offset:offset + st.n]))
        offset += st.n
    return out


def check_sensed(layers: Mapping[str, LayerState]) -> None:
    """The first sensed training step: refuse to go on when no tracked layer ran its forward (SSR would
    silently do nothing), and warn about those that did not.

    Raises:
        RuntimeError: no tracked layer was sensed, before any weight is changed.

    Example:
        >>> st = LayerState("0", nn.Linear(2, 2))
        >>> check_sensed({"0": st})
        Traceback (most recent call last):
        ...
        RuntimeError: SSR sensed none of the tracked layers ['0'] in the first training step: ...
    """
    silent = [name for name, st in layers.items() if st.acc_count == 0]
    if silent and len(silent) == len(layers):
        raise RuntimeError(
            f"SSR sensed none of the tracked layers {silent} in the first training step: their forward hooks "
            "never ran, so SSR would do nothing. Causes: the layers are called through torch.nn.functional "
            "or another module's forward, the model is compiled in a way that skips module hooks "
            "(torch.compile(fullgraph=True)), or the training forward ran in eval mode or under no_grad. "
            "Call the layers as modules, compile without fullgraph, or select other layers with `include`"
        )
    if silent:
        warnings.warn(
            f"SSR did not sense the tracked layers {silent} in the first training step (their forward did not "
            "run): they are protected and scaled only from the steps in which they run. If they are never "
            "called as modules, leave them out with `exclude`", stacklevel=4)
