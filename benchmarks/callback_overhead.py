"""Training time with the SynapticScaling callback over training time without it.

Same model, data and Trainer settings; runs with and without the callback are interleaved in one
process so that machine noise hits both alike. Two SSR settings: ``task 1`` (sensing and the
activity updates, nothing protected yet) and ``task 2`` (the same, plus protection of the neurons
consolidated after task 1 on the same LightningModule: the most expensive path). Each ratio is one
interleaved pair (with SSR, without; the order alternates); the median over pairs is printed with
its range, for wall time and for this process's CPU time. Then two steadier measures, both
checked against the targets (1.02 with nothing protected, 1.05 with protection on): the ``floor``
ratio (per step position the fastest time over the repeats, summed: :func:`floor_time`) and the
time inside SSR's own code measured in-process (``in-SSR``).

Usage::

    python benchmarks/callback_overhead.py                 # MLP 2x400 and the small CNN, CPU
    python benchmarks/callback_overhead.py --accelerator gpu --steps 400
    python benchmarks/callback_overhead.py --protection update   # the earlier default
    python benchmarks/callback_overhead.py --subspace-energy 0  # without input-subspace protection
    python benchmarks/callback_overhead.py --protect-every 1    # the pull and the projection after every step
    python benchmarks/callback_overhead.py --malloc default      # glibc's allocator as it comes
    python benchmarks/callback_overhead.py --parts --threads 1   # where SSR's time goes, part by part

By default the script first raises glibc's mmap and trim thresholds (``mallopt``, as the
environment variables ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_``
would): with glibc's defaults every batch-sized tensor (a few hundred KB) is a fresh ``mmap``
whose pages fault in again, and identical plain fits of the MLP spread by 1.4-1.5x on the 2-core
machine; with the thresholds raised they spread by 1.1-1.2x and run about 20 % faster. Both fits of
a pair run under the same allocator, so the ratio measures SSR either way, just with less noise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import ctypes.util
import functools
import logging
import statistics
import time
from collections.abc import Iterator
from typing import NamedTuple

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ssr import SynapticScaling
from lightning_ssr.core.anchoring import Anchoring
from lightning_ssr.core.engine import SSREngine
from lightning_ssr.core.sensing import ActivitySensor


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(), nn.Linear(400, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )


class StepClock(L.Callback):
    """Marks the start of every training batch and the end of training: each step's wall time."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.marks.append(time.perf_counter())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.marks.append(time.perf_counter())


class Fit(NamedTuple):
    """One ``fit``: wall and this process's CPU seconds, and the wall seconds of each step."""

    wall: float
    cpu: float
    steps: list[float]


def _fit(model: L.LightningModule, loader: DataLoader, steps: int, callbacks: list, accelerator: str) -> Fit:
    clock = StepClock()  # in every fit, with SSR or without
    trainer = L.Trainer(
        max_steps=steps, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[clock, *callbacks],
    )
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, loader)
    if accelerator != "cpu":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return Fit(wall, cpu, [b - a for a, b in zip(clock.marks, clock.marks[1:])])


def floor_time(fits: list[Fit]) -> float:
    """The steady cost of a fit: per step position, its fastest time over the repeats, summed, plus the
    fastest remainder (set-up and end of the fit).

    Interference only ever slows a step down, and SSR's periodic work (sensing, homeostatic updates)
    falls on the same step positions in every repeat, so the per-position minimum keeps SSR's cost
    while dropping the machine's noise, which a whole fit's minimum cannot (each fit collects some).

    Example:
        >>> round(floor_time([Fit(1.0, 1.0, [0.3, 0.5]), Fit(1.1, 1.1, [0.5, 0.3])]), 6)
        0.8
    """
    per_step = sum(min(col) for col in zip(*(f.steps for f in fits)))
    return per_step + min(f.wall - sum(f.steps) for f in fits)


TARGETS = {"task 1": 1.02, "task 2": 1.05}


def steady_malloc() -> bool:
    """Keep freed memory in the process (glibc ``mallopt``): no ``mmap`` / ``munmap`` and page
    faults per batch-sized tensor, the main source of run-to-run noise in these fits.

    Returns:
        Whether the thresholds were set (``False`` where the C library is not glibc).
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # from glibc's malloc.h
    return all(mallopt(option, value) == 1 for option, value in (
        (m_mmap_threshold, 64 << 20), (m_trim_threshold, 256 << 20), (m_top_pad, 64 << 20)))


def _timed(fn, totals: dict[str, float], label: str):
    """``fn`` adding its wall time to ``totals[label]`` on every call."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[label] = totals.get(label, 0.0) + time.perf_counter() - start
    return wrapper


@contextlib.contextmanager
def timed_calls(patches: dict[str, tuple[type, str]]) -> Iterator[dict[str, float]]:
    """Sum the wall time of each patched method (``label: (class, name)``) while the block runs;
    ``ActivitySensor._make_hook`` times the forward hooks it makes (each call of each hook)."""
    totals: dict[str, float] = {}
    saved = [(owner, name, getattr(owner, name)) for owner, name in patches.values()]
    try:
        for label, (owner, name) in patches.items():
            fn = getattr(owner, name)
            if (owner, name) == (ActivitySensor, "_make_hook"):
                setattr(owner, name, functools.wraps(fn)(
                    lambda *a, _fn=fn, _label=label, **k: _timed(_fn(*a, **k), totals, _label)))
            else:
                setattr(owner, name, _timed(fn, totals, label))
        yield totals
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)


#: Everything of SSR's own code that runs in a fit (callback hooks, engine steps, forward hooks), for the
#: ``in-SSR`` measure. The ratio of two whole fits is noisy on a shared machine (single plain fits of this
#: script spread by about +-10 %); the time inside SSR's code is measured in-process around each call, so
#: ``1 + inside / (fit - inside)`` estimates the overhead with far less noise (it misses only indirect
#: costs such as cache effects).
INSIDE_SSR: dict[str, tuple[type, str]] = {
    **{name: (SynapticScaling, name) for name in (
        "setup", "on_train_start", "on_train_batch_start", "on_before_optimizer_step", "_after_optimizer_step",
        "on_train_batch_end", "on_fit_end", "teardown", "state_dict")},
    "hooks": (ActivitySensor, "_make_hook"),
}


#: The parts of SSR's time per step that ``--parts`` prints: label -> (class, method). Nested: the
#: callback's hooks hold the engine's steps, which hold the pull, the projection and the update.
PARTS: dict[str, tuple[type, str]] = {
    "before the step": (SynapticScaling, "on_before_optimizer_step"),
    "after the step": (SynapticScaling, "_after_optimizer_step"),
    "  anchoring pull": (Anchoring, "pull"),
    "  input-subspace projection": (SSREngine, "_project"),
    "  activity update and scaling": (SSREngine, "_update"),
    "sensing forward hooks": (ActivitySensor, "_make_hook"),
}
#: The input sketch's line of ``--parts`` (inside the sensing hooks; the engine holds its bound method).
SKETCH = "  input sketch"


def part_times(make, steps: int, batch: int, accelerator: str, ssr: dict) -> tuple[float, float, dict[str, float]]:
    """Milliseconds per step of a plain fit and of a protected fit (task 2, as in :func:`measure`),
    and of each part of :data:`PARTS` in that fit (one run each after a warm-up: a profile, not a ratio)."""
    x, y = _data(steps, batch)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    model, cb = Classifier(make()), SynapticScaling(**ssr)
    _fit(model, loader, steps, [cb], accelerator)  # task 1, consolidated at the fit's end
    plain = copy.deepcopy(model)
    _fit(copy.deepcopy(plain), loader, 10, [], accelerator)  # warm-up
    base = _fit(copy.deepcopy(plain), loader, steps, [], accelerator).wall
    sensor = cb.engine.sensor
    observe = sensor.observe_input
    with timed_calls(PARTS) as spent:
        if observe is not None:
            sensor.observe_input = _timed(observe, spent, SKETCH)
        try:
            wall = _fit(model, loader, steps, [cb], accelerator).wall
        finally:
            sensor.observe_input = observe
    return 1e3 * base / steps, 1e3 * wall / steps, {label: 1e3 * spent.get(label, 0.0) / steps for label in [*PARTS, SKETCH]}


def ssr_settings(protection: str | None, subspace_energy: float | None, protect_every: int | None) -> dict:
    """The callback's keyword arguments: the library's defaults but for the options given."""
    ssr = {} if protection is None else {"protection": protection}
    if subspace_energy is not None:
        ssr["subspace_energy"] = subspace_energy
    if protect_every is not None:
        ssr["protect_every"] = protect_every
    return ssr


def _data(steps: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(steps * batch, 1, 28, 28, generator=g), torch.randint(0, 10, (steps * batch,), generator=g)


class Result(NamedTuple):
    """One setting's ratios (fit with SSR over fit without)."""

    pairs: list[tuple[float, float]]  # (wall, cpu) of each interleaved pair
    floor: float  # floor_time with SSR over floor_time without
    inside: float  # 1 + time inside SSR's code / the rest of one more fit


def measure(make, steps: int, repeats: int, batch: int, accelerator: str,
            protection: str | None = None, subspace_energy: float | None = None,
            protect_every: int | None = None) -> dict[str, Result]:
    """Per setting, the ratios of :class:`Result`.

    ``task 1``: a fresh callback (sensing and activity updates, nothing protected yet) against a fresh model
    without it; ``task 2``: a callback that consolidated a first task on the same LightningModule,
    so protection (anchoring by default) runs from the first step, against a copy of that model
    without the callback (a trained model's fit is itself slower than a fresh one's, which is not
    SSR's cost). The order inside a pair alternates between repeats.
    """
    x, y = _data(steps, batch)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    ssr = ssr_settings(protection, subspace_energy, protect_every)
    protected = Classifier(make())
    task2 = SynapticScaling(**ssr)
    _fit(protected, loader, 10, [task2], accelerator)  # task 1 consolidated: protection is on from now
    assert task2.engine is not None and task2.engine.protecting
    _fit(Classifier(make()), loader, 10, [], accelerator)  # warm-up
    fits: dict[str, dict[str, list[Fit]]] = {k: {"ssr": [], "none": []} for k in ("task 1", "task 2")}
    for r in range(repeats):
        for key in fits:
            runs = {
                "ssr": lambda: _fit(protected, loader, steps, [task2], accelerator) if key == "task 2"
                else _fit(Classifier(make()), loader, steps, [SynapticScaling(**ssr)], accelerator),
                "none": lambda: _fit(copy.deepcopy(protected) if key == "task 2" else Classifier(make()),
                                     loader, steps, [], accelerator),
            }
            order = ("ssr", "none") if r % 2 else ("none", "ssr")
            for name in order:
                fits[key][name].append(runs[name]())
    results = {}
    for key, runs in fits.items():
        with timed_calls(INSIDE_SSR) as spent:
            cb = task2 if key == "task 2" else SynapticScaling(**ssr)
            wall = _fit(protected if key == "task 2" else Classifier(make()), loader, steps, [cb], accelerator).wall
        inside = sum(spent.values())
        results[key] = Result(
            pairs=[(s.wall / n.wall, s.cpu / n.cpu) for s, n in zip(runs["ssr"], runs["none"])],
            floor=floor_time(runs["ssr"]) / floor_time(runs["none"]),
            inside=1.0 + inside / (wall - inside),
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per timed fit")
    parser.add_argument("--protection", default=None, choices=["anchor", "update", "gradient"],
                        help="SSR's protection (default: the library's)")
    parser.add_argument("--subspace-energy", type=float, default=None,
                        help="SSR's subspace_energy (input-subspace protection; default: the library's, 0.6 with "
                             "anchoring; 0 switches it off)")
    parser.add_argument("--protect-every", type=int, default=None,
                        help="SSR's protect_every (the pull and the projection every k-th step; default: the library's)")
    parser.add_argument("--parts", action="store_true",
                        help="instead of the ratios, where SSR's time goes: ms per step of each part in one protected fit")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved pairs per setting (median taken)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated from mlp, cnn")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--malloc", default="steady", choices=["steady", "default"],
                        help="steady: raise glibc's mmap/trim thresholds first (less noise); default: leave them")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    models = {"mlp": ("MLP 2x400", mlp), "cnn": ("small CNN", cnn)}
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    if not chosen or any(m not in models for m in chosen):
        parser.error(f"--models must be a comma-separated subset of {list(models)}, got {args.models!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = "glibc defaults"
    if args.malloc == "steady":
        allocator = "glibc thresholds raised" if steady_malloc() else "not glibc: thresholds left as they are"
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-fit banners between the rows
    device = torch.cuda.get_device_name() if args.accelerator in ("gpu", "cuda") else f"CPU, {torch.get_num_threads()} threads"
    if args.parts:
        print_parts(chosen, models, args)
        return
    print(f"callback overhead: {args.steps} steps, {args.repeats} interleaved pairs per setting, batch "
          f"{args.batch_size}, {device}, protection {args.protection or 'default'}, subspace_energy "
          f"{'default' if args.subspace_energy is None else format(args.subspace_energy, 'g')}, protect_every "
          f"{'default' if args.protect_every is None else args.protect_every}, malloc: {allocator}")
    print("ratio = fit with SSR / fit without, median over pairs [min-max]; target: task 1 (nothing protected) "
          f"<= {TARGETS['task 1']}, task 2 (protection on) <= {TARGETS['task 2']}")
    print("floor: per step position the fastest time over the repeats, summed (with SSR / without; steady)")
    print("in-SSR: 1 + (time inside SSR's code) / (the rest of the fit), measured in-process (steady)")
    print(f"{'model':<10} {'setting':<7} {'wall ratio':>24} {'cpu ratio':>24} {'floor':>6} {'in-SSR':>7}  target")
    for key in chosen:
        name, make = models[key]
        results = measure(make, args.steps, args.repeats, args.batch_size, args.accelerator, args.protection,
                          args.subspace_energy, args.protect_every)
        for setting, res in results.items():
            cells = []
            for i in range(2):
                vals = [p[i] for p in res.pairs]
                cells.append(f"{statistics.median(vals):.3f} [{min(vals):.3f}-{max(vals):.3f}]")
            target = TARGETS[setting]
            met = res.floor <= target and res.inside <= target
            print(f"{name:<10} {setting:<7} {cells[0]:>24} {cells[1]:>24} {res.floor:>6.3f} {res.inside:>7.3f}  "
                  f"{'met' if met else 'NOT met'} (floor and in-SSR <= {target})")


def print_parts(chosen: list[str], models: dict, args: argparse.Namespace) -> None:
    """``--parts``: per model, a plain and a protected fit's ms per step and each part's (:data:`PARTS`)."""
    ssr = ssr_settings(args.protection, args.subspace_energy, args.protect_every)
    print(f"where SSR's time goes (task 2, protection on): {args.steps} steps, batch {args.batch_size}, "
          f"{args.accelerator}, {torch.get_num_threads()} threads, SSR {ssr or 'defaults'}; ms per step, one fit each")
    for key in chosen:
        name, make = models[key]
        plain, protected, parts = part_times(make, args.steps, args.batch_size, args.accelerator, ssr)
        total = parts["before the step"] + parts["after the step"] + parts["sensing forward hooks"]
        print(f"{name}: plain {plain:.3f}, with SSR {protected:.3f} ({protected / plain:.3f}x); inside SSR "
              f"{total:.3f} ({1 + total / (protected - total):.3f}x)")
        for label, ms in parts.items():
            print(f"  {label:<34} {ms:7.3f}")


if __name__ == "__main__":
    main()
