"""The timing scripts of ``benchmarks/`` run and print their ratios (tiny sizes: a smoke run, not a timing)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import ROOT, needs_mnist, run_script


def test_callback_overhead_prints_pair_ratios_the_floor_and_the_time_inside_ssr() -> None:
    out = run_script("benchmarks/callback_overhead.py", "--steps", "4", "--repeats", "2", "--models", "mlp")
    assert "malloc: glibc thresholds raised" in out, out
    rows = [line for line in out.splitlines() if line.startswith("MLP 2x400")]
    assert [r.split()[2] for r in rows] == ["task", "task"]  # task 1 and task 2
    for row in rows:
        ratios = [float(x) for x in re.findall(r"\d+\.\d{3}", row)]
        # wall, cpu (with ranges), floor, in-SSR; 4 steps on a loaded machine can read 12x, so only a sanity bound
        assert len(ratios) == 8 and all(0 < r < 50 for r in ratios), row
        assert re.search(r"(NOT )?met \(floor and in-SSR <= 1\.0[25]\)", row), row


def test_callback_overhead_parts_prints_where_the_time_goes() -> None:
    out = run_script("benchmarks/callback_overhead.py", "--parts", "--steps", "6", "--models", "mlp", "--threads", "1")
    head = next(line for line in out.splitlines() if line.startswith("MLP 2x400"))
    plain, protected, inside = (float(x) for x in re.search(
        r"plain (\d+\.\d+), with SSR (\d+\.\d+) .*inside SSR (\d+\.\d+)", head).groups())
    assert 0 < inside < protected and plain > 0, head
    parts = dict(re.findall(r"^ {2,}(\S.*?\S) +(\d+\.\d{3})$", out, flags=re.M))
    assert list(parts) == ["before the step", "after the step", "anchoring pull", "input-subspace projection",
                           "activity update and scaling", "sensing forward hooks", "input sketch"], out
    ms = {k: float(v) for k, v in parts.items()}
    # protection is on (task 2) and the default protect_every=2 pulls and projects on 3 of the 6 steps
    assert ms["anchoring pull"] > 0 and ms["input-subspace projection"] > 0 and ms["input sketch"] > 0, out
    assert ms["anchoring pull"] + ms["input-subspace projection"] <= ms["after the step"], out
    assert ms["input sketch"] <= ms["sensing forward hooks"], out


def test_cli_startup_times_help_and_argument_errors() -> None:
    out = run_script("benchmarks/cli_startup.py", "--repeats", "1")
    assert "bench --help" in out and "bench --methods nope" in out and "(scale) import torch" in out


def test_norm_layer_timing_only() -> None:
    out = run_script("benchmarks/norm_layers.py", "--timing-only", "--norms", "batch", "ssr", "--batch-sizes", "1",
                     "2", "--timing-rounds", "2")
    assert re.search(r"\| SSRNorm \| \d+\.\d\d \(\d+ us\) \| \d+\.\d\d \(\d+ us\) \|", out), out


def test_choose_replay_rate_scores_replay_and_each_rate_on_validation() -> None:
    out = run_script("benchmarks/choose_replay_rate.py", "--seeds", "1", "--rates", "0.02", "--mem-size", "50",
                     "--recycle-below", "0", "0.1", "--protect-every", "1", "2", "--scaling-rate", "0.1")
    assert "validation splits" in out
    for row in ("replay", "ssr-replay a=0.02 every=1 scaling=0.1", "ssr-replay a=0.02 every=2 scaling=0.1",
                "ssr-replay a=0.02 recycle=0.1 every=2 scaling=0.1"):
        assert re.search(rf"^{re.escape(row)}\s+[\d.]+ ±", out, re.M), out


def test_markdown_table_prints_a_bench_output_as_the_readme_quotes_it(tmp_path) -> None:
    from lightning_ssr.cli import main

    main(["bench", "--scenario", "domain,class", "--methods", "ewc", "--seeds", "2", "--epochs", "1", "--search-budget",
          "1", "--train-subset", "40", "--test-subset", "20", "--hidden", "16", "--no-plots", "--no-progress",
          "--out", str(tmp_path)])
    folders = [str(tmp_path / f"digits-split5-{s}") for s in ("domain", "class")]
    out = run_script("benchmarks/markdown_table.py", *folders)
    assert out.count("| method | accuracy % |") == 2 and "--scenario domain,class" in out
    assert re.search(r"^\| ewc \| \d+\.\d ± \d+\.\d \|.*\| mode=separate ewc_lambda=1000 \|$", out, re.M), out
    summary = run_script("benchmarks/markdown_table.py", "--summary", *folders)
    assert summary.splitlines()[0] == "| method | digits-split5-domain | digits-split5-class |"
    assert re.search(r"^\| naive \| \d+\.\d ± \d+\.\d \| \d+\.\d ± \d+\.\d \|$", summary, re.M), summary


@needs_mnist
def test_anchor_rate_vs_lr_scores_each_rate_on_validation() -> None:
    out = run_script("benchmarks/anchor_rate_vs_lr.py", "--rates", "0.1", "0.01", "--seeds", "1", "--tasks", "2",
                     "--iterations", "3", "--train-subset", "300", "--test-subset", "50")
    assert "validation split" in out
    for label in ("naive-lightning", "ssr anchor_rate=0.1 ", "ssr anchor_rate=0.01"):
        assert re.search(rf"^{re.escape(label)}\s*\d+\.\d \(\d+\.\d\)$", out, re.M), out


def test_choose_defaults_scores_baselines_beside_the_candidates() -> None:
    out = run_script("benchmarks/choose_defaults.py", "--streams", "digits-task", "--seeds", "1", "--baselines", "mas",
                     "--candidates", '{"weak": {"consolidation": 1.0}}')
    rows = {line.split()[0]: line for line in out.splitlines()[-3:]}
    assert list(rows) == ["naive", "mas", "weak"], out  # plain training, the baseline, then each candidate
    for row in rows.values():
        acc, plasticity = map(float, re.findall(r"(\d+\.\d) \(\s*(\d+\.\d)\)", row)[0])
        assert 50.0 < acc <= 100.0 and 50.0 < plasticity <= 100.0, row


@pytest.mark.parametrize("argv, message", [
    (["--baselines", "nope"], "--baselines: unknown ['nope']"),
    (["--streams", "digits-domain", "--baselines", "pnn"], "'pnn' runs only in ['task'], not in the streams ['digits-domain']"),
    (["--baselines", "mas", "--candidates", '{"mas": {}}'], "'mas' is also the name of a candidate"),
])
def test_choose_defaults_refuses_baselines_it_cannot_run(argv: list[str], message: str) -> None:
    out = subprocess.run([sys.executable, "benchmarks/choose_defaults.py", *argv], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_hidden_activity_prints_each_hidden_layer_after_each_task() -> None:
    out = run_script("benchmarks/hidden_activity.py", "--stream", "digits-class", "--methods", "ssr",
                     "--config", '{"scaling_rate": 0.0}')
    rows = re.findall(r"^task +(\d+): accuracy (\d\.\d+), old answers (\d\.\d+) \| hidden 1: active (\d\.\d+) "
                      r"mean (\d\.\d+) nearest-mean (\d\.\d+) \| hidden 2: ", out, re.M)
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5], out  # one line per task of the five
    assert all(0.5 < float(r[1]) <= 1.0 and 0.0 < float(r[3]) <= 1.0 for r in rows), rows
    assert re.search(r"^average accuracy \d+\.\d %, plasticity \d+\.\d %$", out, re.M), out
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, "benchmarks/hidden_activity.py", "--methods", "ewc"], cwd=ROOT, check=True,
                       capture_output=True)


def test_stream_overhead_times_plain_an_empty_callback_and_each_ssr_setting() -> None:
    out = run_script("benchmarks/stream_overhead.py", "--repeats", "1", "--epochs", "1",
                     "--variants", '{"every 4th": {"protect_every": 4}}')
    rows = dict(re.findall(r"^(.+?)\s+(\d+\.\d{3})\s+\d+\.\d{3} \[", out, flags=re.M))
    assert list(rows) == ["plain training (naive-lightning)", "plain training + an empty callback", "every 4th"], out
    assert all(float(v) > 0 for v in rows.values()), out
    assert re.search(r"^plain training \(naive-lightning\)\s+\d+\.\d{3}\s+1\.000 \[1\.000-1\.000\]$", out, re.M), out


@pytest.mark.parametrize("variants, message", [
    ("[1]", "`--variants` must be a JSON object"),
    ('{"x": {"protect_every": 0}}', "protect_every"),
    ('{"x": {"no_such_option": 1}}', "no_such_option"),
    ('{"plain training (naive-lightning)": {}}', "is taken by a baseline row"),
])
def test_stream_overhead_refuses_bad_variants_by_name(variants: str, message: str) -> None:
    out = subprocess.run([sys.executable, "benchmarks/stream_overhead.py", "--variants", variants], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr, out.stderr
