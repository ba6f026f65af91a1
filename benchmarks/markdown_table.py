"""Print ``lightning-ssr bench`` results as Markdown tables, as the README quotes them.

Each results folder (``OUT/<dataset>-<protocol><tasks>-<scenario>``) becomes a table of its rows
(accuracy, forgetting, BWT, plasticity: mean ± std over seeds in %, extra state, time vs naive,
the hyperparameters each row ran with) under the command that produced it; ``--summary`` prints
one table of final average accuracy, a column per folder, instead.

Usage::

    python benchmarks/markdown_table.py bench_results/mnist-split5-*
    python benchmarks/markdown_table.py --summary bench_results/mnist-*
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lightning_ssr.bench.report import format_bytes, format_hyperparameters


def _pct(row: dict[str, Any], col: str) -> str:
    return f"{100 * row[col + '_mean']:.1f} ± {100 * row[col + '_std']:.1f}"


def _load(folder: Path) -> dict[str, Any]:
    path = folder / "results.json"
    if not path.is_file():
        raise SystemExit(f"markdown_table: {str(folder)!r} holds no results.json (a `lightning-ssr bench` output folder)")
    return json.loads(path.read_text())


def full_table(data: dict[str, Any]) -> str:
    """One results folder as a Markdown table under its command."""
    program, _, args = data["meta"]["command"].split(" --out ")[0].partition(" ")
    command = f"{Path(program).name} {args}"  # a console script's path as its name
    lines = [f"`{command}`", "",
             "| method | accuracy % | forgetting % | BWT % | plasticity % | extra state | time vs naive | hyperparameters |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["summary"]:
        lines.append(
            f"| {r['method']} | {_pct(r, 'average_accuracy')} | {_pct(r, 'average_forgetting')} | "
            f"{_pct(r, 'backward_transfer')} | {_pct(r, 'plasticity')} | {format_bytes(r['extra_state_bytes'])} | "
            f"{r['time_ratio_mean']:.2f} | {format_hyperparameters(r.get('hyperparameters') or {})} |"
        )
    return "\n".join(lines)


def summary_table(folders: list[Path]) -> str:
    """Final average accuracy (mean ± std) of every method, a column per folder."""
    datas = [_load(f) for f in folders]
    methods: list[str] = []
    for d in datas:
        methods += [r["method"] for r in d["summary"] if r["method"] not in methods]
    head = "| method | " + " | ".join(f.name for f in folders) + " |"
    lines = [head, "|---" * (len(folders) + 1) + "|"]
    for m in methods:
        cells = []
        for d in datas:
            row = next((r for r in d["summary"] if r["method"] == m), None)
            cells.append(_pct(row, "average_accuracy") if row else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="results folders of lightning-ssr bench")
    parser.add_argument("--summary", action="store_true", help="one accuracy table, a column per folder")
    args = parser.parse_args()
    if args.summary:
        print(summary_table(args.folders))
        return
    for folder in args.folders:
        print(full_table(_load(folder)) + "\n")


if __name__ == "__main__":
    main()
