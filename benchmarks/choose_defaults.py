"""Choose SSR's defaults on validation splits, never on the test set.

Every training experience of each stream is split 80/20 (``validation_benchmark``, as the bench's
hyperparameter search does); each candidate configuration trains on the 80 % and is scored on the
20 %. The table gives, per stream, the validation average accuracy and plasticity (accuracy on
each task right after learning it) of plain training and of every candidate, and the last columns
the worst and mean gap to plain training over the streams: a default must never fall far below
plain training anywhere.

Usage::

    python benchmarks/choose_defaults.py                       # digits, the three scenarios
    python benchmarks/choose_defaults.py --streams all --seeds 2
    python benchmarks/choose_defaults.py --candidates '{"fixed": {"min_plasticity": 0.0}}'
    python benchmarks/choose_defaults.py --streams fmnist-permuted10-domain --baselines mas,lwf --seeds 3

``--baselines`` scores bench methods (e.g. MAS, LwF) on the same validation splits at their first
setting, as ``lightning-ssr bench --search-budget 1`` runs them, so a candidate can be compared with
the method it must beat without touching a test set. The streams need Fashion-MNIST
(``apt-get install dataset-fashion-mnist``) and, for ``mnist-permuted10-domain`` (in ``all``),
MNIST in the cache (``make mnist``).

Prints one table; ``--json FILE`` also writes every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_ssr.bench.runner import RunSettings
    from lightning_ssr.data import ContinualBenchmark

_ANCHOR = {"protection": "anchor", "anchor_rate": 0.1}
#: name -> SSR keyword arguments on top of the library defaults: the last round of the choice of
#: the defaults (``a0.1`` won; see the README), each part switched against it.
CANDIDATES: dict[str, dict[str, Any]] = {
    "update": {"protection": "update"},
    "a0.05": {**_ANCHOR, "anchor_rate": 0.05},
    "a0.1": _ANCHOR,
    "a0.1-p0.5": {**_ANCHOR, "min_plasticity": 0.5},
    "a0.1-c30": {**_ANCHOR, "consolidation": 30.0},
    "a0.1-r0.1": {**_ANCHOR, "recycle_below": 0.1},
    "a0.1-noscale": {**_ANCHOR, "scaling_rate": 0.0},
}


@dataclass(frozen=True)
class Stream:
    """One validation stream: data, protocol, scenario and its training budget."""

    name: str
    dataset: str
    protocol: str
    scenario: str
    tasks: int
    epochs: int
    train_subset: int | None = None
    hidden: int | None = None
    lr: float = 1e-3
    iterations: int | None = None
    pad: int = 0
    test_subset: int | None = None

    def validation(self) -> tuple[ContinualBenchmark, RunSettings]:
        """The stream's validation benchmark (every training experience split 80/20, seed 0) and the
        budget every method gets on it."""
        from lightning_ssr.bench.runner import RunSettings, validation_benchmark
        from lightning_ssr.data import make_benchmark

        bench = make_benchmark(self.dataset, self.protocol, self.scenario, self.tasks, seed=0,
                               train_subset=self.train_subset, test_subset=self.test_subset, pad=self.pad)
        hidden = self.hidden or (1000 if self.protocol == "permuted" else 400)
        return validation_benchmark(bench, 0.2, seed=0), RunSettings(
            hidden=hidden, epochs=self.epochs, batch_size=32 if self.dataset == "digits" else 128, lr=self.lr,
            iterations=self.iterations)


STREAMS: dict[str, Stream] = {s.name: s for s in (
    Stream("digits-task", "digits", "split", "task", 5, 5),
    Stream("digits-domain", "digits", "split", "domain", 5, 5),
    Stream("digits-class", "digits", "split", "class", 5, 5),
    # Permuted digits (10 permutations of the 64 pixels, the bench's `--protocol permuted` on digits)
    Stream("digits-permuted-task", "digits", "permuted", "task", 10, 5),
    Stream("digits-permuted-domain", "digits", "permuted", "domain", 10, 5),
    Stream("digits-permuted-class", "digits", "permuted", "class", 10, 5),
    Stream("fmnist-split-task", "fmnist", "split", "task", 5, 1),
    Stream("fmnist-split-domain", "fmnist", "split", "domain", 5, 1),
    Stream("fmnist-split-class", "fmnist", "split", "class", 5, 1),
    Stream("fmnist-permuted10-domain", "fmnist", "permuted", "domain", 10, 1, 10000),
    Stream("fmnist-permuted20-domain", "fmnist", "permuted", "domain", 20, 1, 5000),
    # the bench's Permuted Fashion-MNIST protocol of the README's tables (5,000 images a task)
    Stream("fmnist-permuted10-domain-5k", "fmnist", "permuted", "domain", 10, 1, 5000),
    # van de Ven & Tolias's Permuted MNIST at the bench's reduced budget (``--preset vdv2019-permuted``)
    Stream("mnist-permuted10-domain", "mnist", "permuted", "domain", 10, 1, 10000, lr=1e-4, iterations=100,
           pad=2, test_subset=1000),
    Stream("mnist-permuted10-task", "mnist", "permuted", "task", 10, 1, 10000, lr=1e-4, iterations=100,
           pad=2, test_subset=1000),
    Stream("mnist-permuted10-class", "mnist", "permuted", "class", 10, 1, 10000, lr=1e-4, iterations=100,
           pad=2, test_subset=1000),
    Stream("mnist-permuted20-class", "mnist", "permuted", "class", 20, 1, 10000, lr=1e-4, iterations=100,
           pad=2, test_subset=1000),
    # van de Ven & Tolias's Split MNIST at the bench's reduced budget (``--preset vdv2019-split --iterations 250``)
    Stream("mnist-split-task", "mnist", "split", "task", 5, 1, iterations=250),
    Stream("mnist-split-domain", "mnist", "split", "domain", 5, 1, iterations=250),
)}
DIGITS = ("digits-task", "digits-domain", "digits-class")


def run(streams: list[Stream], candidates: dict[str, dict[str, Any]], seeds: int,
        baselines: tuple[str, ...] = ()) -> dict[str, Any]:
    from lightning_ssr.bench.command import quiet_warnings
    from lightning_ssr.bench.methods import METHODS, Method
    from lightning_ssr.bench.runner import run_method

    quiet_warnings()
    out: dict[str, Any] = {}
    for st in streams:
        val, s = st.validation()
        rows: dict[str, Any] = {}
        methods = [("naive", METHODS["naive-lightning"], {})]
        methods += [(b, METHODS[b], METHODS[b].candidates(1)[0]) for b in baselines]  # the bench's first setting
        methods += [(name, Method(f"ssr:{name}", "lightning", name), hp) for name, hp in candidates.items()]
        for name, method, hp in methods:
            acc, plast, secs = [], [], []
            for seed in range(seeds):
                t0 = time.perf_counter()
                r = run_method(method, hp, val, s, seed)
                secs.append(time.perf_counter() - t0)
                acc.append(r.average_accuracy)
                plast.append(r.plasticity)
            rows[name] = {"accuracy": statistics.fmean(acc), "plasticity": statistics.fmean(plast),
                          "seconds": statistics.fmean(secs), "per_seed": acc}
            print(f"  {st.name:<26} {name:<18} acc {100 * rows[name]['accuracy']:5.1f}  "
                  f"plasticity {100 * rows[name]['plasticity']:5.1f}  {rows[name]['seconds']:.0f} s", flush=True)
        out[st.name] = rows
    return out


def table(results: dict[str, Any], candidates: list[str], baselines: tuple[str, ...] = ()) -> str:
    streams = list(results)
    head = f"{'candidate':<18}" + "".join(f"{s[:22]:>24}" for s in streams) + f"{'worst gap':>11}{'mean gap':>10}"
    lines = ["validation average accuracy % (plasticity %); gap = candidate - naive, points", head]
    for name in ["naive", *baselines, *candidates]:
        cells, gaps = [], []
        for s in streams:
            r = results[s][name]
            cells.append(f"{100 * r['accuracy']:>14.1f} ({100 * r['plasticity']:5.1f})")
            gaps.append(100 * (r["accuracy"] - results[s]["naive"]["accuracy"]))
        lines.append(f"{name:<18}" + "".join(f"{c:>24}" for c in cells) + f"{min(gaps):>11.1f}{statistics.fmean(gaps):>10.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default=",".join(DIGITS),
                        help=f"comma-separated from {list(STREAMS)}, or 'all' (default: the digits streams)")
    parser.add_argument("--candidates", default=None,
                        help="JSON object name -> SSR keyword arguments (default: the built-in candidates)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per candidate (default: 2)")
    parser.add_argument("--baselines", default="",
                        help="comma-separated bench methods (e.g. mas,lwf) to score beside, at their first setting")
    parser.add_argument("--json", default=None, help="also write every figure to this file")
    args = parser.parse_args(argv)
    names = list(STREAMS) if args.streams == "all" else [n.strip() for n in args.streams.split(",")]
    unknown = [n for n in names if n not in STREAMS]
    if unknown:
        parser.error(f"--streams: unknown {unknown}; choose from {list(STREAMS)} or 'all'")
    candidates = json.loads(args.candidates) if args.candidates else CANDIDATES
    baselines = tuple(b.strip() for b in args.baselines.split(",") if b.strip())
    from lightning_ssr.bench.methods import METHODS

    bad = [b for b in baselines if b not in METHODS]
    if bad:
        parser.error(f"--baselines: unknown {bad}; choose from {sorted(METHODS)}")
    for b in baselines:
        if b == "naive":
            parser.error("--baselines: plain training is always the first row ('naive', through the Lightning runner)")
        if b in candidates:
            parser.error(f"--baselines: {b!r} is also the name of a candidate; rename the candidate")
        cannot = [n for n in names if STREAMS[n].scenario not in METHODS[b].scenarios]
        if cannot:
            parser.error(f"--baselines: {b!r} runs only in {list(METHODS[b].scenarios)}, not in the streams {cannot}")
    results = run([STREAMS[n] for n in names], candidates, args.seeds, baselines)
    print(table(results, list(candidates), baselines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
