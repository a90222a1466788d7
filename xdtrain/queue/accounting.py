"""What Slurm knows of a set of jobs: ``squeue`` for the jobs the controller still holds,
``sacct`` for older ones (the accounting database, or the job completion log with ``sacct -c``
on a cluster without one; on a cluster with neither, a job that ended is known by its
submitit result file only). ``sacct``'s output is parsed by submitit.

Slurm's job states (``man squeue``, JOB STATE CODES) fall into three kinds here: *active* (it
will still run or is running: PENDING, RUNNING, REQUEUED, SUSPENDED, …), *done* (COMPLETED) and
*failed* (every other end: FAILED, CANCELLED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, PREEMPTED, …).
A pending job whose dependency can never be met is failed too.
"""

from __future__ import annotations

import getpass
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from xdtrain.errors import UserError

ACTIVE = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "RESV_DEL_HOLD",
        "SPECIAL_EXIT",
    }
)
DONE = "COMPLETED"
NEVER = "DependencyNeverSatisfied"  # a pending job whose dependency failed
SQUEUE_FIELDS = "%i|%T|%M|%j|%r"

Runner = Callable[[list[str]], subprocess.CompletedProcess]


@dataclass
class JobState:
    """One Slurm job: its id, state (upper case, e.g. RUNNING), elapsed time as Slurm prints
    it, job name and, while pending, the reason."""

    job_id: str
    state: str
    elapsed: str = ""
    name: str = ""
    reason: str = ""

    @property
    def kind(self) -> str:
        """``active``, ``done`` or ``failed``."""
        if self.state == DONE:
            return "done"
        if self.state in ACTIVE and self.reason != NEVER:
            return "active"
        return "failed"


def run_command(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise UserError(
            f"{argv[0]}: not found; run xd-queue --executor slurm where Slurm's commands are "
            "installed (a login node)"
        ) from None
    except subprocess.TimeoutExpired:
        raise UserError(f"{argv[0]}: no answer in 120 s; is slurmctld up? Rerun later") from None


class Accounting:
    """Slurm's view of jobs; ``runner`` runs a command (tests and benchmarks pass a fake)."""

    def __init__(self, runner: Runner = run_command):
        self.runner = runner

    def _call(self, argv: list[str]) -> str:
        done = self.runner(argv)
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip().splitlines()
            raise UserError(
                f"{argv[0]} failed ({said[-1] if said else f'exit {done.returncode}'}); nothing "
                "was submitted or changed; rerun when Slurm answers"
            )
        return done.stdout

    def queued(self) -> dict[str, JobState]:
        """Every job of this user that the controller holds (running, pending and recently
        ended), by job id."""
        text = self._call(
            ["squeue", "-h", "-t", "all", "-u", getpass.getuser(), "-o", SQUEUE_FIELDS]
        )
        out = {}
        for row in text.splitlines():
            parts = row.split("|")
            if len(parts) == 5:
                job_id, state, elapsed, name, reason = (p.strip() for p in parts)
                out[job_id] = JobState(job_id, state.upper(), elapsed, name, reason)
        return out

    def accounted(self, ids: Iterable[str] = (), names: Iterable[str] = ()) -> dict[str, JobState]:
        """Jobs from ``sacct`` by id and jobs by name, by job id; the job completion log where
        the cluster keeps no accounting database."""
        out = {}
        ids, names = sorted(set(ids)), sorted(set(names))
        if ids:  # sacct's filters are conjunctive: one query for the ids, one for the names
            out.update(self._sacct(["-j", ",".join(ids)]))
        if names:
            out.update(self._sacct(["--name", ",".join(names), "-S", "1970-01-01"]))
        return out

    def _sacct(self, query: list[str]) -> dict[str, JobState]:
        from submitit.slurm.slurm import SlurmInfoWatcher

        query = ["-X", "--parsable2", "-o", "JobID,State,Elapsed,JobName", *query]
        done = self.runner(["sacct", *query])
        if done.returncode != 0 and "accounting storage is disabled" in done.stderr:
            done = self.runner(["sacct", "-c", *query])  # the job completion log
            if done.returncode != 0:
                return {}  # neither: what ended is known from its submitit result only
            text = done.stdout
        elif done.returncode != 0:
            text = self._call(["sacct", *query])  # raises with sacct's message
        else:
            text = done.stdout
        out = {}
        for job_id, info in SlurmInfoWatcher().read_info(text).items():
            state = (info.get("State") or "UNKNOWN").split()[0].upper()  # "CANCELLED by 0"
            out[job_id] = JobState(job_id, state, info.get("Elapsed", ""), info.get("JobName", ""))
        return out

    def states(self, ids: Iterable[str], names: Iterable[str] = ()) -> dict[str, JobState]:
        """The state of every job in ``ids`` and of every job named one of ``names`` that
        Slurm knows, by job id: ``squeue`` first, ``sacct`` for the rest."""
        ids, names = set(ids), set(names)
        queued = self.queued()
        out = {i: s for i, s in queued.items() if i in ids or s.name in names}
        missing = ids - set(out)
        named = names - {s.name for s in out.values()}
        if missing or named:
            out.update(self.accounted(missing, named))
        return out

    def time_limit(self, partition: str | None) -> str | None:
        """The time a job gets on ``partition`` (the default partition if None) when it asks
        for none: the partition's DefaultTime, else its MaxTime; None when unlimited."""
        query = ["sinfo", "-h", "-o", "%P|%L|%l"] + (["-p", partition] if partition else [])
        for row in self._call(query).splitlines():
            name, default, limit = (row.split("|") + ["", ""])[:3]
            if partition or name.endswith("*"):  # sinfo marks the default partition with *
                for value in (default, limit):
                    if value and value not in ("n/a", "infinite", "UNLIMITED"):
                        return value
                return None
        return None

    def cancel(self, job_id: str) -> None:
        self._call(["scancel", job_id])
