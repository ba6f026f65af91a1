"""The common base of the SSR layers: constructor, parameters, buffers and the homeostatic state.

As torch's ``_NormBase`` and ``_BatchNorm``: :class:`_SSRNormBase` holds the constructor, the
parameters and buffers, :meth:`~_SSRNormBase.reset_running_stats`,
:meth:`~_SSRNormBase.reset_parameters`, :meth:`~_SSRNormBase.extra_repr` and the checkpoint
versions; :class:`_SSRNorm`, the base of every layer, adds the forward and the homeostatic update
of the state. The per-channel maths lives in :mod:`lightning_ssr.norm.statistics` and
:mod:`lightning_ssr.norm.function`; the 1d/2d/3d layers in :mod:`lightning_ssr.norm.layers`.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn import init
from torch.nn.parameter import Parameter

from lightning_ssr.core import ReduceFn, rules
from lightning_ssr.core.config import ActivityFn
from lightning_ssr.core.validation import check_bool, check_int, check_number
from lightning_ssr.norm import native
from lightning_ssr.norm.function import (
    _StateNorm,
    gradient_moments,
    projection_coefficients,
    update_gradient_moments,
)
from lightning_ssr.norm.statistics import (
    all_reduce_statistics,
    batch_moments,
    batch_variance,
    channel_statistics,
    constant_like,
    needs_collective,
    pending_statistics,
    pooled_statistics,
    state_transform,
    unit_rms_gain,
    weighted_sums,
)

#: Nothing public: the layers are exported by :mod:`lightning_ssr.norm.layers`.
__all__: list[str] = []

_ACTIVITIES = ("square", "abs", "relu")
_SET_POINTS = ("layer_mean",)
_KERNELS = ("auto", "native", "eager")


def _check_arguments(
    num_features: int,
    eps: float,
    momentum: Optional[float],
    flags: dict[str, bool],
    activity: ActivityFn,
    set_point: Union[float, str],
    gain_rate: float,
    max_change: float,
    max_gain: float,
    grad_momentum: float,
    kernel: str,
) -> None:
    """Check every constructor argument of :class:`_SSRNorm`; ``flags`` holds the booleans by name."""
    check_int("num_features", num_features, 1)
    check_number("eps", eps, 0.0, 1.0, low_open=True)
    if momentum is not None:
        check_number("momentum", momentum, 0.0, 1.0, low_open=True)
    for flag, value in flags.items():
        check_bool(flag, value)
    if not callable(activity) and activity not in _ACTIVITIES:
        raise ValueError(f"`activity` must be one of {list(_ACTIVITIES)} or a callable, got {activity!r}")
    if isinstance(set_point, str):
        if set_point not in _SET_POINTS:
            raise ValueError(
                f"`set_point` must be a number in [0, inf) or one of {list(_SET_POINTS)}, got {set_point!r}"
            )
    else:
        check_number("set_point", set_point, 0.0, math.inf)
    check_number("gain_rate", gain_rate, 0.0, 10.0)
    check_number("max_change", max_change, 0.0, 1.0, low_open=True, high_open=True)
    check_number("max_gain", max_gain, 1.0, math.inf, high_open=True)
    check_number("grad_momentum", grad_momentum, 0.0, 1.0, low_open=True)
    if kernel not in _KERNELS:
        raise ValueError(f"`kernel` must be one of {list(_KERNELS)}, got {kernel!r}")


class _SSRNormBase(nn.Module):
    """The constructor, parameters, buffers, resets and checkpoint loading of the SSR layers.

    What torch's ``_NormBase`` is to ``_BatchNorm``: :class:`_SSRNorm` adds the forward and the
    homeostatic update of the state.
    """

    # Versions 1 and 2 are torch's BatchNorm layouts (2 added ``num_batches_tracked``); version 3
    # added the homeostatic state ``gain``, ``running_activity`` and ``initialized``. Continuing
    # BatchNorm's numbering lets a BatchNorm checkpoint load into a converted model.
    _version = 3
    __constants__ = [
        "track_running_stats", "momentum", "eps", "num_features", "affine",
        "gain_rate", "max_change", "max_gain", "auto_update", "project_gradient", "grad_momentum", "kernel",
    ]
    num_features: int
    eps: float
    momentum: Optional[float]
    affine: bool
    track_running_stats: bool
    gain_rate: float
    max_change: float
    max_gain: float
    auto_update: bool
    project_gradient: bool
    grad_momentum: float
    kernel: str

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.01,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        activity: ActivityFn = "square",
        set_point: Union[float, str] = 1.0,
        gain_rate: float = 0.01,
        max_change: float = 0.01,
        max_gain: float = 10.0,
        auto_update: bool = True,
        project_gradient: bool = True,
        grad_momentum: float = 0.2,
        process_group: Any = None,
        kernel: str = "auto",
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        _check_arguments(
            num_features, eps, momentum,
            {"affine": affine, "track_running_stats": track_running_stats, "bias": bias,
             "auto_update": auto_update, "project_gradient": project_gradient},
            activity, set_point, gain_rate, max_change, max_gain, grad_momentum, kernel,
        )
        if kernel == "native":
            try:
                native.load_kernel()
            except native.KernelUnavailableError as err:
                raise native.KernelUnavailableError(
                    f"`kernel='native'` needs SSRNorm's compiled CPU kernel, which is not available: {err}. "
                    "Use kernel='auto' (the kernel where available) or kernel='eager'"
                ) from err

        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.activity_fn = activity
        self.set_point = set_point if isinstance(set_point, str) else float(set_point)
        self.gain_rate = float(gain_rate)
        self.max_change = float(max_change)
        self.max_gain = float(max_gain)
        self.auto_update = auto_update
        self.project_gradient = project_gradient
        self.grad_momentum = float(grad_momentum)
        self.process_group = process_group
        self.kernel = kernel
        #: Combines the flat statistics tensor of one update across processes; ``None`` uses
        #: ``torch.distributed.all_reduce`` when a process group is initialized. See
        #: :meth:`reduce_statistics`.
        self.reduce_fn: Optional[ReduceFn] = None
        self._phi = rules.activity_function(activity)
        self._phi_is_square = isinstance(activity, str) and activity == "square"

        if self.affine:
            self.weight = Parameter(torch.empty(num_features, **factory_kwargs))
            if bias:
                self.bias = Parameter(torch.empty(num_features, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
            self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
        self.running_mean: Optional[Tensor]
        self.running_var: Optional[Tensor]
        no_dtype = {"device": device}
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, **no_dtype))
        self.register_buffer("gain", torch.ones(num_features, **factory_kwargs))
        self.register_buffer("running_activity", torch.ones(num_features, **factory_kwargs))
        self.register_buffer("initialized", torch.tensor(False, **no_dtype))
        self.num_batches_tracked: Tensor
        self.gain: Tensor
        self.running_activity: Tensor
        self.initialized: Tensor
        # Pending statistics (sums weighted by element counts) since the last update. Plain
        # attributes, not buffers: DDP must not broadcast them, each replica contributes its own.
        self._sums: Optional[Tensor] = None
        self._count = 0.0
        # Host-side mirrors of buffers, so that the steady state never synchronizes with a GPU.
        self._initialized_seen = False
        self._steps_seen: Optional[int] = None
        self._ones: Optional[Tensor] = None
        self._zeros: Optional[Tensor] = None
        self._grad_stats: Optional[Tensor] = None
        self._grad_steps = 0
        self._grad_steps_t: Optional[Tensor] = None  # the native kernel's count, see native.train_forward
        self._last_moments: Optional[tuple[Tensor, Tensor]] = None
        self.reset_parameters()

    # ----------------------------------------------------------------- set-up
    @property
    def tau(self) -> float:
        """Time constant of the running state in updates: ``1 / momentum`` (``inf`` for ``None``)."""
        return math.inf if self.momentum is None else 1.0 / self.momentum

    def reset_running_stats(self) -> None:
        """Forget the history: the next training batch warm-starts the state again."""
        if self.track_running_stats:
            self.running_mean.zero_()  # type: ignore[union-attr]
            self.running_var.fill_(1)  # type: ignore[union-attr]
        self.num_batches_tracked.zero_()
        self.gain.fill_(1)
        self.running_activity.fill_(self._initial_activity())
        self.initialized.fill_(False)
        self._sums, self._count = None, 0.0
        self._initialized_seen = False
        self._steps_seen = None
        self._grad_stats, self._grad_steps, self._grad_steps_t = None, 0, None

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def _initial_activity(self) -> float:
        # The long-run activity starts at the set point, so an update made before any
        # measurement (a layer converted from a trained BatchNorm) does not move the gain.
        return self.set_point if isinstance(self.set_point, float) else 1.0

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        activity = self.activity_fn if isinstance(self.activity_fn, str) else getattr(
            self.activity_fn, "__name__", repr(self.activity_fn))
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}, "
            f"activity={activity!r}, set_point={self.set_point!r}, gain_rate={self.gain_rate}, "
            f"max_change={self.max_change}, max_gain={self.max_gain}, auto_update={self.auto_update}, "
            f"project_gradient={self.project_gradient}, grad_momentum={self.grad_momentum}, "
            f"kernel={self.kernel!r}"
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Layers pickled before the native kernel existed run as before (``kernel="auto"``).
        state.setdefault("kernel", "auto")
        state.setdefault("_grad_steps_t", None)
        super().__setstate__(state)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        version = local_metadata.get("version", None)
        if version is None or version < 3:
            # A BatchNorm layout (versions 1-2): start the homeostatic state afresh. The running
            # statistics of a trained layer are a valid state, so no warm start is needed then.
            def fill(name: str, value: Tensor) -> None:
                state_dict.setdefault(prefix + name, value)

            if version is None or version < 2:
                fill("num_batches_tracked", torch.tensor(0, dtype=torch.long))
            n = torch.as_tensor(state_dict[prefix + "num_batches_tracked"])
            fill("gain", torch.ones(self.num_features))
            fill("running_activity", torch.full((self.num_features,), self._initial_activity()))
            fill("initialized", (n > 0) if self.track_running_stats else torch.tensor(False))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._sums, self._count = None, 0.0
        self._initialized_seen = False
        self._steps_seen = None
        self._grad_stats, self._grad_steps, self._grad_steps_t = None, 0, None


class _SSRNorm(_SSRNormBase):
    """Common base of :class:`SSRNorm1d`, :class:`SSRNorm2d` and :class:`SSRNorm3d`.

    Deliberately not a subclass of :class:`torch.nn.modules.batchnorm._BatchNorm`, so that
    ``SyncBatchNorm.convert_sync_batchnorm`` (Lightning's ``sync_batchnorm=True``) leaves it alone.
    """

    # ---------------------------------------------------------------- forward
    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"expected input with {self.num_features} channels in dimension 1 "
                f"(got {input.shape[1]} channels)"
            )
        training = self.training
        if training and self.kernel != "eager":
            kernel = native.kernel_for(self, input)
            if kernel is not None:
                return native.train_forward(kernel, self, input)
        with torch.no_grad():
            if training:
                moments = batch_moments(input)
                if not self._initialized_seen and not self._is_initialized():
                    self._warm_start(*moments)
            shift, scale = self._state_transform()
            if training:
                phi = None if self._phi_is_square else self._phi
                stats = channel_statistics(input, moments, shift, scale, self.track_running_stats, phi)
                self._last_moments = (stats[0] - shift, stats[1])
        self._ones = ones = constant_like(self._ones, scale, 1.0)
        if torch.is_grad_enabled() and (input.requires_grad or _needs_grad(self.weight) or _needs_grad(self.bias)):
            layer = self if training and self.project_gradient and self.running_var is not None else None
            output = _StateNorm.apply(input, self.weight, self.bias, shift, scale, ones, layer)
        else:
            weight = scale if self.weight is None else self.weight * scale
            output = F.batch_norm(input, shift, ones, weight, self.bias, False, 0.0, 0.0)
        if training:
            with torch.no_grad():
                if self._updates_in_forward():
                    self._update_state(*stats)
                else:
                    self._accumulate(stats, moments[2])
                    if self.auto_update:
                        self.homeostatic_step()
        return output

    def _is_initialized(self) -> bool:
        self._initialized_seen = bool(self.initialized)
        return self._initialized_seen

    def _warm_start(self, mean: Tensor, mean_sq: Tensor, count: int) -> None:
        """Start the state from the first training batch, so the first output is normalized."""
        if self.track_running_stats:
            self.running_mean.copy_(mean)  # type: ignore[union-attr]
            if count > 1:
                self.running_var.copy_(batch_variance(mean, mean_sq))  # type: ignore[union-attr]
        else:
            self.gain.copy_(unit_rms_gain(mean_sq, self.eps, self.max_gain))
        self.initialized.fill_(True)
        self._initialized_seen = True

    def _state_transform(self) -> tuple[Tensor, Tensor]:
        """The state as a per-channel shift and scale (fresh tensors, see :func:`state_transform`)."""
        if self.running_mean is not None and self.running_var is not None:
            return state_transform(self.running_mean, self.running_var, self.gain, self.eps)
        self._zeros = constant_like(self._zeros, self.gain, 0.0)
        return self._zeros, self.gain.clone()

    # ------------------------------------------------------------ homeostasis
    def _accumulate(self, stats: tuple[Tensor, Tensor, Tensor], count: int) -> None:
        """Add one batch's statistics, weighted by its element count, to the pending sums."""
        sums = weighted_sums(stats if self.track_running_stats else stats[2:], count)
        if self._sums is None or self._count == 0:
            self._sums = sums
        else:
            self._sums.add_(sums)
        self._count += float(count)

    def _pending(self) -> Tensor:
        """The pending statistics as one flat float32 tensor (see :func:`pending_statistics`)."""
        size = self.num_features * (3 if self.track_running_stats else 1)
        return pending_statistics(self._sums, self._count, size, self.gain.device)

    def _updates_in_forward(self) -> bool:
        """Whether a training forward updates the state itself (``auto_update``, nothing pending,
        no reduction across processes) rather than adding to the pending statistics."""
        return self.auto_update and self._count == 0 and not self._needs_reduction()

    def _needs_reduction(self) -> bool:
        if self.reduce_fn is not None or type(self).reduce_statistics is not _SSRNorm.reduce_statistics:
            return True
        return needs_collective(self.process_group)

    def reduce_statistics(self, statistics: Tensor) -> Tensor:
        """Combine one update's statistics across processes, so every replica applies the same update.

        ``statistics`` is a flat float32 tensor of per-channel sums weighted by element counts,
        followed by the element count. Summing or averaging it over processes gives the same
        update. The default uses :attr:`reduce_fn` when one is set, else one
        ``torch.distributed.all_reduce`` over :attr:`process_group` when a process group is
        initialized, else returns ``statistics`` unchanged. Override this method (an override is
        called for every update, with or without a process group) or set :attr:`reduce_fn` to
        synchronize differently.
        """
        if self.reduce_fn is not None:
            return self.reduce_fn(statistics)
        return all_reduce_statistics(statistics, self.process_group)

    def homeostatic_step(self) -> bool:
        """Apply the pending statistics to the state: one slow, bounded homeostatic update.

        With ``auto_update=True`` the layer calls this after every training forward; with
        ``auto_update=False`` the forward only accumulates and a driver (for example the
        Lightning callback, after each optimizer step) calls this or :func:`homeostatic_step`.
        Under ``torch.distributed`` every process must call it, as it is a collective.

        Returns:
            Whether an update was applied (``False`` when no process saw a training batch).
        """
        with torch.no_grad():
            if self._needs_reduction():
                flat = self.reduce_statistics(self._pending())
                sums, count = flat[:-1], float(flat[-1])
            else:
                sums, count = self._sums, self._count
            self._sums, self._count = None, 0.0
            if sums is None or count <= 0:
                return False
            self._apply_pooled(sums, count)
        return True

    def _apply_pooled(self, sums: Tensor, count: float) -> None:
        self._update_state(*pooled_statistics(sums, count, self.num_features, self.track_running_stats))

    def _ema_steps(self) -> int:
        """The updates seen, for the bias-corrected averages (read from the buffer only while the
        correction matters, so that the steady state never synchronizes with the device)."""
        if self._steps_seen is None or self._steps_seen <= self.tau:
            self._steps_seen = int(self.num_batches_tracked)
        else:
            self._steps_seen += 1
        return self._steps_seen

    def _gradient_projection(self, grad_sum: Tensor, grad_dev_sum: Tensor, count: int,
                             moments: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """The per-channel ``k`` and ``c`` of the projected input gradient ``w * (g - c - k * u)``.

        ``u = x - m`` is the input centered by the running mean. BatchNorm's backward removes from
        the gradient its regression on ``(1, u)`` over the batch, the two directions (the channel's
        mean and scale) that its normalization undoes. The running state undoes them too, only
        slowly, so the same regression is removed here, with its four moments ``mean(g)``,
        ``mean(g u)``, ``mean(u)`` and ``mean(u^2)`` averaged over recent batches (weight
        ``grad_momentum``; kept per process and not saved) instead of taken from the batch alone.
        """
        if self._grad_steps_t is not None:  # the native kernel counted the last projections
            self._grad_steps, self._grad_steps_t = int(self._grad_steps_t), None
        stats = gradient_moments(grad_sum, grad_dev_sum, count, moments)
        self._grad_stats, self._grad_steps = update_gradient_moments(
            self._grad_stats, self._grad_steps, stats, self.grad_momentum)
        return projection_coefficients(self._grad_stats, self.eps, grad_sum.dtype)

    def _update_state(self, mean: Optional[Tensor], second: Optional[Tensor], act: Tensor) -> None:
        """One update of the state from a batch's (or the pooled) channel statistics."""
        self.num_batches_tracked.add_(1)
        steps, tau = self._ema_steps(), self.tau
        if self.running_mean is not None and self.running_var is not None:
            # The variance is the mean square deviation from the running mean that normalized the
            # batch (what the output is divided by), so spread between batches counts too and a
            # stream of single samples has a variance.
            rules.ema_update(self.running_mean, _as(mean, self.running_mean), steps, tau)  # type: ignore[arg-type]
            rules.ema_update(self.running_var, _as(second, self.running_var), steps, tau)  # type: ignore[arg-type]
        ra = self.running_activity
        rules.ema_update(ra, _as(act, ra), steps, tau)
        if self.gain_rate > 0:
            set_point = ra.mean() if isinstance(self.set_point, str) else self.set_point
            factor = rules.scaling_factor(ra, set_point, self.gain_rate, self.max_change)  # type: ignore[arg-type]
            self.gain.mul_(factor).clamp_(1.0 / self.max_gain, self.max_gain)


def _as(t: Tensor, like: Tensor) -> Tensor:
    return t if t.dtype == like.dtype else t.to(like.dtype)


def _needs_grad(p: Optional[Tensor]) -> bool:
    return p is not None and p.requires_grad
