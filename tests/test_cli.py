"""``lightning-ssr bench`` end to end on the embedded digits data, and its option errors."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_ssr.bench import BenchOptions, resolve_methods, run_bench
from lightning_ssr.bench.runner import state_bytes
from lightning_ssr.cli import MAX_AUTO_WORKERS, auto_workers, build_parser, main

SMALL = ["--seeds", "2", "--epochs", "1", "--train-subset", "60", "--test-subset", "40", "--hidden", "32",
         "--no-progress"]


def test_default_command_end_to_end_writes_table_json_csv_and_plots(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench"
    assert main(["bench", "--scenario", "domain", "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "digits split (5 tasks), domain-incremental" in printed
    for name in ("naive", "ewc", "online-ewc", "si", "mas", "lwf", "replay", "ssr", "ssr-plugin", "naive-lightning"):
        assert f"\n{name} " in printed
    run_dir = out / "digits-split5-domain"
    data = json.loads((run_dir / "results.json").read_text())
    assert {r["method"] for r in data["summary"]} >= {"ssr", "ewc", "naive"}
    assert len(data["runs"]["ssr"]) == 2
    assert len(data["runs"]["ssr"][0]["accuracy"]) == 5 and len(data["runs"]["ssr"][0]["accuracy"][0]) == 5
    tried = data["search"]["ewc"]  # the default budget: three candidates, chosen on validation data
    assert [t["hyperparameters"]["ewc_lambda"] for t in tried] == [1000.0, 100.0, 10000.0]
    assert data["meta"]["hyperparameters"]["ewc"] == max(tried, key=lambda t: t["val_accuracy"])["hyperparameters"]
    assert data["summary"][0]["time_ratio_mean"] == pytest.approx(1.0)
    ssr_row = next(r for r in data["summary"] if r["method"] == "ssr")
    ewc_row = next(r for r in data["summary"] if r["method"] == "ewc")
    # per-neuron state plus the anchoring's one copy of the protected weights: less than EWC's
    assert 0 < ssr_row["extra_state_bytes"] < ewc_row["extra_state_bytes"]
    ewc_row = next(r for r in data["summary"] if r["method"] == "ewc")
    assert ewc_row["extra_state_bytes"] > ssr_row["extra_state_bytes"]  # EWC stores O(weights)
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert [r["method"] for r in rows] == [r["method"] for r in data["summary"]]
    pngs = sorted(p.name for p in run_dir.glob("*.png"))
    assert "average_accuracy.png" in pngs and "heatmap_ssr.png" in pngs and len(pngs) == 12 and "task_accuracy.png" in pngs
    for png in run_dir.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_budget_chooses_on_validation_and_records_it(tmp_path: Path) -> None:
    opts = BenchOptions(scenarios=("task",), methods="ewc,ssr", seeds=1, epochs=1, train_subset=50, test_subset=30,
                        hidden=16, search_budget=2, out=str(tmp_path), plots=False, progress=False)
    report = run_bench(opts, echo=lambda s: None)["task"]
    tried = report["search"]["ewc"]
    assert len(tried) == 2 and all(0 <= t["val_accuracy"] <= 1 for t in tried)
    best = max(tried, key=lambda t: t["val_accuracy"])["hyperparameters"]
    assert report["hyperparameters"]["ewc"] == best
    assert len(report["search"]["ssr"]) == 2


def test_partial_batches_all_gives_the_baselines_the_scaling_and_says_so(tmp_path: Path) -> None:
    runs = {}
    for flag in (False, True):  # 48 training images a task at batch 32: every task ends on 16
        opts = BenchOptions(scenarios=("domain",), methods="naive,ssr", seeds=1, epochs=3, lr=0.01, train_subset=48, test_subset=200,
                            hidden=16, search_budget=1, out=str(tmp_path / str(flag)), plots=False, progress=False,
                            partial_batches_all=flag)
        printed: list[str] = []
        report = run_bench(opts, echo=printed.append)["domain"]
        meta = json.loads(Path(report["files"]["json"]).read_text())["meta"]
        assert meta["settings"]["partial_batches_all"] is flag
        assert ("the methods without SSR scale partial batches too" in "\n".join(printed)) is flag
        runs[flag] = {m: r[0].accuracy for m, r in report["runs"].items()}
    assert runs[True]["ssr"] == runs[False]["ssr"]  # SSR scales its own partial batches either way
    assert runs[True]["naive"] != runs[False]["naive"] and runs[True]["naive-lightning"] != runs[False]["naive-lightning"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "ewc,magic"], "unknown method 'magic'"),
        (["--methods", "pnn", "--scenario", "class"], "method 'pnn' cannot run in the 'class' scenario"),
        (["--scenario", "online"], "`scenario` must be one or more of"),
        (["--seeds", "0"], "`seeds` must be an int >= 1, got 0"),
        (["--workers", "0"], "`workers` must be an int >= 1, got 0"),
        (["--workers", "many"], "argument --workers: must be 'auto' or an int >= 1, got 'many'"),
        (["--dataset", "mnist", "--data-dir", "/nonexistent/mnist"], "/nonexistent/mnist"),
        (["--tasks", "3"], "`n_tasks` must be one of [2, 5] for protocol='split'"),
        (["--model", "vgg"], "argument --model: invalid choice: 'vgg'"),
        (["--model", "cnn", "--methods", "pnn", "--scenario", "task"], "method 'pnn' cannot train the 'cnn' model"),
    ],
)
def test_bad_options_give_clear_errors(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--no-progress", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_workers_default_to_one_per_core() -> None:
    import os

    assert build_parser().parse_args(["bench"]).workers == auto_workers()
    assert auto_workers() == max(1, min(len(os.sched_getaffinity(0)), MAX_AUTO_WORKERS))
    from lightning_ssr.bench.options import available_cores

    assert available_cores() == len(os.sched_getaffinity(0))
    assert build_parser().parse_args(["bench", "--workers", "3"]).workers == 3


def test_time_ratio_compares_cpu_time_where_both_runs_measured_it() -> None:
    from lightning_ssr.bench.report import summarize
    from lightning_ssr.continual import StreamResult

    acc = [[0.9]]
    naive = StreamResult("naive", acc, 1, train_time_s=[4.0], train_cpu_s=[1.0])
    busy = StreamResult("x", acc, 1, train_time_s=[2.0], train_cpu_s=[1.5])  # less wall, more CPU
    rows = summarize({"naive": [naive], "x": [busy]}, {"naive": "naive", "x": "naive"})
    assert rows[1]["time_ratio_mean"] == pytest.approx(1.5)
    wall_only = StreamResult("y", acc, 1, train_time_s=[2.0])  # an older result: wall time for both
    rows = summarize({"naive": [naive], "y": [wall_only]}, {"naive": "naive", "y": "naive"})
    assert rows[1]["time_ratio_mean"] == pytest.approx(0.5)
    acc2 = [[0.9, 0.1], [0.8, 0.9]]
    full = StreamResult("naive", acc2, 2, train_time_s=[4.0, 4.0], train_cpu_s=[1.0, 1.0])
    partial = StreamResult("z", acc2, 2, train_time_s=[2.0, 2.0], train_cpu_s=[1.5])  # resumed: CPU of task 2 only
    rows = summarize({"naive": [full], "z": [partial]}, {"naive": "naive", "z": "naive"})
    assert rows[1]["time_ratio_mean"] == pytest.approx(0.5)  # wall time, not 1.5 / 2


def test_console_script_help() -> None:
    out = subprocess.run([sys.executable, "-m", "lightning_ssr.cli", "bench", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--search-budget" in out.stdout and "digits" in out.stdout


_HEAVY = ("torch", "lightning", "avalanche", "numpy")
_PROBE = """
import sys
from lightning_ssr.cli import MAX_AUTO_WORKERS, auto_workers, build_parser, main
try:
    main({argv!r})
except SystemExit as exit:
    print("exit", exit.code)
print("heavy", sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [["bench", "--help"], ["bench", "--methods", "nope"], ["bench", "--seeds", "0"],
                                  ["bench", "--scenario", "online"]], ids=["help", "method", "seeds", "scenario"])
def test_help_and_argument_errors_answer_before_anything_heavy_is_imported(argv) -> None:
    code = _PROBE.format(argv=argv, heavy=_HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "heavy []" in out.stdout, out.stdout + out.stderr
    assert ("exit 0" if "--help" in argv else "exit 2") in out.stdout


def test_help_explains_every_option_and_states_each_default_once() -> None:
    from lightning_ssr.cli import build_parser

    bench = build_parser()._subparsers._group_actions[0].choices["bench"]  # type: ignore[union-attr]
    for action in bench._actions:
        if action.dest == "help":
            continue
        rendered = bench._get_formatter()._get_help_string(action) % {"default": action.default}
        assert action.help and len(action.help) > 10, action.dest
        assert rendered.lower().count("default") <= 1, rendered
        assert "(default: None)" not in rendered


def test_progress_on_a_non_terminal_is_plain_lines(tmp_path: Path, capsys) -> None:
    opts = BenchOptions(scenarios=("domain",), methods="ssr", seeds=1, epochs=1, train_subset=40, test_subset=20,
                        hidden=16, search_budget=1, out=str(tmp_path), plots=False, progress=True)
    run_bench(opts, echo=lambda s: None)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("lightning-ssr bench:")]
    assert 1 <= len(lines) <= 10
    assert "(100%)" in lines[-1]


def test_resolve_methods_adds_the_baselines_of_each_runner() -> None:
    assert [m.name for m in resolve_methods("ssr", "class")] == ["naive-lightning", "ssr"]
    assert [m.name for m in resolve_methods("pnn,ewc", "task")] == ["naive", "ewc", "pnn"]
    names = [m.name for m in resolve_methods("ablations", "domain")]
    assert "ssr-no-scaling" in names and "ssr-no-consolidation" in names and "ssr-plugin" not in names
    assert "pnn" in [m.name for m in resolve_methods("all", "task")]
    assert "pnn" not in [m.name for m in resolve_methods("all", "task", model="cnn")]  # it builds its own MLP columns


def test_extra_callbacks_join_a_lightning_run_and_are_refused_for_an_avalanche_one() -> None:
    import lightning.pytorch as pl

    from lightning_ssr.bench.methods import METHODS
    from lightning_ssr.bench.runner import RunSettings, run_method
    from lightning_ssr.data import make_benchmark

    class Count(pl.Callback):
        fits = 0

        def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            Count.fits += 1

    bench = make_benchmark("digits", "split", "domain", seed=0, train_subset=20, test_subset=10)
    s = RunSettings(hidden=8, epochs=1, batch_size=10)
    run_method(METHODS["ssr"], {}, bench, s, seed=0, extra_callbacks=[Count()])
    assert Count.fits == bench.n_tasks
    with pytest.raises(ValueError, match=r"`extra_callbacks` are Lightning callbacks, but method 'ewc' runs in Avalanche"):
        run_method(METHODS["ewc"], {}, bench, s, seed=0, extra_callbacks=[Count()])


def test_every_method_trains_the_cnn_and_ssr_tracks_its_convolutions(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench"
    argv = ["bench", "--model", "cnn", "--scenario", "task,domain", "--methods", "ewc,lwf,replay,ssr,ssr-plugin",
            "--out", str(out), "--no-plots", "--search-budget", "1", "--workers", "1", *SMALL]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "task-incremental: CNN 16-32 conv, 32, Adam lr 0.001" in printed
    from lightning_ssr.bench.models import make_model
    from lightning_ssr.core.engine import SSREngine

    engine = SSREngine(make_model(64, 32, 10, multi_head=False, model="cnn"))
    assert list(engine.layers) == ["2", "5", "9"]  # both convolutions and the hidden Linear
    for scenario in ("task", "domain"):
        data = json.loads((out / f"digits-split5-{scenario}" / "results.json").read_text())
        assert data["meta"]["settings"]["model"] == "cnn"
        assert set(data["runs"]) == {"naive", "naive-lightning", "ewc", "lwf", "replay", "ssr", "ssr-plugin"}
        for runs in data["runs"].values():
            assert all(0.0 <= a <= 1.0 for run in runs for row in run["accuracy"] for a in row)


def test_state_bytes_counts_what_a_plugin_keeps_beyond_the_model() -> None:
    from torch import nn

    model = nn.Linear(10, 10)

    class Holder:
        __module__ = "lightning_ssr.fake"

        def __init__(self) -> None:
            self.copy = {"w": model.weight.detach().clone()}
            self.live = model.weight  # the model's own: not counted

    assert state_bytes(Holder(), model) == 100 * 4


def test_ablations_switch_one_part_each_and_ssr_replay_shares_replays_buffers() -> None:
    from lightning_ssr.bench.methods import METHODS

    names = [m.name for m in resolve_methods("ablations", "domain")]
    assert {"ssr", "ssr-update", "ssr-fixed-strength", "ssr-capacity", "ssr-fixed-pull", "ssr-no-recycle",
            "ssr-recycle-shared", "ssr-recycle-zero", "ssr-full-partial", "ssr-no-scaling", "ssr-scaling-both", "ssr-no-subspace",
            "ssr-every-step", "ssr-no-overlap"} <= set(names)
    assert "ssr-replay" not in names and "ssr-plugin" not in names
    assert METHODS["ssr-update"].base == {"protection": "update"}
    assert METHODS["ssr-capacity"].base == {"min_plasticity": 0.5}
    assert METHODS["ssr-fixed-strength"].base == {"min_plasticity": 0.0}
    assert METHODS["ssr-fixed-pull"].base == {"anchor_lr": None}
    assert METHODS["ssr-no-recycle"].base == {"recycle_below": 0.0}
    assert METHODS["ssr-recycle-shared"].base == {"recycle_shared_head": True}
    assert METHODS["ssr-recycle-zero"].base == {"recycle_outgoing": "zero"}
    assert METHODS["ssr-full-partial"].base == {"scale_partial_batches": False}
    assert METHODS["ssr-no-subspace"].base == {"subspace_energy": 0.0}
    assert METHODS["ssr-every-step"].base == {"protect_every": 1}
    assert METHODS["ssr-no-overlap"].base == {"overlap_power": 0.0}
    assert METHODS["ssr-no-scaling"].base == {"scaling_rate": 0.0}
    assert METHODS["ssr-scaling-both"].base == {"scale_down": True}
    assert METHODS["ssr-replay"].base["scaling_rate"] == 0.0  # measured beside replay without scaling
    assert METHODS["ssr-replay"].base["protect_every"] == 1  # beside a buffer the pull runs every step
    assert [g["mem_size"] for g in METHODS["ssr-replay"].grid] == [g["mem_size"] for g in METHODS["replay"].grid]


def test_worker_processes_give_the_same_figures_as_one_process(tmp_path: Path) -> None:
    def run(workers: int) -> dict:
        opts = BenchOptions(scenarios=("domain", "task"), methods="ewc,ssr", seeds=2, epochs=1, train_subset=60,
                            test_subset=40, hidden=32, search_budget=2, out=str(tmp_path / str(workers)),
                            plots=False, progress=False, workers=workers)
        printed: list[str] = []
        report = run_bench(opts, echo=printed.append)
        assert [line.split(":")[0] for line in printed if "incremental" in line] == [
            "\ndigits split (5 tasks), domain-incremental", "\ndigits split (5 tasks), task-incremental"]
        return {s: ({m: [r.accuracy for r in runs] for m, runs in report[s]["runs"].items()},
                    report[s]["hyperparameters"]) for s in report}

    assert run(2) == run(1)
    meta = json.loads((tmp_path / "2" / "digits-split5-domain" / "results.json").read_text())["meta"]
    assert meta["workers"] == 2 and meta["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)  # each worker's


def _tiny() -> float:
    """A denormal float32 times one: ``0.0`` while the CPU flushes denormals to zero."""
    return float(torch.tensor([1e-40]) * 1.0)


def test_the_bench_flushes_denormals_while_it_runs_and_leaves_torchs_default(tmp_path: Path) -> None:
    """Plain training of Permuted digits slowed 2.7x from denormal Adam moments, which skewed the time
    column; the bench flushes them for every method and switches it back off when it returns."""
    from lightning_ssr.bench.workers import denormals_flushed

    with denormals_flushed() as flushed:
        if not flushed:
            pytest.skip("this CPU cannot flush denormals")
        assert _tiny() == 0.0
    assert _tiny() != 0.0  # torch's default again
    during: list[float] = []
    opts = BenchOptions(scenarios=("domain",), methods="naive-lightning", seeds=1, epochs=1, train_subset=30,
                        test_subset=20, hidden=16, search_budget=1, out=str(tmp_path), plots=False, progress=False,
                        workers=1)
    run_bench(opts, echo=lambda line: during.append(_tiny()))  # the tables are printed during the run
    assert during and set(during[:-1]) == {0.0}  # the last line comes after it
    assert _tiny() != 0.0
    meta = json.loads((tmp_path / "digits-split5-domain" / "results.json").read_text())["meta"]
    assert meta["flush_denormal"] is True


_MAIN_PROBE = """
import sys
from lightning_ssr.bench import BenchOptions, run_bench
opts = BenchOptions(scenarios=("domain",), methods="ssr", seeds=1, epochs=1, train_subset=30, test_subset=20,
                    hidden=16, search_budget=1, out={out!r}, plots=False, progress=False, workers=2)
report = run_bench(opts, echo=lambda s: None)
print("acc", report["domain"]["runs"]["ssr"][0].average_accuracy)
print("heavy", sorted(m for m in ("lightning", "avalanche", "torchmetrics", "torchvision", "sklearn") if m in sys.modules))
"""


def test_with_workers_the_main_process_imports_neither_lightning_nor_avalanche(tmp_path: Path) -> None:
    """The workers train; the main process reads their results with torch alone (and checks the data),
    so that it does not take CPU from them for imports it does not need."""
    out = subprocess.run([sys.executable, "-c", _MAIN_PROBE.format(out=str(tmp_path))], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "heavy ['sklearn']" in out.stdout, out.stdout  # the digits' loader, for the data check
    assert 0.0 <= float(out.stdout.split("acc ")[1].split()[0]) <= 1.0


def _stat(pid: int | str) -> tuple[str, int] | None:
    """A process's state letter and parent id from ``/proc`` (``None`` once it is gone)."""
    try:
        state, ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except OSError:
        return None
    return state, int(ppid)


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    return [int(e.name) for e in Path("/proc").iterdir()
            if e.name.isdigit() and (stat := _stat(e.name)) is not None and stat[1] == pid and stat[0] != "Z"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
def test_workers_end_soon_after_the_main_process_is_killed(tmp_path: Path) -> None:
    """SIGTERM ends the main process before it can stop its pool: the workers must not run their jobs
    (here about a minute each) to the end."""
    import signal
    import time

    main_proc = subprocess.Popen(
        [sys.executable, "-m", "lightning_ssr.cli", "bench", "--workers", "2", "--methods", "ssr", "--scenario", "task",
         "--seeds", "30", "--no-plots", "--no-progress", "--out", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            workers = _children(main_proc.pid)
        assert len(workers) >= 2, f"no workers started: {workers}"
        time.sleep(5)  # past their start: importing torch, a job begun
        assert main_proc.poll() is None and all(_alive(w) for w in workers)
        main_proc.send_signal(signal.SIGTERM)
        main_proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(_alive(w) for w in workers), "workers outlived the killed main process"
    finally:
        main_proc.kill()
        for w in _children(main_proc.pid) + [w for w in workers if _alive(w)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, 9)
