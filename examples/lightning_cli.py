"""SynapticScaling set from a LightningCLI YAML config, on a Split digits stream, beside plain training.

LightningCLI builds the Trainer's callbacks (``trainer.callbacks`` in the YAML, SSR's
hyperparameters under ``config:``) and the model; the script then runs the stream through
:func:`lightning_ssr.continual.fit_stream` twice, with the configured callbacks and without them,
and prints both average accuracies. scikit-learn's digits are embedded: nothing is downloaded.

    python examples/lightning_cli.py --config examples/ssr_config.yaml
    python examples/lightning_cli.py --config examples/ssr_config.yaml --trainer.callbacks.init_args.config.anchor_rate 0.05
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_ssr import SynapticScaling  # noqa: E402
from lightning_ssr.continual import ClassifierModule, fit_stream  # noqa: E402
from lightning_ssr.data import make_benchmark  # noqa: E402

BENCH = make_benchmark("digits", "split", "domain", seed=0)


class DigitsMLP(ClassifierModule):
    """A 2-hidden-layer MLP for the Split digits stream, with the arguments a config file sets.

    Args:
        hidden: units per hidden layer.
        lr: Adam's learning rate.
    """

    def __init__(self, hidden: int = 100, lr: float = 1e-3) -> None:
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(BENCH.input_size, hidden), nn.ReLU(),
                                       nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, BENCH.n_classes)),
                         lr=lr)
        self.arguments = {"hidden": hidden, "lr": lr}  # to build the same model without SSR


def main(args: list[str] | None = None) -> dict[str, float]:
    warnings.filterwarnings("ignore", module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    cli = LightningCLI(DigitsMLP, run=False, save_config_callback=None, args=args)
    ssr = [cb for cb in cli.trainer.callbacks if isinstance(cb, SynapticScaling)]
    if not ssr:
        raise SystemExit("the config has no lightning_ssr.SynapticScaling under trainer.callbacks")
    epochs = cli.trainer.max_epochs or 1
    print(f"SynapticScaling from the config: {ssr[0].config}")
    twin = DigitsMLP(**cli.model.arguments)
    twin.load_state_dict(cli.model.state_dict())  # the same initial weights
    accuracy = {}
    for name, model, callbacks in (("SSR", cli.model, ssr), ("without SSR", twin, [])):
        result = fit_stream(model, BENCH, callbacks=callbacks, epochs=epochs, batch_size=32, seed=0,
                            trainer_kwargs={"accelerator": "cpu", "devices": 1})
        accuracy[name] = 100 * result.average_accuracy
    print(f"Split digits, domain-incremental, {epochs} epochs a task: average accuracy "
          f"{accuracy['SSR']:.1f} % with SSR, {accuracy['without SSR']:.1f} % without")
    return accuracy


if __name__ == "__main__":
    main()
