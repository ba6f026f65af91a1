"""The SSR engine in plain PyTorch: no Lightning or Avalanche import below this package."""

from lightning_ssr.core.config import SSRConfig
from lightning_ssr.core.engine import LayerState, NonFiniteActivityWarning, ReduceFn, SSREngine
from lightning_ssr.core.layers import DEFAULT_LAYER_TYPES, find_layers
from lightning_ssr.core import rules

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "LayerState",
    "NonFiniteActivityWarning",
    "ReduceFn",
    "SSRConfig",
    "SSREngine",
    "find_layers",
    "rules",
]
