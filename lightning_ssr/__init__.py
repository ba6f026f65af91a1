"""lightning_ssr: Synaptic Scaling Regularization for PyTorch Lightning.

The mechanism lives once, in :mod:`lightning_ssr.core` (plain PyTorch); the Lightning callback
:class:`SynapticScaling`, the normalization layers and the Avalanche plugin
(:mod:`lightning_ssr.avalanche`) are thin front ends over it. The names below are imported on
first use, so ``import lightning_ssr`` (and the command line's ``--help``) stays fast.
"""

from typing import TYPE_CHECKING

from lightning_ssr._lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_ssr.callback import SynapticScaling
    from lightning_ssr.core import SSRConfig, SSREngine
    from lightning_ssr.norm import SSRNorm1d, SSRNorm2d, SSRNorm3d, convert_batchnorm, convert_ssrnorm_to_batchnorm
    from lightning_ssr.partial_batches import PartialBatchScaling

__version__ = "0.1.0"

__all__ = [
    "PartialBatchScaling",
    "SSRConfig",
    "SSREngine",
    "SSRNorm1d",
    "SSRNorm2d",
    "SSRNorm3d",
    "SynapticScaling",
    "__version__",
    "convert_batchnorm",
    "convert_ssrnorm_to_batchnorm",
]

__getattr__, __dir__ = lazy_exports(globals(), {
    "SynapticScaling": "lightning_ssr.callback",
    "PartialBatchScaling": "lightning_ssr.partial_batches",
    "SSRConfig": "lightning_ssr.core",
    "SSREngine": "lightning_ssr.core",
    **{name: "lightning_ssr.norm" for name in ("SSRNorm1d", "SSRNorm2d", "SSRNorm3d", "convert_batchnorm",
                                              "convert_ssrnorm_to_batchnorm")},
})
