#!/usr/bin/env python
"""SSRNorm against BatchNorm, GroupNorm, LayerNorm and no normalization, at batch 64 and batch 2.

Three measurements, printed as markdown tables:

1. Test accuracy of a small CNN and of torchvision's ResNet-18 (adapted to 1 channel, 28x28) on
   Fashion-MNIST (read from the IDX ``.gz`` files, never downloaded), or on scikit-learn's digits
   (``--dataset digits``, upsampled to 28x28), trained with each normalization layer at each batch
   size from the same seed, initialization and data order.
2. The wall time of each of those training runs, as a ratio to BatchNorm's (noisy on a shared
   machine: runs are sequential).
3. Forward+backward time of each layer in training mode as a ratio to ``BatchNorm2d``, measured
   side by side in interleaved rounds, so load from other processes hits every layer alike.

The defaults are sized for 2 CPU cores (about 8 minutes, 1 torch thread); batches below 16 train
on ``--small-batch-fraction`` of the subset, as their steps are slow on CPU. ``--train-size``,
``--resnet-train-size``, ``--epochs`` and ``--seeds`` scale it. Adam, ``lr`` scaled by
``sqrt(batch / 64)``. ``--norms ... ssr-nogain ssr-noproj`` adds SSRNorm's ablations, and
``ssr-eager`` SSRNorm with ``kernel="eager"`` (its Python path; ``ssr`` runs the native kernel
where it is available, which the script prints).

Example::

    python benchmarks/norm_layers.py                    # the default run
    python benchmarks/norm_layers.py --models cnn --norms batch ssr ssr-nogain ssr-noproj --seeds 3
    python benchmarks/norm_layers.py --dataset digits --quick
    python benchmarks/norm_layers.py --ssr momentum=0.03 gain_rate=0.0
    python benchmarks/norm_layers.py --timing-only --norms batch ssr ssr-eager --batch-sizes 1 2 8 64
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lightning_ssr.norm import SSRNorm1d, SSRNorm2d  # noqa: E402
from lightning_ssr.norm.native import KernelUnavailableError, load_kernel  # noqa: E402

NORMS = ("batch", "group", "layer", "none", "ssr")
#: Ablations of SSRNorm, run with ``--norms ... ssr-nogain ssr-noproj``.
ABLATIONS = {"ssr-nogain": {"gain_rate": 0.0}, "ssr-noproj": {"project_gradient": False},
             "ssr-eager": {"kernel": "eager"}}
NORM_NAMES = {"batch": "BatchNorm", "group": "GroupNorm", "layer": "LayerNorm", "none": "none", "ssr": "SSRNorm",
              "ssr-nogain": "SSRNorm, no gain", "ssr-noproj": "SSRNorm, no projection",
              "ssr-eager": "SSRNorm, Python path"}
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


# ------------------------------------------------------------------------- data
def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(root: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fashion-MNIST from the four IDX ``.gz`` files in ``root``, as float images in [0, 1]."""
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    missing = [n for n in names if not os.path.exists(os.path.join(root, n))]
    if missing:
        raise SystemExit(f"Fashion-MNIST files {missing} not found in {root}; use --dataset digits "
                         "or --data-dir (this script never downloads)")
    xtr, ytr, xte, yte = (_read_idx(os.path.join(root, n)) for n in names)
    to_x = lambda a: torch.from_numpy(a.copy()).float().div_(255.0).unsqueeze(1)  # noqa: E731
    to_y = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    return to_x(xtr), to_y(ytr), to_x(xte), to_y(yte)


def load_digits_28() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8x8 digits, upsampled to 28x28, split 1297/500."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().div_(16.0).unsqueeze(1)
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1297], y[:1297], x[1297:], y[1297:]


def subset(x: Tensor, y: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor]:
    if n <= 0 or n >= len(y):
        return x, y
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


# ----------------------------------------------------------------------- models
Factory = Callable[[int], nn.Module]


def norm_layers(kind: str, ssr_kwargs: dict[str, Any]) -> tuple[Factory, Factory]:
    """Factories of the 2D (conv) and 1D (dense) normalization layer of each kind."""
    if kind == "batch":
        return nn.BatchNorm2d, nn.BatchNorm1d
    if kind == "group":
        return (lambda c: nn.GroupNorm(min(8, c), c)), (lambda c: nn.GroupNorm(min(8, c), c))
    if kind == "layer":  # LayerNorm over (C, H, W): one group
        return (lambda c: nn.GroupNorm(1, c)), nn.LayerNorm
    if kind == "none":
        return (lambda c: nn.Identity()), (lambda c: nn.Identity())
    if kind == "ssr" or kind in ABLATIONS:
        kw = {**ssr_kwargs, **ABLATIONS.get(kind, {})}
        return (lambda c: SSRNorm2d(c, **kw)), (lambda c: SSRNorm1d(c, **kw))
    raise ValueError(f"unknown norm {kind!r}; choose from {NORMS}")


def small_cnn(kind: str, ssr_kwargs: dict[str, Any]) -> nn.Module:
    """conv32-pool-conv64-pool-fc128-fc10, each hidden layer followed by the normalization."""
    n2, n1 = norm_layers(kind, ssr_kwargs)
    bias = kind == "none"
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=bias), n2(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=bias), n2(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128, bias=bias), n1(128), nn.ReLU(), nn.Linear(128, 10),
    )


def resnet18(kind: str, ssr_kwargs: dict[str, Any]) -> nn.Module:
    """torchvision's ResNet-18 with a 1-channel 3x3 stride-2 stem (28x28 -> 7x7 after the pool)."""
    import torchvision

    n2, _ = norm_layers(kind, ssr_kwargs)
    model = torchvision.models.resnet18(num_classes=10, norm_layer=n2)
    model.conv1 = nn.Conv2d(1, 64, 3, stride=2, padding=1, bias=False)
    return model


MODELS = {"cnn": small_cnn, "resnet18": resnet18}


# -------------------------------------------------------------------- training
def train_eval(model: nn.Module, data: tuple[Tensor, Tensor, Tensor, Tensor], batch_size: int, epochs: int,
               lr: float, seed: int) -> tuple[float, float, bool]:
    """Train with Adam, return (test accuracy in %, training seconds, diverged)."""
    xtr, ytr, xte, yte = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    diverged = False
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(ytr), generator=gen)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            if not torch.isfinite(loss):
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if diverged:
            break
    seconds = time.perf_counter() - start
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(yte), 500):
            correct += int((model(xte[i:i + 500]).argmax(1) == yte[i:i + 500]).sum())
    return 100.0 * correct / len(yte), seconds, diverged


# ---------------------------------------------------------------------- timing
def time_layers(kinds: list[str], batch: int, channels: int, size: int, rounds: int, reps: int,
                ssr_kwargs: dict[str, Any]) -> dict[str, float]:
    """Median forward+backward seconds per call of each layer, interleaved round by round."""
    torch.manual_seed(0)
    layers = {k: norm_layers(k, ssr_kwargs)[0](channels).train() for k in kinds}
    x = torch.randn(batch, channels, size, size, requires_grad=True)
    grad = torch.randn(batch, channels, size, size)
    times: dict[str, list[float]] = {k: [] for k in kinds}

    def run(layer: nn.Module) -> None:
        y = layer(x)
        if y.requires_grad:
            y.backward(grad)
        x.grad = None

    for k in kinds:  # warm-up
        for _ in range(3):
            run(layers[k])
    order = list(kinds)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            t = time.perf_counter()
            for _ in range(reps):
                run(layers[k])
            times[k].append((time.perf_counter() - t) / reps)
    return {k: statistics.median(v) for k, v in times.items()}


# ------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=("fashion-mnist", "digits"), default="fashion-mnist")
    p.add_argument("--data-dir", default=FMNIST_DIR, help="folder of the Fashion-MNIST IDX .gz files")
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    p.add_argument("--norms", nargs="+", choices=(*NORMS, *ABLATIONS), default=list(NORMS))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 2])
    p.add_argument("--train-size", type=int, default=10000, help="CNN training subset (0: all)")
    p.add_argument("--resnet-train-size", type=int, default=4000, help="ResNet-18 training subset")
    p.add_argument("--small-batch-fraction", type=float, default=0.25,
                   help="fraction of the training subset used at batches below 16 (their steps are slow on CPU)")
    p.add_argument("--test-size", type=int, default=2000, help="test subset (0: all)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3,
                   help="Adam learning rate at batch 64, scaled by sqrt(batch/64)")
    p.add_argument("--seed", type=int, default=0, help="first seed (model init, data subset and order)")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds; tables show mean ± std")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a shared 2-core machine)")
    p.add_argument("--timing-rounds", type=int, default=15)
    p.add_argument("--timing-shape", nargs=3, type=int, default=[64, 14, 14], metavar=("C", "H", "W"))
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--timing-only", action="store_true",
                   help="only the per-layer timing (no data, no training), e.g. --batch-sizes 1 2 8 64")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny subsets, 1 epoch")
    p.add_argument("--ssr", nargs="*", default=[], metavar="KEY=VALUE",
                   help="SSRNorm keyword arguments, e.g. momentum=0.02 gain_rate=0.005")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.resnet_train_size, args.test_size, args.epochs = 1000, 500, 500, 1
        args.timing_rounds = 5
    return args


def _parse_ssr(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        if value in ("True", "False"):
            out[key] = value == "True"
        elif value == "None":
            out[key] = None
        else:
            try:
                out[key] = float(value) if any(c in value for c in ".e") else int(value)
            except ValueError:
                out[key] = value
    return out


def kernel_status() -> str:
    """Which path ``ssr`` runs in: the native kernel's build, or why it is not available."""
    try:
        return f"loaded from {load_kernel().__file__}"
    except KernelUnavailableError as err:
        return f"not available, SSRNorm runs its Python path ({err})"


def layer_timing(args: argparse.Namespace, ssr_kwargs: dict[str, Any], results: dict[str, Any]) -> None:
    """Forward+backward time of each layer at each batch size, as ratios to BatchNorm2d, into ``results``."""
    kinds = ["batch"] + [k for k in args.norms if k != "batch"]
    c, h, w = args.timing_shape
    print(f"# SSRNorm's native kernel: {kernel_status()}", flush=True)
    ratios: dict[int, dict[str, float]] = {}
    for batch in args.batch_sizes:
        reps = max(1, int(2e5 // (batch * c * h * w)) + 1)
        med = time_layers(kinds, batch, c, h, args.timing_rounds, reps, ssr_kwargs)
        ratios[batch] = {k: med[k] / med["batch"] for k in kinds}
        results.setdefault("timing_us", {})[batch] = {k: 1e6 * v for k, v in med.items()}
    tl = ["| layer | " + " | ".join(f"batch {b} ({b}x{c}x{h}x{w})" for b in args.batch_sizes) + " |",
          "|" + "---|" * (1 + len(args.batch_sizes))]
    for k in kinds:
        tl.append(f"| {NORM_NAMES[k]} | " + " | ".join(
            f"{ratios[b][k]:.2f} ({results['timing_us'][b][k]:.0f} us)" for b in args.batch_sizes) + " |")
    print("\nForward+backward time in training mode, ratio to BatchNorm2d (median us per call):\n"
          + "\n".join(tl))
    results["timing_table"] = "\n".join(tl)
    results["timing_ratio"] = ratios


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ssr_kwargs = _parse_ssr(args.ssr)
    if args.timing_only:
        results: dict[str, Any] = {"args": vars(args), "ssr_kwargs": ssr_kwargs}
        layer_timing(args, ssr_kwargs, results)
        return _write_json(args, results)
    data = load_fashion_mnist(args.data_dir) if args.dataset == "fashion-mnist" else load_digits_28()
    xtr, ytr, xte, yte = data
    xte, yte = subset(xte, yte, args.test_size, args.seed + 1)
    mean, std = xtr.mean(), xtr.std()
    results = {"args": vars(args), "ssr_kwargs": ssr_kwargs, "runs": []}
    print(f"# {args.dataset}: {len(ytr)} train / {len(yte)} test images available; "
          f"SSRNorm kwargs {ssr_kwargs or 'default'}; {args.threads} thread(s)", flush=True)
    seeds = [args.seed + i for i in range(args.seeds)]
    for model_name in args.models:
        base = args.train_size if model_name == "cnn" else args.resnet_train_size
        for batch in args.batch_sizes:
            n = base if batch >= 16 else int(base * args.small_batch_fraction)
            lr = args.lr * math.sqrt(batch / 64)
            for seed in seeds:
                x, y = subset(xtr, ytr, n, seed)
                x, xt = (x - mean) / std, (xte - mean) / std
                for kind in args.norms:
                    torch.manual_seed(seed)
                    model = MODELS[model_name](kind, ssr_kwargs)
                    acc, secs, diverged = train_eval(model, (x, y, xt, yte), batch, args.epochs, lr, seed)
                    run = {"model": model_name, "batch": batch, "norm": kind, "seed": seed, "acc": acc,
                           "seconds": secs, "train_size": len(y), "epochs": args.epochs, "lr": lr,
                           "diverged": diverged}
                    results["runs"].append(run)
                    print(f"  {model_name:8s} batch {batch:3d} seed {seed} {NORM_NAMES[kind]:22s} "
                          f"acc {acc:5.1f}%  {secs:6.1f}s{'  DIVERGED' if diverged else ''}", flush=True)

    def cell(model_name: str, batch: int, kind: str, key: str, ref: float | None = None) -> str:
        runs = [r for r in results["runs"] if (r["model"], r["batch"], r["norm"]) == (model_name, batch, kind)]
        values = [r[key] / (ref or 1.0) for r in runs]
        text = f"{statistics.mean(values):.{1 if ref is None else 2}f}"
        if len(values) > 1:
            text += f" ± {statistics.stdev(values):.{1 if ref is None else 2}f}"
        return text + (" (diverged)" if any(r["diverged"] for r in runs) else "")

    def row_head(model_name: str, batch: int) -> str:
        n = next(r["train_size"] for r in results["runs"] if (r["model"], r["batch"]) == (model_name, batch))
        return f"| {model_name} | {batch} | {n} x {args.epochs} |"

    header = "| model | batch | train images x epochs | " + " | ".join(NORM_NAMES[k] for k in args.norms) + " |"
    lines = [header, "|" + "---|" * (3 + len(args.norms))]
    for model_name in args.models:
        for batch in args.batch_sizes:
            lines.append(row_head(model_name, batch) + " " + " | ".join(
                cell(model_name, batch, k, "acc") for k in args.norms) + " |")
    what = f"mean ± std over seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}"
    print(f"\nTest accuracy (%, {what}, {len(yte)} test images):\n" + "\n".join(lines))
    results["accuracy_table"] = "\n".join(lines)
    if "batch" in args.norms:
        tt = [header, lines[1]]
        for model_name in args.models:
            for batch in args.batch_sizes:
                ref = statistics.mean(r["seconds"] for r in results["runs"]
                                      if (r["model"], r["batch"], r["norm"]) == (model_name, batch, "batch"))
                tt.append(row_head(model_name, batch) + " " + " | ".join(
                    cell(model_name, batch, k, "seconds", ref) for k in args.norms) + " |")
        print("\nTraining wall time, ratio to BatchNorm's mean (whole model; noisy on a shared machine):\n"
              + "\n".join(tt))
        results["train_time_table"] = "\n".join(tt)

    if not args.no_timing:
        layer_timing(args, ssr_kwargs, results)
    return _write_json(args, results)


def _write_json(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
