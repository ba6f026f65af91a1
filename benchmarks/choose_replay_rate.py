#!/usr/bin/env python
"""Choose SSR's anchor rate beside a replay buffer on validation splits, never on the test set.

Each training experience is split 80/20 (``validation_benchmark``, as the bench's search does);
Avalanche's ``ReplayPlugin`` alone and ``SSRPlugin`` + ``ReplayPlugin`` (the bench's ``ssr-replay``)
with each candidate ``anchor_rate`` train on the 80 % and are scored on the 20 %, over 3 seeds,
with the same buffer. The rate chosen this way is ``lightning_ssr.bench.methods.SSR_BESIDE_REPLAY``.

Usage::

    python benchmarks/choose_replay_rate.py                                  # digits, class-IL
    python benchmarks/choose_replay_rate.py --scenario domain
    python benchmarks/choose_replay_rate.py --dataset fmnist --rates 0.1 0.05 0.02
    python benchmarks/choose_replay_rate.py --rates 0.02 --output-targets both   # output_targets beside replay
    python benchmarks/choose_replay_rate.py --rates 0.02 --recycle-below 0 0.1  # recycling beside replay
    python benchmarks/choose_replay_rate.py --rates 0.02 --protect-every 1 2     # the pull every step or every 2nd
    python benchmarks/choose_replay_rate.py --rates 0.02 --scaling-rate 0 0.1    # homeostatic scaling beside replay
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

from lightning_ssr.bench.command import quiet_warnings
from lightning_ssr.bench.methods import METHODS
from lightning_ssr.bench.runner import RunSettings, run_method, validation_benchmark
from lightning_ssr.data import make_benchmark


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=["digits", "fmnist"])
    parser.add_argument("--scenario", default="class", choices=["class", "domain"])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.05, 0.02, 0.01, 0.005],
                        help="candidate anchor rates (0.1 is the library's default)")
    parser.add_argument("--mem-size", type=int, default=200, help="replay buffer size, the same for every row")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--output-targets", default="off", choices=["off", "on", "both"],
                        help="SSR's output_targets beside replay: off (the bench's ssr-replay), on (the library's "
                             "default) or both, a row each")
    parser.add_argument("--recycle-below", type=float, nargs="+", default=[0.0],
                        help="SSR's recycle_below beside replay, a row each: 0 (the bench's ssr-replay) or the "
                             "library's default 0.1")
    parser.add_argument("--protect-every", type=int, nargs="+", default=[None],
                        help="SSR's protect_every beside replay, a row each (default: the library's)")
    parser.add_argument("--scaling-rate", type=float, nargs="+", default=[None],
                        help="SSR's scaling_rate beside replay, a row each (default: the library's)")
    args = parser.parse_args(argv)
    quiet_warnings()
    bench = make_benchmark(args.dataset, "split", args.scenario, 5, seed=0)
    val = validation_benchmark(bench, 0.2, seed=0)
    s = (RunSettings(hidden=400, epochs=5, batch_size=32) if args.dataset == "digits"
         else RunSettings(hidden=400, epochs=1, batch_size=128))
    rows = {"replay": (METHODS["replay"], {"mem_size": args.mem_size})}
    targets = {"off": [False], "on": [True], "both": [False, True]}[args.output_targets]
    ssr_replay = METHODS["ssr-replay"]
    for rate, on, recycle, every, scaling in itertools.product(args.rates, targets, args.recycle_below,
                                                               args.protect_every, args.scaling_rate):
        name = (f"ssr-replay a={rate}" + (" targets" if on else "") + (f" recycle={recycle:g}" if recycle else "")
                + (f" every={every}" if every is not None else "") + (f" scaling={scaling:g}" if scaling is not None else ""))
        rows[name] = (ssr_replay, {**ssr_replay.candidates(1)[0], "mem_size": args.mem_size, "anchor_rate": rate,
                                   "output_targets": on, "recycle_below": recycle,
                                   **({"protect_every": every} if every is not None else {}),
                                   **({"scaling_rate": scaling} if scaling is not None else {})})
    print(f"{args.dataset} split, {args.scenario}-incremental, validation splits, buffer {args.mem_size}, "
          f"{args.seeds} seeds: average accuracy % (plasticity %)")
    for name, (method, hp) in rows.items():
        start = time.perf_counter()
        runs = [run_method(method, hp, val, s, seed) for seed in range(args.seeds)]
        acc = [100 * r.average_accuracy for r in runs]
        plast = [100 * r.plasticity for r in runs]
        spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(f"{name:<22} {statistics.fmean(acc):5.1f} ± {spread:4.1f}  ({statistics.fmean(plast):5.1f})  "
              f"{time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
