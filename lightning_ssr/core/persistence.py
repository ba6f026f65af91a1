"""Saving and restoring an :class:`~lightning_ssr.core.engine.SSREngine`'s state, for exact resume.

Everything the engine changes over training (counters, every per-neuron tensor, the anchors, the
input-subspace bases) goes into one dictionary of tensors and numbers; loading it checks that it
was made for the same tracked layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lightning_ssr.core.state import LayerState

if TYPE_CHECKING:
    from lightning_ssr.core.engine import SSREngine

__all__ = ["engine_state", "load_engine_state", "STATE_VERSION"]

STATE_VERSION = 1


def _check_saved_state(state: Mapping[str, Any], layers: Mapping[str, LayerState], outputs: Mapping[str, LayerState]) -> None:
    """Refuse a saved state of another version or of other tracked layers."""
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"SSR state version {state.get('version')!r} is not supported (expected {STATE_VERSION})")
    saved, ours = sorted(state["layers"]), sorted(layers)
    if saved != ours:
        raise ValueError(f"SSR state holds layers {saved}, but this model tracks {ours}")
    saved_out, our_out = sorted(state.get("outputs", {})), sorted(outputs)
    if saved_out != our_out:
        raise ValueError(f"SSR state holds output layers {saved_out}, but this model senses {our_out}")


def engine_state(engine: SSREngine) -> dict[str, Any]:
    """Everything needed to resume ``engine`` exactly: counters and every per-neuron tensor."""
    names = engine.param_names()
    return {
        "version": STATE_VERSION,
        "step": engine.step,
        "task_step": engine.task_step,
        "tasks": engine.tasks,
        "skipped": engine.skipped,
        "window": engine._window, "fed": engine.recycling.fed,  # the modules fed at the last task's end
        "partial": engine.partial.state_dict(),
        "overlap": dict(engine.overlap),
        "layers": {name: st.state_dict() for name, st in engine.layers.items()},
        "outputs": {name: st.state_dict() for name, st in engine.outputs.items()},
        **({"anchors": engine.anchoring.state_dict(names)} if engine.anchoring.enabled else {}),
        "lr_factors": {names[i]: f for i, f in engine.anchoring.lr_factors.items() if i in names},
        **({"subspace": engine.subspace.state_dict()} if engine.subspace.enabled else {}),
    }


def load_engine_state(engine: SSREngine, state: Mapping[str, Any]) -> None:
    """Restore :func:`engine_state` (same tracked layers); a ``recycled`` entry writes back recycled weights."""
    _check_saved_state(state, engine.layers, engine.outputs)
    engine.step, engine.task_step = int(state["step"]), int(state["task_step"])
    engine.sensor.follow()
    engine.tasks, engine.skipped = int(state["tasks"]), int(state["skipped"])
    engine._window, engine.recycling.fed = int(state["window"]), state.get("fed")  # no "fed" in older states
    engine.partial.load_state_dict(state.get("partial", {}))
    for name, st in engine.layers.items():
        st.load_state_dict(state["layers"][name])
    for name, st in engine.outputs.items():
        st.load_state_dict(state["outputs"][name])
    if engine.tasks:
        engine._consolidated = {id(p) for p in engine.model.parameters()}
        engine._refresh_gates()
    params = dict(engine.model.named_parameters())
    if engine.anchoring.enabled:
        engine.anchoring.load_state_dict(state.get("anchors", {}), params)
    engine.subspace.load_state_dict(state.get("subspace", {}))
    engine.anchoring.lr_factors = {id(params[n]): float(f) for n, f in state.get("lr_factors", {}).items() if n in params}
    engine.set_overlap({n: float(v) for n, v in state.get("overlap", {}).items()})
    if state.get("recycled"):  # an open task's state: the weights its end's recycling overwrote
        engine.recycling.restore(engine.layers, engine.model, state["recycled"])
