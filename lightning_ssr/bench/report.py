"""The benchmark's outputs: the printed table, JSON and CSV results, and PNG plots."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_ssr.continual import StreamResult

__all__ = ["format_bytes", "format_hyperparameters", "format_table", "plot_results", "summarize", "write_results"]

_COLUMNS = ("average_accuracy", "average_forgetting", "backward_transfer", "plasticity")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(runs: Mapping[str, Sequence[StreamResult]], baselines: Mapping[str, str]) -> list[dict[str, Any]]:
    """One row per method: mean and std over seeds of every reported figure.

    ``time_ratio`` is the method's training time over its runner's naive training time, seed by
    seed in the same run, then averaged: CPU time where both runs measured it (it does not carry
    the load of other processes, e.g. the bench's other workers), else wall time.

    Example:
        >>> a = StreamResult("naive", [[0.9, 0.1], [0.5, 0.9]], 2, train_time_s=[1.0, 1.0])
        >>> b = StreamResult("x", [[0.9, 0.1], [0.8, 0.9]], 2, train_time_s=[1.2, 1.0])
        >>> rows = summarize({"naive": [a], "x": [b]}, {"naive": "naive", "x": "naive"})
        >>> round(rows[1]["average_accuracy_mean"], 3), round(rows[1]["time_ratio_mean"], 2)
        (0.85, 1.1)
    """
    rows = []
    for name, results in runs.items():
        row: dict[str, Any] = {"method": name, "seeds": len(results)}
        for col in _COLUMNS:
            row[f"{col}_mean"], row[f"{col}_std"] = _mean_std([getattr(r, col) for r in results])
        base = runs.get(baselines.get(name, ""), [])
        ratios = [_train_seconds(r, b) / max(_train_seconds(b, r), 1e-12) for r, b in zip(results, base)]
        row["time_ratio_mean"], row["time_ratio_std"] = _mean_std(ratios)
        row["time_baseline"] = baselines.get(name, "")
        row["train_time_s_mean"] = statistics.fmean(sum(r.train_time_s) for r in results)
        row["extra_state_bytes"] = max(r.extra_state_bytes for r in results)
        rows.append(row)
    return rows


def _train_seconds(result: StreamResult, other: StreamResult) -> float:
    """``result``'s training time: CPU seconds where both runs have them for every experience (a
    run resumed from a checkpoint written before they were recorded has them for the later ones
    only), else wall seconds."""
    if all(r.train_cpu_s and len(r.train_cpu_s) == len(r.train_time_s) for r in (result, other)):
        return sum(result.train_cpu_s)
    return sum(result.train_time_s)


def format_bytes(n: int) -> str:
    """A byte count for a table.

    Example:
        >>> format_bytes(0), format_bytes(3 * 1024 ** 2)
        ('0 B', '3.0 MB')
    """
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_hyperparameters(hp: Mapping[str, Any]) -> str:
    """``k=v`` pairs, or ``-`` for none (the library's or the method's defaults).

    Example:
        >>> format_hyperparameters({"ewc_lambda": 1000.0, "mode": "online"}), format_hyperparameters({})
        ('ewc_lambda=1000 mode=online', '-')
    """
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items()) or "-"


def format_table(rows: Sequence[Mapping[str, Any]], title: str) -> str:
    """The proposal-style table: method, accuracy, forgetting, BWT, plasticity (accuracy on each
    task right after learning it), extra state, time ratio, and the hyperparameters each row ran
    with when the rows carry them (``row["hyperparameters"]``, after the search).

    Example:
        >>> row = {"method": "naive", "seeds": 2, "average_accuracy_mean": 0.5, "average_accuracy_std": 0.01,
        ...        "average_forgetting_mean": 0.4, "average_forgetting_std": 0.0, "backward_transfer_mean": -0.4,
        ...        "backward_transfer_std": 0.0, "plasticity_mean": 0.9, "plasticity_std": 0.02,
        ...        "extra_state_bytes": 0, "time_ratio_mean": 1.0,
        ...        "time_ratio_std": 0.0, "time_baseline": "naive"}
        >>> print(format_table([row], "t"))  # doctest: +NORMALIZE_WHITESPACE
        t
        method                 accuracy %   forgetting %      BWT %  plasticity %   extra state  time vs naive
        naive                  50.0 ± 1.0     40.0 ± 0.0 -40.0 ± 0.0    90.0 ± 2.0          0 B   1.00 ± 0.00
    """
    show_hp = any("hyperparameters" in r for r in rows)
    head = f"{'method':<20} {'accuracy %':>12} {'forgetting %':>14} {'BWT %':>10} {'plasticity %':>13} {'extra state':>13} {'time vs naive':>14}"
    head += "  hyperparameters (chosen)" if show_hp else ""
    lines = [title, head]
    for r in rows:
        def pct(col: str) -> str:
            return f"{100 * r[col + '_mean']:.1f} ± {100 * r[col + '_std']:.1f}"
        lines.append(
            f"{r['method']:<20} {pct('average_accuracy'):>12} {pct('average_forgetting'):>14} "
            f"{pct('backward_transfer'):>10} {pct('plasticity'):>13} {format_bytes(r['extra_state_bytes']):>13} "
            f"{r['time_ratio_mean']:>6.2f} ± {r['time_ratio_std']:.2f}"
            + (f"  {format_hyperparameters(r.get('hyperparameters') or {})}" if show_hp else "")
        )
    return "\n".join(lines)


def write_results(out_dir: Path, meta: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                  runs: Mapping[str, Sequence[StreamResult]], search: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``results.json`` (everything) and ``results.csv`` (the summary rows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "meta": dict(meta),
        "summary": list(rows),
        "search": dict(search),
        "runs": {name: [r.to_dict() for r in results] for name, results in runs.items()},
    }
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    csv_path = out_dir / "results.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {"json": json_path, "csv": csv_path}


def _plot_task_accuracy(out_dir: Path, runs: Mapping[str, Sequence[StreamResult]], title: str) -> Path:
    """One panel per task: its accuracy after each training experience, mean over seeds with a ±1 std band."""
    import textwrap

    import matplotlib.pyplot as plt
    import torch

    n = next(iter(runs.values()))[0].matrix.shape[1]
    cols = min(n, 5)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 1.8, 2.2 * rows + 0.8), sharex=True, sharey=True,
                             squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for k, (name, results) in enumerate(runs.items()):
        mats = 100 * torch.stack([r.matrix for r in results])
        mean, std = mats.mean(0), (mats.std(0) if len(results) > 1 else torch.zeros_like(mats[0]))
        for j in range(n):
            ax = axes[j // cols][j % cols]
            x = list(range(j + 1, mean.shape[0] + 1))
            m, sd = mean[j:, j], std[j:, j]
            ax.plot(x, m.tolist(), color=colors[k % len(colors)], label=name, marker="o", markersize=2.5,
                    linewidth=2.0 if name in ("ssr", "ssr-plugin") else 1.0)
            ax.fill_between(x, (m - sd).tolist(), (m + sd).tolist(), color=colors[k % len(colors)], alpha=0.15)
    for j in range(rows * cols):
        ax = axes[j // cols][j % cols]
        if j >= n:
            ax.axis("off")
            continue
        ax.set_title(f"task {j + 1}", fontsize=8)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        if j % cols == 0:
            ax.set_ylabel("accuracy %", fontsize=8)
        if j // cols == rows - 1:
            ax.set_xlabel("tasks trained", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")
    fig.suptitle("\n".join(textwrap.wrap(title + "; each task's accuracy over the stream, ±1 std over seeds", 110)),
                 fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / (2.6 * cols + 1.8), 1))
    path = out_dir / "task_accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_results(out_dir: Path, runs: Mapping[str, Sequence[StreamResult]], title: str) -> list[Path]:
    """An accuracy-matrix heatmap per method (mean over seeds), each task's accuracy over the stream
    with std bands, and the average accuracy after each task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    curves: dict[str, list[float]] = {}
    for name, results in runs.items():
        mat = torch.stack([r.matrix for r in results]).mean(0)
        n = mat.shape[0]
        curves[name] = [100 * float(mat[i, : i + 1].mean()) for i in range(n)]
        fig, ax = plt.subplots(figsize=(4.2, 3.6))
        im = ax.imshow(100 * mat.numpy(), vmin=0, vmax=100, cmap="viridis")
        for i in range(n):
            for j in range(mat.shape[1]):
                ax.text(j, i, f"{100 * float(mat[i, j]):.0f}", ha="center", va="center", fontsize=7,
                        color="white" if mat[i, j] < 0.6 else "black")
        ax.set_xlabel("test experience")
        ax.set_ylabel("after training experience")
        ax.set_title(f"{name}: accuracy %", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        path = out_dir / f"heatmap_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    import textwrap

    paths.append(_plot_task_accuracy(out_dir, runs, title))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.get_cmap("tab20").colors
    for k, (name, ys) in enumerate(curves.items()):
        ssr = name.startswith("ssr")
        ax.plot(range(1, len(ys) + 1), ys, marker="o" if ssr else "s", label=name, color=colors[k % len(colors)],
                linestyle="-" if ssr else "--", linewidth=2.2 if name in ("ssr", "ssr-plugin") else 1.2)
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("average accuracy on tasks so far (%)")
    ax.set_xticks(range(1, max(len(ys) for ys in curves.values()) + 1))
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = out_dir / "average_accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths
