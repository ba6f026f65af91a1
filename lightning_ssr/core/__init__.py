"""The SSR engine in plain PyTorch: no Lightning or Avalanche import below this package.

One module per part of the mechanism: :mod:`~lightning_ssr.core.sensing` (activity),
:mod:`~lightning_ssr.core.homeostasis` (set points and scaling),
:mod:`~lightning_ssr.core.consolidation` (importance), :mod:`~lightning_ssr.core.protection`
(gates on updates), :mod:`~lightning_ssr.core.topology` (who consumes whose neurons),
:mod:`~lightning_ssr.core.capacity` (each layer's strength), :mod:`~lightning_ssr.core.anchoring`
(the pull toward past weights), :mod:`~lightning_ssr.core.recycling` (fresh unused neurons),
:mod:`~lightning_ssr.core.subspace` (drift kept off past inputs' directions);
:class:`SSREngine` composes them, :mod:`~lightning_ssr.core.persistence` saves and restores it, and
:mod:`~lightning_ssr.core.rules` holds the maths.
"""

from lightning_ssr.core import rules
from lightning_ssr.core.config import SSRConfig
from lightning_ssr.core.engine import NonFiniteActivityWarning, SSREngine
from lightning_ssr.core.layers import DEFAULT_LAYER_TYPES, find_layers
from lightning_ssr.core.sensing import ReduceFn
from lightning_ssr.core.state import LayerState

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
