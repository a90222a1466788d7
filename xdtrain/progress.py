"""What a long-running command shows while it works: a rich progress bar on a terminal, one
plain line at a time in a job log (xd-queue, Slurm: no terminal, nothing redrawn).

:func:`make_progress` chooses: on a terminal the bar (items/s, ETA, and a task's ``loss`` and
``lr`` fields when it has them); elsewhere :class:`LineProgress`, which writes a line every
``every`` items of a task added with ``lines=True`` and one when the task completes.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, from rich's moving estimate."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("   ? it/s" if speed is None else f"{speed:7.1f} it/s")


class FieldsColumn(ProgressColumn):
    """A training task's last loss and learning rate (its ``loss`` and ``lr`` fields)."""

    def render(self, task: Task) -> Text:
        parts = []
        if task.fields.get("loss") is not None:
            parts.append(f"loss {task.fields['loss']:.4f}")
        if task.fields.get("lr") is not None:
            parts.append(f"lr {task.fields['lr']:.2e}")
        return Text(" ".join(parts))


class LazyProgress(Progress):
    """Starts drawing at its first task, so a command that fails early prints only its error."""

    def __enter__(self) -> LazyProgress:
        return self

    def add_task(self, *args, lines: bool = False, **kwargs):
        if not self.live.is_started:
            self.start()
        return super().add_task(*args, **kwargs)

    def stop(self) -> None:
        if self.live.is_started:
            super().stop()


def clock(seconds: float | None) -> str:
    """``H:MM:SS`` of a duration in seconds; ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(max(seconds, 0.0)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def stamp() -> str:
    """The wall-clock time a job-log line starts with."""
    return time.strftime("%H:%M:%S")


class LineProgress:
    """The subset of rich's ``Progress`` the commands use, written as lines for a job log.

    A task added with ``lines=True`` gets a line every ``every`` items (and one when it
    completes): ``HH:MM:SS <description>: <done>/<total> <unit>, <rate> <unit>/s, elapsed
    <H:MM:SS>``.
    Other tasks (the training bar, whose lines the trainer writes itself with the loss,
    learning rate and throughput of the steps between two lines) print nothing."""

    def __init__(self, every: int = 50, stream: TextIO | None = None, unit: str = "batches"):
        self.every, self.unit = max(int(every), 1), unit
        self.stream = stream
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, lines: bool = False, **_):
        task_id = len(self.tasks)
        self.tasks[task_id] = {
            "description": description,
            "total": total,
            "completed": 0,
            "lines": lines,
            "start": time.perf_counter(),
        }
        return task_id

    def update(self, task_id, advance: float = 0, completed=None, description=None, **_):
        task = self.tasks[task_id]
        before = task["completed"]
        task["completed"] = completed if completed is not None else before + advance
        if description is not None:
            task["description"] = description
        if not task["lines"] or task["completed"] == before:
            return
        done = task["completed"] == task["total"]
        if done or int(task["completed"]) // self.every > int(before) // self.every:
            self._line(task)

    def advance(self, task_id, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def remove_task(self, task_id) -> None:
        self.tasks.pop(task_id, None)

    def _line(self, task: dict) -> None:
        seconds = time.perf_counter() - task["start"]
        rate = task["completed"] / seconds if seconds > 0 else 0.0
        total = "?" if task["total"] is None else int(task["total"])
        text = (
            f"{stamp()} {task['description']}: {int(task['completed'])}/{total} {self.unit}, "
            f"{rate:.1f} {self.unit}/s, elapsed {clock(seconds)}"
        )
        print(text, file=self.stream or sys.stderr, flush=True)


def on_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (standard error by default) is a terminal a bar can redraw."""
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def make_progress(
    console: Console | None = None, enabled: bool = True, every: int | None = None
) -> Progress | LineProgress:
    """Progress on stderr, so stdout stays clean for what a command prints.

    ``enabled`` False draws nothing. ``every``: the items between two lines when standard
    error is no terminal (a job log); None keeps the bar there too, drawn by rich only once
    at the end (the commands whose output is short)."""
    if enabled and every is not None and not on_terminal():
        return LineProgress(every)
    return LazyProgress(
        TextColumn("[bold]{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        FieldsColumn(),
        console=console or Console(stderr=True),
        disable=not enabled,
    )
