r"""The SSR layers: :class:`SSRNorm1d`, :class:`SSRNorm2d`, :class:`SSRNorm3d` and the converted
``SyncBatchNorm``'s ``_SSRNormXd``, which differ only in :meth:`~_SSRNorm._check_input_dim`.
"""

from __future__ import annotations

import torch  # noqa: F401  (the Examples run with this module's globals)
from torch import Tensor

from lightning_ssr.norm.base import _SSRNorm

__all__ = ["SSRNorm1d", "SSRNorm2d", "SSRNorm3d"]


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
        kernel: how a training call runs: ``"auto"`` in the compiled CPU kernel
            (:mod:`lightning_ssr.norm.native`: one pass forward, two backward; built once, about
            30 s, the first time it is needed) where it applies (float32 on the CPU, contiguous,
            ``activity="square"``, running statistics) and in Python elsewhere; ``"native"`` the kernel, built at construction, and an error where
            it cannot run; ``"eager"`` always Python. Both paths compute the same (to float
            rounding); the first training batch (the warm start) and eval mode are always Python.
            Default: ``"auto"``

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
        kernel: where a training call runs: ``"auto"`` (the compiled CPU kernel where it
            applies), ``"native"`` or ``"eager"``; see :class:`SSRNorm1d`. Default: ``"auto"``

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
        kernel: where a training call runs: ``"auto"`` (the compiled CPU kernel where it
            applies), ``"native"`` or ``"eager"``; see :class:`SSRNorm1d`. Default: ``"auto"``

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
