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

# _SSRNorm (the callback finds layers with it) and _SSRNormXd (a converted SyncBatchNorm) are
# re-exported for ``lightning_ssr.norm._SSRNorm`` and for models pickled before the split.
from lightning_ssr.norm.base import _SSRNorm  # noqa: F401
from lightning_ssr.norm.convert import convert_batchnorm, convert_ssrnorm_to_batchnorm
from lightning_ssr.norm.layers import SSRNorm1d, SSRNorm2d, SSRNorm3d, _SSRNormXd  # noqa: F401
from lightning_ssr.norm.sync import homeostatic_step

__all__ = [
    "SSRNorm1d",
    "SSRNorm2d",
    "SSRNorm3d",
    "convert_batchnorm",
    "convert_ssrnorm_to_batchnorm",
    "homeostatic_step",
]
