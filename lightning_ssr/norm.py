r"""SSRNorm: a homeostatic drop-in for BatchNorm, and the conversion of whole models.

:class:`SSRNorm1d`, :class:`SSRNorm2d` and :class:`SSRNorm3d` take every argument of
:class:`torch.nn.BatchNorm1d`/``2d``/``3d`` and normalize each channel with a state of its own that
adapts slowly from the channel's history, never with the statistics of the current batch. A
per-channel multiplicative gain closes a feedback loop on the channel's long-run activity (synaptic
scaling, built from :mod:`lightning_ssr.core.rules`). :func:`convert_batchnorm` swaps every
BatchNorm of a model for one, :func:`convert_ssrnorm_to_batchnorm` swaps them back, and
:func:`homeostatic_step` applies the pending updates of every layer of a model with one
collective when an external driver owns the updates (``auto_update=False``).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F
from torch.nn import init
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase
from torch.nn.parameter import Parameter

from lightning_ssr.core import rules
from lightning_ssr.core.config import ActivityFn
from lightning_ssr.core.validation import check_bool, check_int, check_number
from lightning_ssr.core.engine import ReduceFn

__all__ = [
    "SSRNorm1d",
    "SSRNorm2d",
    "SSRNorm3d",
    "convert_batchnorm",
    "convert_ssrnorm_to_batchnorm",
    "homeostatic_step",
]

_ACTIVITIES = ("square", "abs", "relu")
_SET_POINTS = ("layer_mean",)
#: Arguments that :func:`convert_batchnorm` takes from each BatchNorm and never from the caller.
_STRUCTURAL = ("num_features", "eps", "affine", "track_running_stats", "device", "dtype", "bias")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class _StateNorm(torch.autograd.Function):
    """``y = (x - shift) * scale * weight + bias`` with ``shift`` and ``scale`` constants (the state).

    The same arithmetic as BatchNorm's eval mode, but the effective weight ``weight * scale`` is
    formed outside autograd, which keeps CPU kernels on their fast path. In training mode the
    gradient to the input is projected as in BatchNorm's backward, with running averages of the
    gradient statistics in place of the batch's (see :meth:`_SSRNorm._gradient_projection`).
    """

    @staticmethod
    def forward(ctx: Any, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], shift: Tensor,
                scale: Tensor, ones: Tensor, layer: Optional[_SSRNorm]) -> Tensor:
        w = scale if weight is None else weight * scale
        ctx.save_for_backward(input, w, shift, scale, ones)
        ctx.layer = layer
        ctx.moments = None if layer is None else layer._last_moments
        return F.batch_norm(input, shift, ones, w, bias, False, 0.0, 0.0)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        input, w, shift, scale, ones = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        layer = ctx.layer
        project = layer is not None and need_input
        grad_input, grad_w, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad, input, w, shift, ones, None, None, False, 0.0,
            [need_input and not project, need_weight or project, need_bias or project],
        )
        if project:
            # grad_w = sum(g * (x - shift)), grad_bias = sum(g) per channel
            k, c = layer._gradient_projection(grad_bias, grad_w, input.numel() // input.shape[1], ctx.moments)
            shape = [1, -1] + [1] * (input.dim() - 2)
            # dx = w * (g - c - k * (x - shift)): the x-term as one fast eval-mode batch_norm pass
            grad_input = F.batch_norm(input, shift, ones, (w * k).neg_(), (w * c).neg_(), False, 0.0, 0.0)
            grad_input.addcmul_(grad, w.view(shape))
        grad_weight = grad_w * scale if need_weight else None
        return (grad_input, grad_weight, grad_bias if need_bias else None, None, None, None, None)


class _SSRNorm(nn.Module):
    """Common base of :class:`SSRNorm1d`, :class:`SSRNorm2d` and :class:`SSRNorm3d`.

    Deliberately not a subclass of :class:`torch.nn.modules.batchnorm._BatchNorm`, so that
    ``SyncBatchNorm.convert_sync_batchnorm`` (Lightning's ``sync_batchnorm=True``) leaves it alone.
    """

    # Versions 1 and 2 are torch's BatchNorm layouts (2 added ``num_batches_tracked``); version 3
    # added the homeostatic state ``gain``, ``running_activity`` and ``initialized``. Continuing
    # BatchNorm's numbering lets a BatchNorm checkpoint load into a converted model.
    _version = 3
    __constants__ = [
        "track_running_stats", "momentum", "eps", "num_features", "affine",
        "gain_rate", "max_change", "max_gain", "auto_update", "project_gradient", "grad_momentum",
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
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        check_int("num_features", num_features, 1)
        check_number("eps", eps, 0.0, 1.0, low_open=True)
        if momentum is not None:
            check_number("momentum", momentum, 0.0, 1.0, low_open=True)
        for flag, value in (("affine", affine), ("track_running_stats", track_running_stats),
                            ("bias", bias), ("auto_update", auto_update), ("project_gradient", project_gradient)):
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
        self._grad_stats, self._grad_steps = None, 0

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
            f"project_gradient={self.project_gradient}, grad_momentum={self.grad_momentum}"
        )

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
        self._grad_stats, self._grad_steps = None, 0

    # ---------------------------------------------------------------- forward
    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"expected input with {self.num_features} channels in dimension 1 "
                f"(got {input.shape[1]} channels)"
            )
        training = self.training
        with torch.no_grad():
            if training:
                moments = self._batch_moments(input)
                if not self._initialized_seen and not self._is_initialized():
                    self._warm_start(*moments)
            shift, scale = self._state_transform()
            if training:
                stats = self._channel_statistics(input, moments, shift, scale)
                self._last_moments = (stats[0] - shift, stats[1])
        ones = self._unit(scale)
        if torch.is_grad_enabled() and (input.requires_grad or _needs_grad(self.weight) or _needs_grad(self.bias)):
            layer = self if training and self.project_gradient and self.running_var is not None else None
            output = _StateNorm.apply(input, self.weight, self.bias, shift, scale, ones, layer)
        else:
            weight = scale if self.weight is None else self.weight * scale
            output = F.batch_norm(input, shift, ones, weight, self.bias, False, 0.0, 0.0)
        if training:
            with torch.no_grad():
                if self.auto_update and self._count == 0 and not self._needs_reduction():
                    self._update_state(*stats)
                else:
                    self._accumulate(stats, moments[2])
                    if self.auto_update:
                        self.homeostatic_step()
        return output

    def _is_initialized(self) -> bool:
        self._initialized_seen = bool(self.initialized)
        return self._initialized_seen

    @staticmethod
    def _batch_moments(input: Tensor) -> tuple[Tensor, Tensor, int]:
        """Per-channel mean and mean square of the batch (float32 at least), and the element count.

        Two plain reductions, as ``flax.linen.BatchNorm``'s fast variance (cheaper than Welford);
        the variance loses precision only where a channel's mean exceeds its spread ~1000-fold.
        """
        x = input.float() if input.dtype in _LOW_PRECISION else input
        dims = [0, *range(2, x.dim())]
        return x.mean(dims), torch.mul(x, x).mean(dims), x.numel() // x.shape[1]

    def _warm_start(self, mean: Tensor, mean_sq: Tensor, count: int) -> None:
        """Start the state from the first training batch, so the first output is normalized."""
        if self.track_running_stats:
            self.running_mean.copy_(mean)  # type: ignore[union-attr]
            if count > 1:
                var = torch.addcmul(mean_sq, mean, mean, value=-1).clamp_(min=0.0)
                self.running_var.copy_(var)  # type: ignore[union-attr]
        else:
            gain = torch.rsqrt(mean_sq + self.eps)
            self.gain.copy_(gain.clamp_(1.0 / self.max_gain, self.max_gain))
        self.initialized.fill_(True)
        self._initialized_seen = True

    def _state_transform(self) -> tuple[Tensor, Tensor]:
        """The state as a per-channel shift and scale: fresh tensors, because autograd keeps them
        for the backward while the state is updated in place after the forward."""
        if self.running_mean is not None and self.running_var is not None:
            shift = self.running_mean.clone()
            scale = torch.rsqrt(self.running_var + self.eps).mul_(self.gain)
        else:
            shift = self._zeros = self._constant(self._zeros, self.gain, 0.0)
            scale = self.gain.clone()
        return shift, scale

    @staticmethod
    def _constant(cached: Optional[Tensor], like: Tensor, value: float) -> Tensor:
        if cached is None or cached.device != like.device or cached.dtype != like.dtype:
            cached = torch.full_like(like, value)
        return cached

    def _unit(self, like: Tensor) -> Tensor:
        self._ones = self._constant(self._ones, like, 1.0)
        return self._ones

    # ------------------------------------------------------------ homeostasis
    def _channel_statistics(self, input: Tensor, moments: tuple[Tensor, Tensor, int], shift: Tensor,
                            scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """What the channel carried in this batch: its mean, its mean square around the running
        mean, and its activity (``phi`` of the normalized output ``z``, averaged)."""
        mean, mean_sq, _ = moments
        if self.track_running_stats:
            # E[(x - m)^2] = E[x^2] - m (2 E[x] - m)
            second = torch.addcmul(mean_sq, shift, torch.mul(mean, 2.0).sub_(shift), value=-1).clamp_(min=0.0)
        else:
            second = mean_sq
        if self._phi_is_square:
            # z = scale * (x - m) is affine in x, so its mean square follows from the moments.
            act = torch.mul(scale, scale).mul_(second)
        else:
            shape = [1, -1] + [1] * (input.dim() - 2)
            z = (input - shift.view(shape)) * scale.view(shape)
            act = rules.neuron_activity(z, self._phi, channel_dim=1)
        return mean, second, act

    def _accumulate(self, stats: tuple[Tensor, Tensor, Tensor], count: int) -> None:
        """Add one batch's statistics, weighted by its element count, to the pending sums."""
        parts = stats if self.track_running_stats else stats[2:]
        sums = torch.cat([p.float() for p in parts]).mul_(float(count))
        if self._sums is None or self._count == 0:
            self._sums = sums
        else:
            self._sums.add_(sums)
        self._count += float(count)

    @property
    def _stat_size(self) -> int:
        return self.num_features * (3 if self.track_running_stats else 1)

    def _pending(self) -> Tensor:
        """The pending statistics as one flat float32 tensor: sums weighted by element counts,
        then the count (zeros when nothing is pending, so every replica contributes)."""
        if self._sums is None or self._count == 0:
            return torch.zeros(self._stat_size + 1, device=self.gain.device)
        return torch.cat([self._sums, self._sums.new_tensor([self._count])])

    def _needs_reduction(self) -> bool:
        if self.reduce_fn is not None or type(self).reduce_statistics is not _SSRNorm.reduce_statistics:
            return True
        if not (dist.is_available() and dist.is_initialized()):
            return False
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return dist.get_world_size(group) > 1

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
        if dist.is_available() and dist.is_initialized():
            group = self.process_group if self.process_group is not None else dist.group.WORLD
            if dist.get_world_size(group) > 1:
                dist.all_reduce(statistics, group=group)
        return statistics

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
        stats = sums.div(count)
        if self.track_running_stats:
            mean, second, act = stats.split(self.num_features)
            self._update_state(mean, second, act)
        else:
            self._update_state(None, None, stats)

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
        stats = torch.stack([grad_sum.float() / count, grad_dev_sum.float() / count,
                             moments[0].float(), moments[1].float()])
        self._grad_steps += 1
        old = self._grad_stats
        if old is None or old.shape != stats.shape or old.device != stats.device:
            self._grad_stats, self._grad_steps = stats, 1
        else:
            rules.ema_update(self._grad_stats, stats, self._grad_steps, 1.0 / self.grad_momentum)
        mean_g, mean_gu, mean_u, mean_uu = self._grad_stats
        k = (mean_gu - mean_u * mean_g) / (mean_uu - mean_u * mean_u).clamp_(min=0.0).add_(self.eps)
        c = mean_g - k * mean_u
        return k.to(grad_sum.dtype), c.to(grad_sum.dtype)

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


class SSRNorm1d(_SSRNorm):
    r"""Homeostatic normalization over a 2D or 3D input, a drop-in for :class:`torch.nn.BatchNorm1d`.

    Synaptic scaling (Turrigiano, 2008) made a normalization layer, after the load-balancing
    view of Shen, Wang & Navlakha (Neural Computation 33(12), 2021): each channel is normalized
    with a state of its own, a running mean and variance with a slow time constant and a
    multiplicative gain held by feedback on the channel's long-run activity; never with the
    statistics of the current batch.

    .. math::

        y = \frac{x - \hat\mu}{\sqrt{\hat\sigma^2 + \epsilon}} \cdot g \cdot \gamma + \beta

    :math:`\hat\mu`, :math:`\hat\sigma^2` and the gain :math:`g` are per-channel buffers, and
    :math:`\gamma`, :math:`\beta` learnable parameters of size `C`. After each training forward
    the state is updated from what the channel carried, with :math:`w_t = \max(\text{momentum},
    1/t)` at the :math:`t`-th update (:func:`~lightning_ssr.core.rules.ema_update`),
    :math:`z = g (x - \hat\mu) / \sqrt{\hat\sigma^2 + \epsilon}` the normalized output and bars
    averages over the batch and positions:

    .. math::

        \hat\mu \leftarrow (1 - w_t)\,\hat\mu + w_t\,\overline{x}, \qquad
        \hat\sigma^2 \leftarrow (1 - w_t)\,\hat\sigma^2 + w_t\,\overline{(x - \hat\mu)^2}, \qquad
        a \leftarrow (1 - w_t)\,a + w_t\,\overline{\phi(z)}

    .. math::

        g \leftarrow \mathrm{clip}\big(g \cdot \mathrm{clip}(1 + \eta\,(s - a),\ 1 - \delta,\ 1 + \delta),\
        1/G,\ G\big)

    with :math:`a` the long-run activity (buffer ``running_activity``), :math:`s` the set point,
    :math:`\eta` ``gain_rate``, :math:`\delta` ``max_change`` and :math:`G` ``max_gain``
    (:func:`~lightning_ssr.core.rules.scaling_factor`). The first training batch initializes the
    running statistics (a warm start, flagged by the buffer ``initialized``), so the first output
    is already normalized. A channel with a growing input keeps a slightly stale variance; the
    gain's integral feedback removes that lag.

    Gradients treat the state as a constant, and in training mode the input gradient is
    projected as BatchNorm's backward projects it: per channel, the regression of the upstream
    gradient :math:`\delta` on :math:`(1, x - \hat\mu)` is removed,
    :math:`\partial x = \gamma g / \sqrt{\hat\sigma^2 + \epsilon}\,(\delta - c - k\,(x - \hat\mu))`,
    with the regression's four moments averaged over recent batches (weight ``grad_momentum``)
    instead of taken from the batch alone. Without it the optimizer keeps pushing each channel's
    mean and scale, which the state then undoes a little later: in the benchmark's ablation the
    small CNN lost 13.6 points of test accuracy at batch 64 and 15.5 at batch 2 without the
    projection. Double backward is not supported.

    How it differs from BatchNorm, on each point of the critique that BatchNorm is no synaptic
    scaling:

    * **A state of its own that adapts from the channel's history.** The output depends on the
      sample and the layer's buffers only: not on the other samples of the batch (batch size 1
      trains), and the same in train and eval mode for the same state. (The projected gradient
      still takes a fraction ``grad_momentum`` of its statistics from the batch.) BatchNorm
      normalizes with the current batch's statistics and keeps its running averages for
      evaluation only.
    * **Feedback.** The gain is set by the error between the channel's long-run activity and
      its set point, measured on the layer's own normalized output: a closed loop. BatchNorm is
      feed-forward. In the benchmark the gain moved test accuracy by less than a point either way;
      what it changes is the dynamics (it restores the set point after the input's scale changes
      and removes the lag of the running variance while the input grows).
    * **A slow timescale.** The state moves by a fraction ``momentum`` per update (a time
      constant of 100 updates by default) and the gain by at most ``max_change``. BatchNorm
      re-normalizes every batch from scratch.
    * **A synapse-like gain.** :math:`g` multiplies the channel's whole input, as scaling every
      incoming synapse of the neuron by :math:`g` would; :math:`\gamma` and :math:`\beta` stay
      the learned part and the homeostatic loop never writes them. BatchNorm has no such gain.

    What it keeps from BatchNorm: the constructor, the parameter and buffer names (BatchNorm
    checkpoints load into it), eval-mode arithmetic, and a BatchNorm-like projected gradient,
    which uses running gradient statistics to which the current batch contributes a fraction
    ``grad_momentum``. Its statistics are two plain reductions (mean and mean square, as
    ``flax.linen.BatchNorm``'s fast variance), which lose precision only where a channel's mean
    exceeds its spread about a thousandfold.

    Under ``torch.distributed`` the statistics of each update are summed across processes in one
    flat tensor (:meth:`reduce_statistics`, pluggable), so every replica applies the same update.
    The layer is not a ``_BatchNorm``: ``SyncBatchNorm.convert_sync_batchnorm`` (Lightning's
    ``sync_batchnorm=True``) leaves it alone.

    Args:
        num_features: number of features or channels :math:`C` of the input.
        eps: a value added to the running variance for numerical stability. Default: ``1e-5``
        momentum: the weight of one update in the running state, ``1 / tau`` for a time constant
            of ``tau`` updates (bias-corrected: the first ``tau`` updates are averaged evenly);
            ``None`` for a cumulative average. Default: ``0.01``
        affine: learnable :math:`\gamma` and :math:`\beta`. Default: ``True``
        track_running_stats: keep the running mean and variance. With ``False`` they are
            ``None`` and each channel is scaled by the homeostatic gain alone (feedback-only
            normalization, no centering, no gradient projection), warm-started to unit root mean
            square. Default: ``True``
        device: the device of the parameters and buffers. Default: ``None``
        dtype: the floating point type of the parameters and buffers. Default: ``None``
        bias: learn :math:`\beta` (only relevant if ``affine``). Default: ``True``
        activity: the activity :math:`\phi` sensed on the normalized output :math:`z`:
            ``"square"`` (from the batch moments, no extra pass), ``"abs"``, ``"relu"`` or a
            callable on tensors. Default: ``"square"``
        set_point: the activity :math:`s` each channel is held at: a number, or
            ``"layer_mean"`` (the mean long-run activity of the layer: load balancing).
            Default: ``1.0``
        gain_rate: :math:`\eta`, the rate of the gain's feedback; ``0`` switches the gain off.
            Default: ``0.01``
        max_change: :math:`\delta`, the bound on the fractional change of the gain in one update,
            in ``(0, 1)``. Default: ``0.01``
        max_gain: the gain stays in ``[1 / max_gain, max_gain]``. Default: ``10.0``
        auto_update: update the state after every training forward. With ``False`` the forward
            only accumulates, and :meth:`homeostatic_step` (or the module-level
            :func:`homeostatic_step` on the whole model) applies one update. Default: ``True``
        project_gradient: project the input gradient as BatchNorm's backward does, with running
            gradient statistics; ``False`` treats the state as a plain constant scale.
            Default: ``True``
        grad_momentum: the weight of one batch in the running gradient statistics of the
            projection. Default: ``0.2``
        process_group: the process group the statistics are reduced over; ``None`` for the whole
            world. Default: ``None``

    Shape:
        - Input: :math:`(N, C)` or :math:`(N, C, L)`, where :math:`N` is the batch size,
          :math:`C` is the number of features or channels, and :math:`L` is the sequence length
        - Output: :math:`(N, C)` or :math:`(N, C, L)` (same shape as input)

    Examples::

        >>> # With learnable parameters
        >>> m = SSRNorm1d(100)
        >>> # Without learnable parameters, and a faster state (time constant 20 updates)
        >>> m = SSRNorm1d(100, affine=False, momentum=0.05)
        >>> output = m(torch.randn(20, 100))
        >>> m(torch.randn(1, 100)).shape  # a single sample trains
        torch.Size([1, 100])
        >>> int(m.num_batches_tracked), bool(m.initialized)
        (2, True)
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class SSRNorm2d(_SSRNorm):
    r"""Homeostatic normalization over a 4D input, a drop-in for :class:`torch.nn.BatchNorm2d`.

    The layer of :class:`SSRNorm1d` (see there for the update rules, the gradient and how it
    differs from BatchNorm) for a mini-batch of 2D inputs with a channel dimension: the state is
    per channel, each update averages over the batch and all spatial positions.

    .. math::

        y = \frac{x - \hat\mu}{\sqrt{\hat\sigma^2 + \epsilon}} \cdot g \cdot \gamma + \beta

    Args:
        num_features: number of features or channels :math:`C` of the input.
        eps: a value added to the running variance for numerical stability. Default: ``1e-5``
        momentum: the weight of one update in the running state, ``1 / tau`` for a time constant
            of ``tau`` updates (bias-corrected: the first ``tau`` updates are averaged evenly);
            ``None`` for a cumulative average. Default: ``0.01``
        affine: learnable :math:`\gamma` and :math:`\beta`. Default: ``True``
        track_running_stats: keep the running mean and variance. With ``False`` they are
            ``None`` and each channel is scaled by the homeostatic gain alone (feedback-only
            normalization, no centering, no gradient projection), warm-started to unit root mean
            square. Default: ``True``
        device: the device of the parameters and buffers. Default: ``None``
        dtype: the floating point type of the parameters and buffers. Default: ``None``
        bias: learn :math:`\beta` (only relevant if ``affine``). Default: ``True``
        activity: the activity :math:`\phi` sensed on the normalized output :math:`z`:
            ``"square"`` (from the batch moments, no extra pass), ``"abs"``, ``"relu"`` or a
            callable on tensors. Default: ``"square"``
        set_point: the activity :math:`s` each channel is held at: a number, or
            ``"layer_mean"`` (the mean long-run activity of the layer: load balancing).
            Default: ``1.0``
        gain_rate: :math:`\eta`, the rate of the gain's feedback; ``0`` switches the gain off.
            Default: ``0.01``
        max_change: :math:`\delta`, the bound on the fractional change of the gain in one update,
            in ``(0, 1)``. Default: ``0.01``
        max_gain: the gain stays in ``[1 / max_gain, max_gain]``. Default: ``10.0``
        auto_update: update the state after every training forward. With ``False`` the forward
            only accumulates, and :meth:`homeostatic_step` (or the module-level
            :func:`homeostatic_step` on the whole model) applies one update. Default: ``True``
        project_gradient: project the input gradient as BatchNorm's backward does, with running
            gradient statistics; ``False`` treats the state as a plain constant scale.
            Default: ``True``
        grad_momentum: the weight of one batch in the running gradient statistics of the
            projection. Default: ``0.2``
        process_group: the process group the statistics are reduced over; ``None`` for the whole
            world. Default: ``None``

    Shape:
        - Input: :math:`(N, C, H, W)`
        - Output: :math:`(N, C, H, W)` (same shape as input)

    Examples::

        >>> m = SSRNorm2d(100)
        >>> m = SSRNorm2d(100, affine=False, gain_rate=0.0)  # running statistics, no gain
        >>> output = m(torch.randn(20, 100, 35, 45))
        >>> m.eval()(torch.randn(1, 100, 35, 45)).shape
        torch.Size([1, 100, 35, 45])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class SSRNorm3d(_SSRNorm):
    r"""Homeostatic normalization over a 5D input, a drop-in for :class:`torch.nn.BatchNorm3d`.

    The layer of :class:`SSRNorm1d` (see there for the update rules, the gradient and how it
    differs from BatchNorm) for a mini-batch of 3D inputs with a channel dimension.

    .. math::

        y = \frac{x - \hat\mu}{\sqrt{\hat\sigma^2 + \epsilon}} \cdot g \cdot \gamma + \beta

    Args:
        num_features: number of features or channels :math:`C` of the input.
        eps: a value added to the running variance for numerical stability. Default: ``1e-5``
        momentum: the weight of one update in the running state, ``1 / tau`` for a time constant
            of ``tau`` updates (bias-corrected: the first ``tau`` updates are averaged evenly);
            ``None`` for a cumulative average. Default: ``0.01``
        affine: learnable :math:`\gamma` and :math:`\beta`. Default: ``True``
        track_running_stats: keep the running mean and variance. With ``False`` they are
            ``None`` and each channel is scaled by the homeostatic gain alone (feedback-only
            normalization, no centering, no gradient projection), warm-started to unit root mean
            square. Default: ``True``
        device: the device of the parameters and buffers. Default: ``None``
        dtype: the floating point type of the parameters and buffers. Default: ``None``
        bias: learn :math:`\beta` (only relevant if ``affine``). Default: ``True``
        activity: the activity :math:`\phi` sensed on the normalized output :math:`z`:
            ``"square"`` (from the batch moments, no extra pass), ``"abs"``, ``"relu"`` or a
            callable on tensors. Default: ``"square"``
        set_point: the activity :math:`s` each channel is held at: a number, or
            ``"layer_mean"`` (the mean long-run activity of the layer: load balancing).
            Default: ``1.0``
        gain_rate: :math:`\eta`, the rate of the gain's feedback; ``0`` switches the gain off.
            Default: ``0.01``
        max_change: :math:`\delta`, the bound on the fractional change of the gain in one update,
            in ``(0, 1)``. Default: ``0.01``
        max_gain: the gain stays in ``[1 / max_gain, max_gain]``. Default: ``10.0``
        auto_update: update the state after every training forward. With ``False`` the forward
            only accumulates, and :meth:`homeostatic_step` (or the module-level
            :func:`homeostatic_step` on the whole model) applies one update. Default: ``True``
        project_gradient: project the input gradient as BatchNorm's backward does, with running
            gradient statistics; ``False`` treats the state as a plain constant scale.
            Default: ``True``
        grad_momentum: the weight of one batch in the running gradient statistics of the
            projection. Default: ``0.2``
        process_group: the process group the statistics are reduced over; ``None`` for the whole
            world. Default: ``None``

    Shape:
        - Input: :math:`(N, C, D, H, W)`
        - Output: :math:`(N, C, D, H, W)` (same shape as input)

    Examples::

        >>> m = SSRNorm3d(100)
        >>> output = m(torch.randn(4, 100, 5, 6, 7))
        >>> output.shape
        torch.Size([4, 100, 5, 6, 7])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


class _SSRNormXd(_SSRNorm):
    """What a ``SyncBatchNorm`` (whose input rank is not known) is converted to: accepts any
    input of at least 2 dimensions, as ``SyncBatchNorm`` does."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


# --------------------------------------------------------------------- conversion
#: SSRNorm's own arguments, which :func:`convert_batchnorm` passes on to every new layer.
_OWN = ("momentum", "activity", "set_point", "gain_rate", "max_change", "max_gain", "auto_update",
        "project_gradient", "grad_momentum", "process_group")


def _own_kwargs(ssr_kwargs: dict[str, Any]) -> dict[str, Any]:
    taken = sorted(k for k in ssr_kwargs if k in _STRUCTURAL)
    if taken:
        raise TypeError(
            f"convert_batchnorm takes {taken} from each BatchNorm layer; pass only SSRNorm's own "
            f"arguments {list(_OWN)}"
        )
    unknown = sorted(k for k in ssr_kwargs if k not in _OWN)
    if unknown:
        raise TypeError(f"Unexpected keyword arguments: {unknown}; SSRNorm's own arguments are: {list(_OWN)}")
    return ssr_kwargs


def _factory(module: nn.Module) -> dict[str, Any]:
    for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {}


def convert_batchnorm(module: nn.Module, **ssr_kwargs: Any) -> nn.Module:
    r"""Replace every ``BatchNorm1d``/``2d``/``3d`` and ``SyncBatchNorm`` in a model by an SSR layer.

    Walks the tree with ``named_children`` like
    :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`. Each new layer takes ``num_features``,
    ``eps``, ``affine``, ``bias``, ``track_running_stats``, the device and the dtype from the old
    one; the affine parameters are copied under ``torch.no_grad()`` and the running mean, variance
    and ``num_batches_tracked`` become the initial state (a trained BatchNorm needs no warm start;
    a fresh one warm-starts on the first batch). ``momentum`` is not carried over: BatchNorm's
    momentum averages batch statistics for evaluation, SSRNorm's sets its slow time constant.
    ``SyncBatchNorm`` (whose input rank is unknown) becomes a layer that accepts any input of at
    least 2 dimensions, with its process group. A layer shared by two parents stays shared.
    Convert before building the optimizer: the new layers hold new parameters.

    Args:
        module: the model, or a single BatchNorm layer.
        **ssr_kwargs: SSRNorm's own arguments for every new layer (``momentum``, ``activity``,
            ``set_point``, ``gain_rate``, ``max_change``, ``max_gain``, ``auto_update``,
            ``project_gradient``, ``grad_momentum``, ``process_group``).

    Returns:
        The model with its BatchNorm layers replaced (the same object unless ``module`` itself is
        a BatchNorm layer, in which case the new layer is returned).

    Examples::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> net = convert_batchnorm(net, momentum=0.02)
        >>> net[1]
        SSRNorm2d(8, eps=1e-05, momentum=0.02, affine=True, bias=True, track_running_stats=True,
                  activity='square', set_point=1.0, gain_rate=0.01, max_change=0.01, max_gain=10.0,
                  auto_update=True, project_gradient=True, grad_momentum=0.2)
    """
    kwargs = _own_kwargs(dict(ssr_kwargs))
    return _convert_to_ssr(module, kwargs, {})


def _convert_to_ssr(module: nn.Module, kwargs: dict[str, Any], memo: dict[int, nn.Module]) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    output = module
    if isinstance(module, _LazyNormBase) and module.has_uninitialized_params():
        raise ValueError(
            f"cannot convert an uninitialized {type(module).__name__}: run one forward first so "
            "that its number of features is known"
        )
    if isinstance(module, _BatchNorm):
        if isinstance(module, nn.BatchNorm1d):
            cls: type[_SSRNorm] = SSRNorm1d
        elif isinstance(module, nn.BatchNorm2d):
            cls = SSRNorm2d
        elif isinstance(module, nn.BatchNorm3d):
            cls = SSRNorm3d
        else:
            cls = _SSRNormXd
        own = dict(kwargs)
        if isinstance(module, nn.SyncBatchNorm) and "process_group" not in own:
            own["process_group"] = module.process_group
        output = cls(
            module.num_features,
            module.eps,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            bias=module.bias is not None,
            **_factory(module),
            **own,
        )
        with torch.no_grad():
            if module.affine:
                output.weight.copy_(module.weight)
                output.weight.requires_grad_(module.weight.requires_grad)
                if module.bias is not None:
                    output.bias.copy_(module.bias)
                    output.bias.requires_grad_(module.bias.requires_grad)
            if module.track_running_stats and module.running_mean is not None:
                output.running_mean.copy_(module.running_mean)  # type: ignore[union-attr]
                output.running_var.copy_(module.running_var)  # type: ignore[union-attr]
                tracked = module.num_batches_tracked
                if tracked is not None and int(tracked) > 0:
                    output.num_batches_tracked.copy_(tracked)
                    output.initialized.fill_(True)
        output.train(module.training)
        if hasattr(module, "qconfig"):
            output.qconfig = module.qconfig
    memo[id(module)] = output
    for name, child in module.named_children():
        output.add_module(name, _convert_to_ssr(child, kwargs, memo))
    return output


def convert_ssrnorm_to_batchnorm(module: nn.Module, momentum: Optional[float] = 0.1) -> nn.Module:
    r"""The inverse of :func:`convert_batchnorm`: replace every SSR layer by a BatchNorm layer.

    ``SSRNorm1d``/``2d``/``3d`` become ``BatchNorm1d``/``2d``/``3d`` and a converted ``SyncBatchNorm``
    becomes a ``SyncBatchNorm`` again, with the same ``num_features``, ``eps``, ``affine``, ``bias``,
    running statistics and ``num_batches_tracked``. The homeostatic gain is folded in so that the
    new layer computes the same function in eval mode: into the weight when the layer is affine,
    else into the running variance. The homeostatic state itself is dropped. A layer kept with
    ``track_running_stats=False`` has no BatchNorm equivalent (BatchNorm would use batch
    statistics) and raises.

    Args:
        module: the model, or a single SSR layer.
        momentum: the momentum of the new BatchNorm layers. Default: ``0.1``

    Returns:
        The model with its SSR layers replaced (a new layer if ``module`` itself is one).

    Examples::

        >>> net = convert_batchnorm(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)))
        >>> convert_ssrnorm_to_batchnorm(net)[1]
        BatchNorm1d(8, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)
    """
    return _convert_to_bn(module, momentum, {})


def _convert_to_bn(module: nn.Module, momentum: Optional[float], memo: dict[int, nn.Module]) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    output = module
    if isinstance(module, _SSRNorm):
        if not module.track_running_stats:
            raise ValueError(
                f"cannot convert {type(module).__name__} with track_running_stats=False to BatchNorm: "
                "its scale lives in the homeostatic gain alone, and BatchNorm would use batch statistics"
            )
        factory = _factory(module)
        common = dict(eps=module.eps, momentum=momentum, affine=module.affine,
                      track_running_stats=True, bias=module.bias is not None, **factory)
        if isinstance(module, SSRNorm1d):
            bn: _BatchNorm = nn.BatchNorm1d(module.num_features, **common)
        elif isinstance(module, SSRNorm2d):
            bn = nn.BatchNorm2d(module.num_features, **common)
        elif isinstance(module, SSRNorm3d):
            bn = nn.BatchNorm3d(module.num_features, **common)
        else:
            bn = nn.SyncBatchNorm(module.num_features, process_group=module.process_group, **common)
        with torch.no_grad():
            gain = module.gain
            bn.running_mean.copy_(module.running_mean)  # type: ignore[union-attr,arg-type]
            bn.num_batches_tracked.copy_(module.num_batches_tracked)  # type: ignore[union-attr]
            if module.affine:
                bn.weight.copy_(module.weight * gain)
                bn.weight.requires_grad_(module.weight.requires_grad)
                bn.running_var.copy_(module.running_var)  # type: ignore[union-attr,arg-type]
                if module.bias is not None:
                    bn.bias.copy_(module.bias)
                    bn.bias.requires_grad_(module.bias.requires_grad)
            else:
                var = (module.running_var + module.eps) / gain.square() - module.eps  # type: ignore[operator]
                bn.running_var.copy_(var.clamp_(min=0.0))  # type: ignore[union-attr]
        bn.train(module.training)
        output = bn
    memo[id(module)] = output
    for name, child in module.named_children():
        output.add_module(name, _convert_to_bn(child, momentum, memo))
    return output


def homeostatic_step(module: nn.Module, reduce_fn: Optional[ReduceFn] = None) -> int:
    """Apply the pending update of every SSR layer in ``module``, with one collective for all.

    For drivers of layers built with ``auto_update=False`` (such as a Lightning callback after
    each optimizer step): the statistics of all layers travel in one flat float32 tensor, reduced
    by ``reduce_fn``, else by the first layer's :meth:`~_SSRNorm.reduce_statistics` (one
    ``all_reduce`` when ``torch.distributed`` is initialized). Every process must call it.

    Args:
        module: the model holding SSR layers.
        reduce_fn: sums or averages a flat float32 tensor across processes. Default: ``None``

    Returns:
        The number of layers updated.

    Examples::

        >>> net = nn.Sequential(nn.Linear(4, 8), SSRNorm1d(8, auto_update=False))
        >>> _ = net(torch.randn(16, 4))
        >>> int(net[1].num_batches_tracked), homeostatic_step(net), int(net[1].num_batches_tracked)
        (0, 1, 1)
    """
    layers = [m for m in module.modules() if isinstance(m, _SSRNorm)]
    if not layers:
        return 0
    with torch.no_grad():
        pending = [m._pending() for m in layers]
        device = layers[0].gain.device
        flat = torch.cat([p.to(device) for p in pending])
        if reduce_fn is not None:
            flat = reduce_fn(flat)
        else:
            flat = layers[0].reduce_statistics(flat)
        sizes = [p.numel() for p in pending]
        ends = torch.tensor(sizes).cumsum(0).sub_(1).tolist()
        counts = flat[ends].tolist()  # one host synchronization for all layers
        updated = 0
        for m, part, count in zip(layers, flat.split(sizes), counts):
            m._sums, m._count = None, 0.0
            if count > 0:
                m._apply_pooled(part[:-1].to(m.gain.device), count)
                updated += 1
    return updated
