"""The rich progress bar every long-running command shows (items/s and ETA)."""

from __future__ import annotations

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


class LazyProgress(Progress):
    """Starts drawing at its first task, so a command that fails early prints only its error."""

    def __enter__(self) -> LazyProgress:
        return self

    def add_task(self, *args, **kwargs):
        if not self.live.is_started:
            self.start()
        return super().add_task(*args, **kwargs)

    def stop(self) -> None:
        if self.live.is_started:
            super().stop()


def make_progress(console: Console | None = None, enabled: bool = True) -> Progress:
    """A progress bar on stderr, so stdout stays clean for what a command prints."""
    return LazyProgress(
        TextColumn("[bold]{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        disable=not enabled,
    )
