"""``xd-queue status JOBS``: every line of a jobs file with its state, elapsed time and log.

Read only: nothing is submitted and the file is not written. A Slurm line shows what Slurm
says now (``squeue``/``sacct``); a finished or failed line shows the last Slurm job its command
was given (``<logs>/slurm/history.json``); a local line shows whether its process still runs.
"""

from __future__ import annotations

from pathlib import Path

from xdtrain.queue.accounting import Accounting
from xdtrain.queue.jobsfile import Line, alive, jobs
from xdtrain.queue.local import log_path
from xdtrain.queue.slurm import History, log_of


def table(lines: list[Line], logs: Path, accounting: Accounting | None = None) -> list[dict]:
    """One row per job line: line, status, job, state, elapsed, log, command."""
    folder = logs / "slurm"
    history = History(folder / "history.json")
    ids = {}
    for line in jobs(lines):
        job_id = line.slurm_id or history.last(line)
        if job_id:
            ids[line.number] = job_id
    names = {line.slurm_name for line in jobs(lines) if line.slurm_name}
    states = {}
    if ids or names:
        states = (accounting or Accounting()).states(set(ids.values()), names)
    by_name = {s.name: s for s in states.values()}
    rows = []
    for line in jobs(lines):
        job_id = ids.get(line.number)
        state = states.get(job_id) if job_id else by_name.get(line.slurm_name or "")
        if state is not None and job_id is None:
            job_id = state.job_id
        row = {
            "line": line.number,
            "status": line.status.split(":")[0] or "open",
            "job": f"slurm {job_id}" if job_id else "",
            "state": state.state if state else "",
            "elapsed": state.elapsed if state else "",
            "log": "",
            "command": line.command,
        }
        if job_id:
            row["log"] = str(log_of(folder, job_id))
        elif line.pid is not None:
            row["job"] = f"pid {line.pid}"
            row["state"] = "RUNNING" if alive(line.pid, line.argv[0]) else "INTERRUPTED"
        if not row["log"] and log_path(logs, line).exists():
            row["log"] = str(log_path(logs, line))
        if not job_id and not line.pid and line.status.startswith("failed: "):
            row["log"] = line.status[len("failed: ") :]
        rows.append(row)
    return rows


def show(rows: list[dict], width: int = 60) -> str:
    """``rows`` as an aligned text table, commands cut to ``width`` characters."""
    columns = ["line", "status", "job", "state", "elapsed", "log", "command"]
    cells = [[str(r[c]) for c in columns] for r in rows]
    for cell in cells:
        if len(cell[-1]) > width:
            cell[-1] = cell[-1][: width - 1] + "…"
    sizes = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    out = []
    for row in [columns, *cells]:
        out.append("  ".join(v.ljust(s) for v, s in zip(row, sizes, strict=True)).rstrip())
    return "\n".join(out)
