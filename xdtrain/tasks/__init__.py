"""The task registry: one entry per pretraining method or finetuning target.

A new task is one module defining ``TASK`` plus one line here.
"""

from __future__ import annotations

import difflib

from xdtrain.errors import UserError
from xdtrain.tasks import brats, chestxray8, classify, imagenet, lits, simclr
from xdtrain.tasks.base import Metrics, Task

TASKS: dict[str, Task] = {
    m.TASK.name: m.TASK for m in (simclr, imagenet, chestxray8, brats, lits, classify)
}

__all__ = ["TASKS", "Task", "Metrics", "get_task"]


def get_task(name: str) -> Task:
    task = TASKS.get(name)
    if task is None:
        close = difflib.get_close_matches(name, TASKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"task: unknown task {name!r}{hint}; choose one of {sorted(TASKS)}")
    return task
