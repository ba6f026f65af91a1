"""``lightning_ssr.loggers.wandb_reader`` and the package's layering, on real offline W&B runs.

The streams, loggers and histograms written through Lightning and Avalanche are read back in
``tests/test_wandb.py``; here: dotted keys and logged dicts come back as they were logged, a run in
progress reads as unfinished, and ``lightning_ssr.loggers`` imports nothing of the stream runner.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")

from lightning_ssr.loggers import read_wandb_run  # noqa: E402

ROOT = Path(__file__).parent.parent


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_read_wandb_run_nests_logged_dicts_and_keeps_dotted_keys(tmp_path: Path, offline: None) -> None:
    run = wandb.init(project="reader-test", name="dots", group="g", dir=tmp_path, config={"a": {"b": 1}, "x.y": 2})
    run.log({"ssr/model.0/activity": 0.5, "ssr/model.0/hist/factor": wandb.Histogram([1.0, 2.0, 3.0], num_bins=2),
             "nested": {"k.1": {"z": 3}}})
    run.config.update({"later": "yes"})
    run.log({"ssr/model.0/activity": 0.25})
    run.summary.update({"final": 7})
    run.finish()
    (run_dir,) = (p for p in (tmp_path / "wandb").iterdir() if p.is_dir() and p.name.startswith("offline-run-"))

    out = read_wandb_run(run_dir)
    assert out.finished and (out.name, out.project, out.group) == ("dots", "reader-test", "g")
    assert out.run_id and out.path == next(run_dir.glob("*.wandb"))
    assert out.config == {"a": {"b": 1}, "x.y": 2, "later": "yes"}
    assert out.values("ssr/model.0/activity") == [0.5, 0.25]
    (hist,) = out.values("ssr/model.0/hist/factor")
    assert hist["_type"] == "histogram" and hist["values"] == [1, 2] and hist["bins"] == [1, 2, 3]
    assert out.values("nested") == [{"k.1": {"z": 3}}]
    assert [row["_step"] for row in out.history] == [0, 1]
    assert out.summary["final"] == 7 and out.summary["ssr/model.0/activity"] == 0.25
    assert out.summary["ssr/model.0/hist/factor"]["_type"] == "histogram"


def test_read_wandb_run_of_a_run_in_progress(tmp_path: Path, offline: None) -> None:
    run = wandb.init(project="reader-test", dir=tmp_path)
    try:
        run.log({"loss": 1.0})
        out = read_wandb_run(Path(run.dir).parent, wait=0)  # what W&B's service has written so far
        assert not out.finished and len(out.history) <= 1
    finally:
        run.finish()
    assert read_wandb_run(Path(run.dir).parent).finished


def test_reader_errors(tmp_path: Path) -> None:
    short = tmp_path / "run-short.wandb"
    short.write_bytes(b":W&")  # cut short within the header: a file W&B has only begun to write
    out = read_wandb_run(short, wait=0)
    assert not out.finished and out.history == [] and out.config == {} and out.run_id == ""
    other = tmp_path / "run.log"
    other.write_text("text")
    with pytest.raises(ValueError, match=r"is not a W&B run file: expected a file named \*.wandb"):
        read_wandb_run(other)
    (tmp_path / "two").mkdir()
    for name in ("a.wandb", "b.wandb"):
        (tmp_path / "two" / name).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"`path` must be a W&B run directory with one .wandb file"):
        read_wandb_run(tmp_path / "two")
    with pytest.raises(ValueError, match=r"`wait` must be a number of seconds >= 0, got True"):
        read_wandb_run(short, wait=True)


def test_loggers_import_neither_wandb_nor_the_stream_runner() -> None:
    """No upward import: ``lightning_ssr.loggers`` sits below ``lightning_ssr.continual``, which calls it."""
    code = ("import sys, lightning_ssr.loggers; "
            "print(sorted(m for m in sys.modules if m == 'wandb' or m.startswith('lightning_ssr.continual')))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
