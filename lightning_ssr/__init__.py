"""lightning_ssr: Synaptic Scaling Regularization for PyTorch Lightning.

The mechanism lives once, in :mod:`lightning_ssr.core` (plain PyTorch); the Lightning callback
:class:`SynapticScaling`, the normalization layers and the Avalanche plugin
(:mod:`lightning_ssr.avalanche`) are thin front ends over it.
"""

from lightning_ssr.callback import SynapticScaling
from lightning_ssr.core import SSRConfig, SSREngine
from lightning_ssr.norm import SSRNorm1d, SSRNorm2d, SSRNorm3d, convert_batchnorm, convert_ssrnorm_to_batchnorm

__version__ = "0.1.0"

__all__ = [
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
