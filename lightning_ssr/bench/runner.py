"""Run one method over one benchmark: through Avalanche's template or the Lightning stream runner."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_ssr.bench.methods import Method
from lightning_ssr.bench.models import make_model
from lightning_ssr.bench.settings import RunSettings
from lightning_ssr.continual import ClassifierModule, StreamResult, fit_stream, seed_stream
from lightning_ssr.data import ContinualBenchmark

__all__ = ["RunSettings", "run_method", "validation_benchmark", "state_bytes"]

#: Called once per finished training experience (drives the progress bar).
Tick = Callable[[], None]


def validation_benchmark(bench: ContinualBenchmark, fraction: float = 0.2, seed: int = 0) -> ContinualBenchmark:
    """The same stream with each training experience split into train and validation parts.

    Hyperparameters are chosen on the validation parts; the test stream is never looked at.

    Example:
        >>> from lightning_ssr.data import make_benchmark
        >>> val = validation_benchmark(make_benchmark("digits", "split", "domain"))
        >>> len(val.train_stream), len(val.test_stream)
        (5, 5)
    """
    from avalanche.benchmarks import dataset_benchmark

    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for exp in bench.train_stream:
        n = len(exp.dataset)
        order = torch.randperm(n, generator=gen).tolist()
        cut = max(1, int(round(n * fraction)))
        val.append(exp.dataset.subset(order[:cut]))
        train.append(exp.dataset.subset(order[cut:]))
    return dataclasses.replace(bench, benchmark=dataset_benchmark(train, val))


def state_bytes(root: Any, exclude: nn.Module) -> int:
    """Bytes of tensors reachable from ``root`` (a plugin) that are not ``exclude``'s own.

    Walks attributes, dicts, lists and modules (each storage counted once), so it measures what a
    method stores beyond the model: EWC's importances and parameter copies, LwF's previous model,
    SI's running sums.
    """
    own = {p.data_ptr() for p in exclude.parameters()} | {b.data_ptr() for b in exclude.buffers()}
    seen_ptrs: set[int] = set()
    seen_ids: set[int] = set()
    total = 0

    def walk(obj: Any, depth: int) -> None:
        nonlocal total
        if depth > 6 or id(obj) in seen_ids or obj is exclude:
            return
        seen_ids.add(id(obj))
        if isinstance(obj, Tensor):
            ptr = obj.untyped_storage().data_ptr()
            if ptr not in own and ptr not in seen_ptrs and obj.numel():
                seen_ptrs.add(ptr)
                total += obj.untyped_storage().nbytes()
            return
        if isinstance(obj, nn.Module):
            for t in [*obj.parameters(), *obj.buffers()]:
                walk(t, depth + 1)
            return
        if isinstance(obj, Mapping):
            for v in obj.values():
                walk(v, depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                walk(v, depth + 1)
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("avalanche", "lightning_ssr"):
            for v in vars(obj).values():
                walk(v, depth + 1)

    walk(root, 0)
    return total


def _model(bench: ContinualBenchmark, s: RunSettings, method: Method) -> nn.Module:
    if method.name == "pnn":
        from avalanche.models import PNN

        return PNN(num_layers=s.layers, in_features=bench.input_size, hidden_features_per_column=s.hidden)
    return make_model(bench.input_size, s.hidden, bench.n_classes, bench.multi_head, s.layers, s.model)


def _plugin(method: Method, hp: Mapping[str, Any]) -> list[Any]:
    if method.plugin is None:
        return []
    from avalanche.training.plugins import EWCPlugin, LwFPlugin, MASPlugin, ReplayPlugin, SynapticIntelligencePlugin

    from lightning_ssr.avalanche import SSRPlugin, fix_mas_zero_loss, fix_synaptic_intelligence

    if method.plugin == "si":
        fix_synaptic_intelligence()  # avalanche-lib 0.6's SI measures no importance on CPU
    if method.plugin == "mas":
        fix_mas_zero_loss()  # avalanche-lib 0.6's MAS stops at a batch whose loss is exactly zero
    if method.plugin == "ssr+replay":  # SSR inside Avalanche beside a replay buffer of the same size as replay's
        ssr_hp = {k: v for k, v in hp.items() if k != "mem_size"}
        return [SSRPlugin(**ssr_hp), ReplayPlugin(mem_size=hp["mem_size"])]
    make = {"ewc": EWCPlugin, "si": SynapticIntelligencePlugin, "mas": MASPlugin, "lwf": LwFPlugin,
            "replay": ReplayPlugin, "ssr": SSRPlugin}[method.plugin]
    return [make(**hp)]


def _iteration_budget(iterations: int) -> Any:
    """An Avalanche plugin that ends each experience's training after ``iterations`` mini-batches."""
    from avalanche.training.plugins import SupervisedPlugin

    class IterationBudget(SupervisedPlugin):
        def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            strategy._stop_training = False  # a stop at the end of the last experience must not carry over

        def after_training_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            # Avalanche's clock is the last plugin: it has not yet counted this iteration
            if strategy.clock.train_exp_iterations + 1 >= iterations:
                strategy.stop_training()

    return IterationBudget()


def _sample_bytes(bench: ContinualBenchmark) -> int:
    """One stored sample: its float32 image and int64 label."""
    return bench.input_size * 4 + 8


def _replay_bytes(plugin: Any, bench: ContinualBenchmark) -> int:
    """A replay buffer holds samples: their images and labels."""
    stored = sum(len(g.buffer) for g in plugin.storage_policy.buffer_groups.values()) if hasattr(
        plugin.storage_policy, "buffer_groups") else len(plugin.storage_policy.buffer)
    return stored * _sample_bytes(bench)


def run_avalanche(method: Method, hp: Mapping[str, Any], bench: ContinualBenchmark, s: RunSettings,
                  seed: int, tick: Optional[Tick] = None, loggers: Optional[list[Any]] = None) -> StreamResult:
    """Train an Avalanche strategy over the stream, evaluating every test experience after each.

    The accuracy matrix comes from Avalanche's own ``accuracy_metrics(experience=True)``.
    """
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import Cumulative, Naive, PNNStrategy
    from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin

    seed_stream(seed, "model")
    model = _model(bench, s, method)
    plugins = _plugin(method, hp)
    if s.partial_batches_all and not any(hasattr(p, "engine") for p in plugins):  # SSRPlugin has its own (or is the ablation)
        from lightning_ssr.avalanche import PartialBatchPlugin

        plugins.append(PartialBatchPlugin())

    class _Tick(SupervisedPlugin):
        def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            if tick is not None:
                tick()

    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=loggers or [])
    template = {"pnn": PNNStrategy, "joint": Cumulative}.get(method.name, Naive)
    budget = [_iteration_budget(s.iterations)] if s.iterations is not None else []
    strategy = template(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=s.lr, fused=True), criterion=nn.CrossEntropyLoss(),
        train_mb_size=s.batch_size, train_epochs=s.max_epochs, eval_mb_size=s.eval_batch_size, device="cpu",
        plugins=[*budget, *plugins, _Tick()], evaluator=evaluator,
    )
    n = bench.n_tasks
    rows: list[list[float]] = []
    train_time: list[float] = []
    train_cpu: list[float] = []
    eval_time: list[float] = []
    start = time.perf_counter()
    for i, exp in enumerate(bench.train_stream):
        seed_stream(seed, "train", i)  # new heads, then the shuffling order, as fit_stream
        t0, cpu0 = time.perf_counter(), time.process_time()
        strategy.train(exp)
        train_time.append(time.perf_counter() - t0)
        train_cpu.append(time.process_time() - cpu0)
        t0 = time.perf_counter()
        seed_stream(seed, "eval", i)  # heads grown for the test stream's tasks, as fit_stream
        metrics = strategy.eval(bench.test_stream)
        eval_time.append(time.perf_counter() - t0)
        row = []
        for j in range(n):
            key = next(k for k in metrics if k.startswith("Top1_Acc_Exp/eval_phase/test_stream/") and k.endswith(f"/Exp{j:03d}"))
            row.append(float(metrics[key]))
        rows.append(row)
    extra = 0
    for p in plugins:
        extra += _replay_bytes(p, bench) if hasattr(p, "storage_policy") else (
            p.extra_state_bytes() if hasattr(p, "extra_state_bytes") else state_bytes(p, model))
    if method.name == "pnn":
        extra = sum(p.numel() * p.element_size() for p in model.parameters()) - _first_column_bytes(model)
    if method.name == "joint":  # the samples of every earlier task, kept to train on again
        extra = sum(len(exp.dataset) for exp in list(bench.train_stream)[:-1]) * _sample_bytes(bench)
    return StreamResult(
        method.name, accuracy=rows, n_experiences=n, train_time_s=train_time, train_cpu_s=train_cpu, eval_time_s=eval_time,
        wall_time_s=time.perf_counter() - start, extra_state_bytes=int(extra),
        config={"runner": "avalanche", "seed": seed, **s.to_dict()}, method_config=dict(hp),
    )


def _first_column_bytes(pnn: nn.Module) -> int:
    """PNN's first column (and its first head) is the base model; every later column is extra."""
    total = 0
    for name, p in pnn.named_parameters():
        if ".columns.0." in name or name.startswith("classifier.classifiers.0."):
            total += p.numel() * p.element_size()
    return total


def run_lightning(method: Method, hp: Mapping[str, Any], bench: ContinualBenchmark, s: RunSettings,
                  seed: int, tick: Optional[Tick] = None, logger: Any = None,
                  extra_callbacks: Sequence[Any] = ()) -> StreamResult:
    """Train a LightningModule over the stream with the stream runner (SSR as the callback), with
    ``extra_callbacks`` after the method's own (e.g. a probe that prints after each task)."""
    import lightning.pytorch as pl

    from lightning_ssr import SynapticScaling

    seed_stream(seed, "model")
    model = _model(bench, s, method)
    module = ClassifierModule(model, optimizer="adam", lr=s.lr, fused=True)
    callbacks: list[pl.Callback] = []
    ssr: Optional[SynapticScaling] = None
    if method.name != "naive-lightning":
        ssr = SynapticScaling(log_diagnostics=logger is not None, **hp)
        callbacks.append(ssr)
    if s.partial_batches_all and ssr is None:  # SSR has its own (or is the ablation without it)
        from lightning_ssr import PartialBatchScaling

        callbacks.append(PartialBatchScaling())

    class _Tick(pl.Callback):
        def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if tick is not None:
                tick()

    if ssr is not None and logger is not None:
        from lightning_ssr.loggers import SSRWandbHistograms

        callbacks.append(SSRWandbHistograms(ssr))  # logs only to W&B loggers, else does nothing
    callbacks += [*extra_callbacks, _Tick()]
    result = fit_stream(
        module, bench, callbacks=callbacks, logger=logger, epochs=s.max_epochs, batch_size=s.batch_size,
        eval_batch_size=s.eval_batch_size, seed=seed, method=method.name, method_config=dict(hp),
        trainer_kwargs={"accelerator": "cpu", "devices": 1,
                        **({"max_steps": s.iterations} if s.iterations is not None else {})},
    )
    result.extra_state_bytes = ssr.extra_state_bytes() if ssr is not None else 0
    result.config = {**result.config, "runner": "lightning", **s.to_dict()}
    return result


def run_method(method: Method, hp: Mapping[str, Any], bench: ContinualBenchmark, s: RunSettings, seed: int,
               tick: Optional[Tick] = None, logger: Any = None, extra_callbacks: Sequence[Any] = ()) -> StreamResult:
    """Run ``method`` with hyperparameters ``hp`` through its runner.

    Raises:
        ValueError: ``extra_callbacks`` (Lightning callbacks) for a method of the Avalanche runner.
    """
    if method.runner == "avalanche":
        if extra_callbacks:
            raise ValueError(f"`extra_callbacks` are Lightning callbacks, but method {method.name!r} runs in Avalanche; "
                             f"got {list(extra_callbacks)!r}")
        return run_avalanche(method, hp, bench, s, seed, tick, loggers=[logger] if logger is not None else None)
    return run_lightning(method, hp, bench, s, seed, tick, logger, extra_callbacks)
