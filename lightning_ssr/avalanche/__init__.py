"""Avalanche front end: :class:`SSRPlugin`, SSR inside any Avalanche training strategy, and
:class:`PartialBatchPlugin`, the partial-batch scaling alone for any other strategy.

Needs ``avalanche-lib`` (``pip install "lightning-ssr[avalanche]"``)::

    from avalanche.training import Naive
    from avalanche.training.plugins import EWCPlugin
    from lightning_ssr.avalanche import SSRPlugin

    strategy = Naive(model, optimizer, criterion, plugins=[SSRPlugin(consolidation=5.0)])
"""

from lightning_ssr.avalanche.compat import fix_mas_zero_loss, fix_synaptic_intelligence
from lightning_ssr.avalanche.partial import PartialBatchPlugin
from lightning_ssr.avalanche.plugin import SSRPlugin

__all__ = ["PartialBatchPlugin", "SSRPlugin", "fix_mas_zero_loss", "fix_synaptic_intelligence"]
