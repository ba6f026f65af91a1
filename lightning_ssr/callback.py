"""``SynapticScaling``: SSR as a Lightning callback, for any LightningModule, unchanged."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_ssr.core.config import SSRConfig
from lightning_ssr.core.engine import NonFiniteActivityWarning, SSREngine
from lightning_ssr.core.layers import DEFAULT_LAYER_TYPES
from lightning_ssr.core.validation import check_bool, check_layer_types, check_patterns
from lightning_ssr.norm import _SSRNorm, homeostatic_step
from lightning_ssr.partial_batches import observe_batch

__all__ = ["SynapticScaling"]


def _warn_on_rank_zero(message: str) -> None:
    """A skipped update, reported by rank 0 only (every replica skips the same update)."""
    rank_zero_warn(message, category=NonFiniteActivityWarning)


def _carry_over(engine: SSREngine, previous: SSREngine) -> None:
    """A new LightningModule (e.g. a new wrapper around the same network) continues the state
    the callback holds: importance, set points and anchors move over by layer name."""
    try:
        engine.load_state_dict(previous.state_dict())
    except (ValueError, RuntimeError, KeyError) as err:
        raise ValueError(
            f"SynapticScaling holds the SSR state of {previous.tasks} consolidated task(s) of another "
            f"LightningModule (layers {list(previous.layers)}), which cannot carry over to this one "
            f"(layers {list(engine.layers)}): {err}. Use a new SynapticScaling for a new model, "
            "or the same LightningModule for every task"
        ) from err


class SynapticScaling(Callback):
    r"""Synaptic Scaling Regularization for any LightningModule, as a callback.

    A forward hook on each tracked layer (Linear and Conv1d/2d/3d by default) senses every
    neuron's activity :math:`\phi(z)` averaged over batch and positions, where :math:`z` is the
    layer's output, so module and functional activations work alike. After every real optimizer
    step (none under gradient accumulation's intermediate batches or when AMP skips a step) the
    shared :class:`~lightning_ssr.core.engine.SSREngine` updates each neuron's long-run activity,
    and scales up the incoming weights of each neuron whose activity fell below its set point
    (``scaling_rate=1.0``; with ``scale_down=True`` also down, the proposal's symmetric rule):

    .. math::
        w_{ij} \leftarrow w_{ij} \cdot \mathrm{clip}\big(1 + \eta_{scale}(s_i - \bar a_i),\ 1,\ 1 + m\big)

    At the end of each ``fit`` (one ``fit`` per task, with the same callback) or on
    :meth:`consolidate`, what each neuron carried becomes its importance; while later tasks train,
    important neurons' incoming and outgoing weights are held near their values at the last task's
    end (by default pulled back by ``anchor_rate * (1 - 1 / (1 + lambda * importance))`` a step,
    applied every ``protect_every`` steps, their drift kept off the old inputs' directions; see
    :class:`~lightning_ssr.SSRConfig`).
    Gradients are final in ``on_before_optimizer_step`` (after DDP's all-reduce and AMP unscaling);
    a callback cannot change the loss, so ``protection="penalty"`` is refused here.

    The output layer (the last Linear/Conv registered, with its ModuleDict/ModuleList siblings) is
    not tracked by default: its units are logits, not firing rates, and scaling them changes the
    classifier's calibration rather than a neuron's excitability. It is still protected as the
    consumer of the last hidden layer.

    Non-finite activity never reaches the weights: such an update is skipped with a
    :class:`~lightning_ssr.core.engine.NonFiniteActivityWarning`.

    Args:
        config: hyperparameters; fields may also be given as keyword arguments, which override
            it. Default: ``SSRConfig()``.
        layer_types: module types whose neurons are tracked. Default: Linear, Conv1d/2d/3d.
        include: ``fnmatch`` patterns of layer names to track (each must match a layer).
            Default: ``None`` (all but the output layer).
        exclude: patterns of layers never tracked. Default: ``()``.
        track_output: track the output layer too. Default: ``False``.
        consolidate_on_fit_end: consolidate when each ``fit`` ends. Default: ``True``.
        log_diagnostics: log per-layer ``activity``, ``deviation`` (mean absolute distance to the
            set point) and scale factors under ``ssr/<layer>/...`` every ``log_every_n_steps``, and
            from a task's first update on, each layer's ``pull_scale`` (``overlap_power``).
            Default: ``True``.
        resume_continues_task: ``trainer.fit(ckpt_path=...)`` from a checkpoint saved after a fit
            ended (``trainer.save_checkpoint``) continues that task, as plain Lightning continues the
            run: the task is not consolidated twice. ``False`` resumes it as consolidated, so the
            resumed fit is a new task. Default: ``True``.
        drive_norm_layers: drive every :class:`~lightning_ssr.SSRNorm2d` (and 1d/3d) of the model:
            during ``fit`` their ``auto_update`` is off and their homeostatic updates are applied
            once after each real optimizer step (with one collective for all of them), instead of
            after every training forward; restored at teardown. Default: ``False`` (the layers
            update themselves).
        **hparams: fields of :class:`~lightning_ssr.SSRConfig` (``scaling_rate``, ``tau``, ...).

    Raises:
        TypeError / ValueError: at construction, for any invalid argument (the message names it,
            the allowed values and the value received); at setup, for a model without a trackable
            layer, a pattern that matches nothing, or a strategy that shards the model.

    Example::

        >>> import lightning as L
        >>> from lightning_ssr import SynapticScaling
        >>> cb = SynapticScaling(scaling_rate=0.01, consolidation=5.0)
        >>> trainer = L.Trainer(callbacks=[cb], max_epochs=1, logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False)
        >>> SynapticScaling(tau=-1)
        Traceback (most recent call last):
        ...
        ValueError: `tau` must be in [1.0, inf], got -1
    """

    def __init__(
        self,
        config: SSRConfig | None = None,
        *,
        layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        track_output: bool = False,
        consolidate_on_fit_end: bool = True,
        log_diagnostics: bool = True,
        drive_norm_layers: bool = False,
        resume_continues_task: bool = True,
        **hparams: Any,
    ) -> None:
        super().__init__()
        self.config = SSRConfig.from_kwargs(config, **hparams)
        if self.config.protection == "penalty":
            raise ValueError(
                "`protection` must be 'anchor', 'update' or 'gradient' in the SynapticScaling callback (a callback "
                "cannot change the loss), got 'penalty'; use the Avalanche SSRPlugin or "
                "`SSREngine.penalty()` in your own training_step for the penalty form"
            )
        self.layer_types = check_layer_types(layer_types)
        self.include = check_patterns("include", include, optional=True)
        self.exclude = check_patterns("exclude", exclude) or ()
        for flag, value in (("track_output", track_output), ("consolidate_on_fit_end", consolidate_on_fit_end),
                            ("log_diagnostics", log_diagnostics), ("drive_norm_layers", drive_norm_layers),
                            ("resume_continues_task", resume_continues_task)):
            check_bool(flag, value)
        self.resume_continues_task = resume_continues_task
        self._open_task: Optional[dict[str, Any]] = None  # the state before the last fit-end consolidation
        self._lightning_resume = False
        self.track_output = track_output
        self.consolidate_on_fit_end = consolidate_on_fit_end
        self.log_diagnostics = log_diagnostics
        self.drive_norm_layers = drive_norm_layers
        self.engine: Optional[SSREngine] = None
        self._pending_state: Optional[dict[str, Any]] = None
        self._step_hooks: list[Any] = []
        self._updated_since_log = False
        self._driven: dict[nn.Module, bool] = {}
        self._trainer: Optional[pl.Trainer] = None
        self._state_key = self._generate_state_key(include=self.include, exclude=self.exclude, track_output=track_output)

    @property
    @override
    def state_key(self) -> str:
        return self._state_key  # built once: Lightning reads it at every hook call, for its profiler

    # ---------------------------------------------------------------- set-up
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or type(strategy).__name__.startswith("DeepSpeed"):
            raise ValueError(
                f"SynapticScaling supports single-device and DDP strategies (each replica holds the whole "
                f"model), got {type(strategy).__name__}: a sharded model has no whole weight rows to scale"
            )
        self._trainer = trainer
        if self.engine is None or self.engine.model is not pl_module:
            previous = self.engine
            self.engine = SSREngine(
                pl_module, self.config, layer_types=self.layer_types, include=self.include,
                exclude=self.exclude, track_output=self.track_output,
            )
            rank_zero_info(f"SynapticScaling tracks {len(self.engine.layers)} layers: {list(self.engine.layers)}")
            if previous is not None and self._pending_state is None and previous.step > 0:
                _carry_over(self.engine, previous)
        self.engine.reduce_fn = self._reduce if trainer.world_size > 1 else None
        self.engine.warn = _warn_on_rank_zero
        if self._pending_state is not None:
            self.engine.load_state_dict(self._pending_state)
            self._pending_state = None
        self.engine.attach()
        if self.drive_norm_layers:
            self._driven = {m: m.auto_update for m in pl_module.modules() if isinstance(m, _SSRNorm)}
            for m in self._driven:
                m.auto_update = False

    def _reduce(self, tensor: Tensor) -> Tensor:
        if self._trainer is None:
            raise RuntimeError("SynapticScaling reduced activity outside of a fit")
        return self._trainer.strategy.reduce(tensor, reduce_op="mean")

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._open_task = None  # training goes on: the consolidated state (or the resumed task) is current
        self._remove_step_hooks()
        for opt in trainer.optimizers:
            self._step_hooks.append(opt.register_step_post_hook(self._after_optimizer_step))

    def _remove_step_hooks(self) -> None:
        for h in self._step_hooks:
            h.remove()
        self._step_hooks.clear()

    # ------------------------------------------------------------- the steps
    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        if self.engine is not None and self.engine.partial.enabled:
            observe_batch(self.engine.partial, batch, type(self).__name__)

    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer
    ) -> None:
        if trainer.sanity_checking or self.engine is None:
            return
        self.engine.before_step()

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Runs only when ``optimizer.step()`` really ran (not on AMP-skipped or accumulating batches)."""
        if self.engine is None:
            return
        self._updated_since_log |= self.engine.after_step(optimizer)
        if self._driven:
            homeostatic_step(self.engine.model)  # every SSRNorm layer, one collective for all

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.log_diagnostics or not self._updated_since_log or trainer.logger is None or self.engine is None:
            return
        if trainer.global_step % max(trainer.log_every_n_steps, 1):
            return
        metrics = {
            f"ssr/{layer}/{key}": value
            for layer, diag in self.engine.diagnostics().items()
            for key, value in diag.items()
        }
        metrics.update({f"ssr/{layer}/pull_scale": torch.tensor(v) for layer, v in self.engine.overlap.items()})
        metrics["ssr/skipped_updates"] = torch.tensor(float(self.engine.skipped))
        self._updated_since_log = False
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    # --------------------------------------------------------- consolidation
    def consolidate(self) -> None:
        """End the current task now: importance and set points absorb what it used.

        Called automatically when each ``fit`` ends (``consolidate_on_fit_end=True``); call it
        yourself when one ``fit`` spans several tasks. Users may override it to add work.

        Raises:
            RuntimeError: when no ``fit`` has set the callback up yet.
        """
        if self.engine is None:
            raise RuntimeError("SynapticScaling.consolidate() needs a model: call it after trainer.fit() set it up")
        self.engine.consolidate()

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.consolidate_on_fit_end and self.engine is not None and self.engine.task_step > 0:
            self._open_task = self.engine.state_dict()  # a checkpoint saved now can still resume this task
            self.consolidate()
            if recycled := self.engine.recycling.undo_state(self.engine.model):  # ... from the weights before recycling
                self._open_task["recycled"] = recycled

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        self._remove_step_hooks()
        if self.engine is not None:
            self.engine.detach()
        for m, auto in self._driven.items():
            m.auto_update = auto
        self._driven = {}
        self._trainer = None

    # ----------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.engine is None:
            return dict(self._pending_state or {})
        state = self.engine.state_dict()
        if self._open_task is not None:  # saved after a fit ended: also the task as it was before consolidation
            state["open_task"] = self._open_task
        return state

    @override
    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]) -> None:
        self._lightning_resume = True  # Lightning calls load_state_dict next, for trainer.fit(ckpt_path=...)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore SSR's state. ``trainer.fit(ckpt_path=...)`` from a checkpoint saved after a fit ended
        resumes that task (``resume_continues_task=True``, the default), not a new one: the state from
        before the fit-end consolidation is restored, and the resumed fit consolidates once when it
        ends. With ``resume_continues_task=False`` (or when the state is loaded outside Lightning's
        resume, as the stream runner does between tasks) the consolidated state is restored."""
        state_dict = dict(state_dict)
        open_task = state_dict.pop("open_task", None)
        if open_task is not None and self._lightning_resume and self.resume_continues_task:
            state_dict = dict(open_task)  # with the weights recycling overwrote at the fit's end, if any
        self._lightning_resume = False
        if not state_dict:
            return
        if self.engine is None:
            self._pending_state = dict(state_dict)
        else:
            self.engine.load_state_dict(state_dict)

    def neuron_statistics(self) -> dict[str, dict[str, Tensor]]:
        """Per-neuron state of every tracked layer, as float32 CPU copies (for histograms).

        For each layer: ``activity`` (long-run), ``set_point`` (the layer's mean activity under
        ``set_point="layer_mean"``; NaN until measured), ``activity_minus_set_point``, ``factor``
        (the last scale factors applied to the incoming weights) and ``importance`` (accumulated
        over consolidated tasks). Identical on every process under DDP. Empty before set-up.
        :class:`~lightning_ssr.loggers.SSRWandbHistograms` logs them to Weights & Biases.

        Example:
            >>> SynapticScaling().neuron_statistics()
            {}
        """
        return self.engine.neuron_statistics() if self.engine is not None else {}

    def extra_state_bytes(self) -> int:
        """Bytes of SSR state beyond the model: O(neurons), plus one copy of the gated weights
        with ``protection="anchor"`` (the default) and input-subspace protection's bases and
        sketches (O(inputs) per layer); 0 before set-up."""
        return self.engine.extra_state_bytes() if self.engine is not None else 0
