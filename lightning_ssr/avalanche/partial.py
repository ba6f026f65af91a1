"""``PartialBatchPlugin``: a smaller last minibatch counts by its samples in any Avalanche strategy.

:class:`~lightning_ssr.avalanche.SSRPlugin` does this itself (``scale_partial_batches``, on by
default); this plugin gives Avalanche's other strategies (Naive, EWC, SI, MAS, LwF, replay) the
same treatment, so that a comparison with SSR can be read both ways. It drives the engine's own
:class:`~lightning_ssr.core.partial.PartialBatches`, nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from avalanche.training.plugins import SupervisedPlugin
from typing_extensions import override

from lightning_ssr.core.partial import PartialBatches, refuse_double_scaling

if TYPE_CHECKING:
    from avalanche.training.templates import SupervisedTemplate

__all__ = ["PartialBatchPlugin"]


class PartialBatchPlugin(SupervisedPlugin):
    """Count an optimizer step on fewer samples than the experience's largest as that fraction of a step.

    A step on ``n`` samples (``len(strategy.mb_x)``, replayed samples included), where the current
    experience's largest step had ``N``, has its gradients (the regularizers' included: they are
    added to the loss before the backward pass) and then the optimizer's change to every trainable
    parameter multiplied by ``n / N``. Each experience measures its largest step afresh.

    Do not add it beside an :class:`~lightning_ssr.avalanche.SSRPlugin` with
    ``scale_partial_batches=True``: the step would be scaled twice (the first experience raises).

    Example:
        >>> import torch
        >>> from avalanche.training import Naive
        >>> from avalanche.training.plugins import EvaluationPlugin
        >>> from lightning_ssr.data import make_benchmark
        >>> bench = make_benchmark("digits", "split", "domain", n_tasks=2, train_subset=40, test_subset=16)
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, bench.n_classes))
        >>> partial = PartialBatchPlugin()
        >>> strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), 1e-3),
        ...                  criterion=torch.nn.CrossEntropyLoss(), train_mb_size=16, plugins=[partial],
        ...                  evaluator=EvaluationPlugin(loggers=[]))
        >>> for exp in bench.train_stream:  # 40 samples an experience: 16, 16, then 8
        ...     _ = strategy.train(exp)
        >>> partial.partial.scaled  # one half step an experience
        2
    """

    def __init__(self) -> None:
        super().__init__()
        self.partial = PartialBatches(enabled=True)

    @override
    def before_training_exp(self, strategy: SupervisedTemplate, *args: Any, **kwargs: Any) -> None:
        refuse_double_scaling(strategy.plugins, "plugins", type(self).__name__, "an SSRPlugin")

    @override
    def before_update(self, strategy: SupervisedTemplate, *args: Any, **kwargs: Any) -> None:
        self.partial.observe(len(strategy.mb_x))
        self.partial.before_step(strategy.model.parameters())

    @override
    def after_update(self, strategy: SupervisedTemplate, *args: Any, **kwargs: Any) -> None:
        self.partial.after_step()

    @override
    def after_training_exp(self, strategy: SupervisedTemplate, *args: Any, **kwargs: Any) -> None:
        self.partial.new_task()

    def state_dict(self) -> dict[str, int]:
        """The experience's largest step so far, the samples pending and the count of scaled steps."""
        return self.partial.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.partial.load_state_dict(state)
