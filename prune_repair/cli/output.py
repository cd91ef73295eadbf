"""What a command prints: result tables and written paths on stdout; progress and notes on stderr."""

from __future__ import annotations

import enum
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..engine.run import distributed
from ..io import atomic_write

console = Console(stderr=True)
"""Progress, notes and errors (stderr)."""
out_console = Console()
"""Results: tables and the paths written (stdout)."""


def repair_title(mode: str, result: Any, seconds: float) -> str:
    """``repair (MODE, N sites|layers, S s)``: layers for a pure reconstruction, sites otherwise."""
    layers = result.to_dict().get("reconstruct", {}).get("layers", [])
    count, unit = (len(layers), "layers") if mode == "reconstruct" else (len(result.sites), "sites")
    return f"repair ({mode}, {count} {unit}, {seconds:.2f} s)"


def some(names: list[str]) -> str:
    """The first three names, then ``...``.

    >>> some(["a", "b", "c", "d"])
    'a, b, c, ...'
    """
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def repair_notes(sites: list[dict[str, Any]]) -> list[str]:
    """What a correction left out, from its report's ``sites``: dead channels, shifts with no bias to hold them.

    >>> repair_notes([{"fqn": "fc1", "dead_channels": [3], "shift_dropped": True}])[1]
    'no bias to hold the shift at 1 site(s) (fc1): the correction applied the scale only'
    """
    notes = []
    dead = {s["fqn"]: s["dead_channels"] for s in sites if s.get("dead_channels")}
    if dead:
        notes.append(f"{sum(len(v) for v in dead.values())} dead channel(s) (zero or non-finite spread) left as they "
                     f"were, at {len(dead)} site(s) ({some(list(dead))}); the report lists them")
    dropped = [s["fqn"] for s in sites if s.get("shift_dropped")]
    if dropped:
        notes.append(f"no bias to hold the shift at {len(dropped)} site(s) ({some(dropped)}): the correction applied "
                     "the scale only")
    return notes


def print_repair_notes(result: Any) -> None:
    """Print :func:`repair_notes` of a :class:`~prune_repair.engine.correct.report.RepairReport` on stderr."""
    for note in repair_notes(result.to_dict()["sites"]):
        console.print(note)


def written(paths: Mapping[str, str | None]) -> None:
    """Say on stdout where each output file went (``{what: path}``; None entries skipped)."""
    for what, path in paths.items():
        if path is not None:
            out_console.print(f"wrote {what}: {escape(str(Path(path).expanduser().resolve()))}", highlight=False,
                              soft_wrap=True)


def _jsonable(value: Any) -> Any:
    """Report values as strict JSON: NaN/Inf become null, tensors/arrays lists, enums their value."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return _jsonable(value.tolist())
    return str(value)


def write_report(path: str | None, report: dict[str, Any]) -> None:
    """Atomically write the JSON report (strict JSON: non-finite numbers become null)."""
    if path is None:
        return
    report = {**report, "world_size": distributed.world_size()}
    text = json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n"
    with atomic_write(path) as tmp:
        Path(tmp).write_text(text)


class PlainProgress:
    """Progress as plain lines on stderr for logs and CI (no terminal): one line when a task
    starts, at most one every ``every`` seconds while it runs, and one when it is done.

    >>> bar = PlainProgress(every=0.0)
    >>> with bar:
    ...     task = bar.add_task("curve", total=2, visible=False)
    ...     bar.advance(task)
    """

    def __init__(self, every: float = 5.0):
        self.every, self.tasks = every, {}

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, visible: bool = True) -> int:
        task = len(self.tasks)
        self.tasks[task] = {"description": description, "total": total, "completed": 0, "visible": visible,
                            "start": time.perf_counter(), "last": 0.0}
        return task

    def advance(self, task: int, amount: float = 1) -> None:
        self.update(task, completed=self.tasks[task]["completed"] + amount)

    def update(self, task: int, completed: float | None = None, total: float | None = None) -> None:
        t = self.tasks[task]
        t["completed"] = t["completed"] if completed is None else completed
        t["total"] = t["total"] if total is None else total
        now = time.perf_counter()
        done = t["total"] is not None and t["completed"] >= t["total"]
        if t["visible"] and (done or now - t["last"] >= self.every):
            t["last"] = now
            total_text = "?" if t["total"] is None else f"{t['total']:g}"
            console.print(f"{t['description']}: {t['completed']:g}/{total_text} ({now - t['start']:.1f} s)",
                          highlight=False)


def progress() -> Progress | PlainProgress:
    """A rich progress bar on stderr, or plain lines at most every 5 s when stderr is not a terminal."""
    if not console.is_terminal:
        return PlainProgress()
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=console, transient=True)


def metrics_table(title: str, rows: list[tuple[str, dict[str, float]]], caption: str | None = None) -> Table:
    """A table of (name, {"acc", "loss"}) rows."""
    table = Table(title=title, caption=caption)
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    table.add_column("loss", justify="right")
    for name, metrics in rows:
        table.add_row(name, f"{100 * metrics['acc']:.2f}%", f"{metrics['loss']:.4f}")
    return table
