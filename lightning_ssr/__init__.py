"""lightning_ssr: Synaptic Scaling Regularization for PyTorch Lightning."""

from lightning_ssr.core import SSRConfig, SSREngine

__version__ = "0.1.0"

__all__ = ["SSRConfig", "SSREngine", "__version__"]
