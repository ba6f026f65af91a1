"""The scripts of ``examples/`` run as documented and print SSR beside the same run without it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import run_script


def test_lightning_cli_example_builds_the_callback_from_the_yaml_config() -> None:
    pytest.importorskip("jsonargparse")
    out = run_script("examples/lightning_cli.py", "--config", "examples/ssr_config.yaml",
                     "--trainer.max_epochs", "1", "--trainer.callbacks.init_args.config.anchor_rate", "0.05")
    assert "consolidation=10.0" in out and "anchor_rate=0.05" in out  # the YAML, then the command line
    found = re.search(r"average accuracy ([\d.]+) % with SSR, ([\d.]+) % without", out)
    assert found, out
    assert all(0 < float(v) <= 100 for v in found.groups())


def test_split_digits_example_prints_both_methods() -> None:
    out = run_script("examples/split_digits_lightning.py", "--epochs", "1", "--hidden", "32")
    assert "SynapticScaling: accuracy" in out
    assert len(re.findall(r"average accuracy [\d.]+, forgetting", out)) == 2, out  # with and without SSR


def test_multi_gpu_example_runs_two_ddp_processes_and_prints_the_baseline(tmp_path: Path) -> None:
    out = run_script("examples/multi_gpu.py", "--epochs", "1", "--save-dir", str(tmp_path))
    found = re.search(r"average accuracy: with SSR ([\d.]+) %, without SSR ([\d.]+) %", out)
    assert found, out[-2000:]
    assert all(0 < float(v) <= 100 for v in found.groups())


def test_avalanche_strategies_example_compares_ssr_with_avalanches_plugins() -> None:
    pytest.importorskip("avalanche")
    out = run_script("examples/avalanche_strategies.py", "--scenarios", "domain", "--seeds", "1", "--epochs", "1")
    rows = {line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "%" not in line}
    assert {"Naive", "EWC", "SI", "LwF", "Replay", "SSR"} <= rows, out
