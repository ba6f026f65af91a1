"""What a W&B run wrote, read back offline with wandb's own reader of its transaction log.

Offline runs (``WANDB_MODE=offline``) keep everything in ``run-<id>.wandb`` (wandb 0.31 writes no
``wandb-summary.json`` or ``config.yaml`` for them, and ``wandb.Api`` needs the server). That file
is the transaction log that ``wandb sync`` uploads, and ``wandb leet inspect`` (wandb's command
line, run by its ``wandb-core`` service binary) reads it: ``--json`` prints one JSON object per
record, ``--summary --json`` the run's final summary. :func:`read_wandb_run` runs both
and assembles a :class:`WandbRun`; nothing here parses the file's bytes.

Example:
    >>> run = WandbRun(Path("run-x.wandb"), history=[{"loss": 0.5}, {"acc": 0.7}, {"loss": 0.25}])
    >>> run.values("loss")
    [0.5, 0.25]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from lightning_ssr.loggers.stream import _require_wandb

__all__ = ["WandbRun", "read_wandb_run"]

#: Seconds one ``wandb leet inspect`` may take before it is given up.
_READ_TIMEOUT_S = 120.0


@dataclass
class WandbRun:
    """What one W&B run wrote, as read back by :func:`read_wandb_run`.

    Attributes:
        path: the ``.wandb`` file.
        run_id / name / project / group: the run's identity.
        config: the final config (``wandb.init(config=...)`` and every later update).
        history: one dict per ``log`` call, in order (histograms, tables and images as the dicts
            W&B stores for them, e.g. ``{"_type": "histogram", "bins": [...], "values": [...]}``).
        summary: the final summary.
        finished: whether the run's exit record was read (the file is complete).

    Example:
        >>> run = WandbRun(Path("run-x.wandb"), history=[{"h": {"_type": "histogram", "values": [2, 1]}}])
        >>> run.values("h")[0]["_type"], run.finished
        ('histogram', False)
    """

    path: Path
    run_id: str = ""
    name: str = ""
    project: str = ""
    group: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    finished: bool = False

    def values(self, key: str) -> list[Any]:
        """Every value logged under ``key``, in order.

        Args:
            key: a top-level history key, e.g. ``"stream/average_accuracy"``.

        Returns:
            The values of the history rows that hold ``key``.
        """
        return [row[key] for row in self.history if key in row]


def _leaf_paths(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The paths to the leaves of nested dicts: ``{"a": {"b": 1}, "c": 2}`` -> ``("a", "b"), ("c",)``."""
    for key, value in tree.items():
        path = (*prefix, key)
        if isinstance(value, dict) and value:
            yield from _leaf_paths(value, path)
        else:
            yield path


def _nest(flat: dict[str, Any], paths: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """A history row with its dotted keys (``"ssr/model.0/hist/factor.bins"``) nested again.

    ``wandb leet inspect --json`` joins the path of a logged dict's fields with ``"."``, which
    cannot be told apart from a dot in a key (``"model.0"``); ``paths`` maps each joined path to
    its parts, as the run's nested summary has them. Keys not found there are kept as they are.
    """
    row: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = paths.get(key, (key,))
        target = row
        for part in parents:
            nested = target.get(part)
            if not isinstance(nested, dict):
                nested = target[part] = {}
            target = nested
        target[last] = value
    return row


def _update_config(config: dict[str, Any], record: dict[str, Any]) -> None:
    """Apply a config record: ``{"update": {key: value}, "remove": [...]}``.

    The config comes from the records rather than from ``--summary``, which leaves out keys whose
    value is an empty dict; W&B writes each config item under its top-level key, so the keys are exact.
    """
    config.update(record.get("update") or {})
    removed = record.get("remove") or []
    for item in removed.keys() if isinstance(removed, dict) else removed:
        key = (item.get("key") or ".".join(item.get("nested_key") or [])) if isinstance(item, dict) else item
        config.pop(key, None)


def _inspect_cmd(path: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags, os.fspath(path)]


def _finish(proc: subprocess.Popen[str], path: Path) -> str:
    """The standard output of a ``wandb leet inspect`` process, or the error it reported."""
    try:
        out, err = proc.communicate(timeout=_READ_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"{path}: `wandb leet inspect` did not finish within {_READ_TIMEOUT_S:.0f} s") from None
    if proc.returncode:
        message = " ".join(line.strip() for line in err.strip().splitlines()[-3:]) or f"exit status {proc.returncode}"
        if "No such command" in err:
            import wandb

            raise RuntimeError(
                f"reading W&B runs back needs `wandb leet inspect` (wandb 0.31 has it), installed wandb "
                f"{wandb.__version__} lacks it: {message}"
            )
        if "header" in err:
            raise ValueError(f"{path} is not a W&B run file: {message}")
        raise ValueError(f"{path}: wandb could not read the run file: {message}")
    return out


def _read(path: Path) -> WandbRun:
    """One reading of ``path``: its records (identity, config, history, exit) and its final summary."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false", "WANDB_SILENT": "true"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for cmd in (_inspect_cmd(path), _inspect_cmd(path, "--summary"))]
    try:
        records, final = (_finish(p, path) for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    state = json.loads(final)
    out = WandbRun(path=path, summary=dict(state.get("summary") or {}))
    paths = {".".join(p): p for p in _leaf_paths(out.summary) if len(p) > 1}
    for line in records.splitlines():
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        kind = rec.get("type")
        if kind == "run":  # the first holds everything; later ones (updates) may leave fields empty
            run = rec.get("run") or {}
            out.run_id = run.get("run_id") or out.run_id
            out.name = run.get("display_name") or out.name
            out.project = run.get("project") or out.project
            out.group = run.get("run_group") or out.group
            _update_config(out.config, run.get("config") or {})
        elif kind == "config":
            _update_config(out.config, rec.get("config") or {})
        elif kind == "history":
            out.history.append(_nest((rec.get("history") or {}).get("item") or {}, paths))
        elif kind == "exit":
            out.finished = True
    out.config.pop("_wandb", None)
    out.run_id = out.run_id or state.get("run_id") or ""
    out.name = out.name or state.get("name") or ""
    out.project = out.project or state.get("project") or ""
    return out


def read_wandb_run(path: Union[str, os.PathLike], *, wait: float = 10.0) -> WandbRun:
    """Read a W&B run's config, history and summary back from its ``.wandb`` file, offline.

    Offline runs (``WANDB_MODE=offline``) keep everything in ``run-<id>.wandb``; this reads it with
    wandb's own reader, ``wandb leet inspect`` (its records, and its final summary),
    and works on online runs' files as well. Each reading runs that command, about a second.

    W&B's service process writes the file asynchronously: right after ``run.finish()`` (or after
    the training process exited) it may still hold only part of the run. A finished run's file
    ends with its exit record, so this reads again until that record is there, for up to ``wait``
    seconds.

    Args:
        path: the ``.wandb`` file or the run directory that holds one
            (``.../wandb/offline-run-<time>-<id>``).
        wait: seconds to wait for the run's exit record; ``0`` reads what is there now (a run in
            progress). Default: ``10.0``.

    Returns:
        A :class:`WandbRun`; ``finished`` tells whether the exit record was read. History rows
        hold what each ``log`` call logged; a logged dict (a histogram, a table, an image) is
        nested under its key as in the run's summary.

    Raises:
        FileNotFoundError: when there is no ``.wandb`` file at ``path``.
        ValueError: when the file is not a W&B run file or wandb cannot read it, or ``wait`` is negative.
        RuntimeError: when the installed wandb has no ``wandb leet inspect``.

    Example::

        >>> run_dir = next(Path("runs/wandb").glob("offline-run-*"))  # doctest: +SKIP
        >>> run = read_wandb_run(run_dir)  # doctest: +SKIP
        >>> run.finished, run.summary["stream/average_accuracy"], run.config["method"]  # doctest: +SKIP
        (True, 0.83, 'SynapticScaling')
        >>> read_wandb_run("runs/wandb/offline-run-x", wait=-1)
        Traceback (most recent call last):
        ...
        ValueError: `wait` must be a number of seconds >= 0, got -1
    """
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not wait >= 0:
        raise ValueError(f"`wait` must be a number of seconds >= 0, got {wait!r}")
    _require_wandb()
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.wandb"))
        if len(files) != 1:
            raise FileNotFoundError(
                f"`path` must be a W&B run directory with one .wandb file, got {p} with {len(files)}"
            )
        p = files[0]
    if not p.is_file():
        raise FileNotFoundError(f"`path` must be a .wandb file or a run directory, got {p} (not found)")
    if p.suffix != ".wandb":
        raise ValueError(f"{p} is not a W&B run file: expected a file named *.wandb")
    deadline = time.monotonic() + wait
    while True:
        out = _read(p)
        if out.finished or time.monotonic() >= deadline:
            return out
        time.sleep(0.1)
