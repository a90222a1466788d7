"""The Slurm executor: every job line becomes one Slurm job, submitted through submitit.

``xd-queue JOBS --executor slurm`` first reconciles the jobs file with Slurm
(:mod:`xdtrain.queue.accounting`), then submits what is to do:

- a line ``submitted: slurm N`` whose job is pending or running is left alone; one that
  completed becomes ``done``; one that failed, was cancelled, timed out or that Slurm no longer
  knows (and whose submitit result is not a success) is submitted again, an ``xd-train`` job
  with ``--resume``;
- a line ``submitting: slurm NAME`` (the queue was killed around ``sbatch``) takes the job of
  that name if Slurm has one, so no job is submitted twice;
- a job waits (``afterok``) for the jobs of the lines it waits for
  (:mod:`xdtrain.queue.depends`); a job whose dependency failed is cancelled by Slurm
  (``--kill-on-invalid-dep=yes``) and submitted again on the next run.

Every job asks for ``--requeue`` and for SIGUSR2 ``signal_delay_s`` seconds before its time
limit. On that signal submitit calls :meth:`XdJob.checkpoint`: the job's ``xd-train`` writes its
checkpoint and exits, and the job is requeued (``scontrol requeue``). On preemption or
``scontrol requeue`` Slurm sends SIGTERM to every process of the job: ``xd-train`` writes its
checkpoint and exits, Slurm puts the job back in the queue. A requeued job runs its command with
``--resume`` and continues from the checkpoint.

An ``xd-train`` job on ``--nodes N`` (or with more than one GPU) runs ``torchrun`` on every
node through one ``srun`` task per node, the rendezvous taken from the SLURM_* environment
(:mod:`xdtrain.queue.slurm_job`); what each job asks for is :mod:`xdtrain.queue.slurm_options`.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import secrets
import time
from pathlib import Path

from xdtrain.errors import Interrupted, UserError
from xdtrain.fileio import atomic_write
from xdtrain.queue.accounting import ACTIVE, Accounting, JobState
from xdtrain.queue.jobsfile import (
    Line,
    alive,
    announce,
    check_programs,
    done_word,
    jobs,
    resumed,
    writer,
)  # fmt: skip
from xdtrain.queue.slurm_job import XdJob
from xdtrain.queue.slurm_options import (
    NO_LIMIT,
    SlurmOptions,
    executor,
    line_options,
    parameters,
)


class History:
    """``<logs>/history.json``: every Slurm job id each command was given, oldest first; what
    ``xd-queue status`` shows for finished lines, and the proof that nothing ran twice."""

    def __init__(self, path: Path):
        self.path = path
        self.ids: dict[str, list[str]] = {}
        if path.exists():
            try:
                self.ids = json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError):
                raise UserError(
                    f"{path}: damaged; move it away (the jobs file keeps every live job id)"
                ) from None

    def add(self, line: Line, job_id: str) -> None:
        known = self.ids.setdefault(line.command, [])
        if job_id not in known:
            known.append(job_id)

    def last(self, line: Line) -> str | None:
        known = self.ids.get(line.command)
        return known[-1] if known else None

    def save(self) -> None:
        atomic_write(self.path, json.dumps(self.ids, indent=1) + "\n")


def log_of(folder: Path, job_id: str) -> Path:
    return folder / f"{job_id}_0_log.out"


def _job_name(line: Line) -> str:
    stem = line.argv[0]
    if line.argv[0] == "xd-train":
        stem = Path(line.argv[1]).stem if len(line.argv) > 1 else stem
        for item, value in zip(line.argv, line.argv[1:], strict=False):
            if item == "--set" and value.startswith("run.name="):
                stem = value.split("=", 1)[1]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", stem)[:60]
    return f"{stem}.{secrets.token_hex(4)}"


def _succeeded(folder: Path, job_id: str) -> bool:
    """Whether submitit's result file of ``job_id`` says the job succeeded."""
    path = folder / f"{job_id}_0_result.pkl"
    if not path.exists():
        return False
    try:
        import cloudpickle

        with open(path, "rb") as fh:
            outcome, _ = cloudpickle.load(fh)
    except Exception:  # noqa: BLE001 - an unreadable result is no success
        return False
    return outcome == "success"


def reconcile(
    lines: list[Line], folder: Path, accounting: Accounting, history: History
) -> tuple[dict[int, JobState], set[int]]:
    """Bring the statuses of ``lines`` in line with Slurm. Returns the Slurm state of every
    line with a job, by line number, and the numbers of the lines to (re)submit with
    ``--resume`` (failed or lost jobs)."""
    word = done_word(lines)
    todo = [line for line in jobs(lines) if not line.finished]
    ids = {line.slurm_id for line in todo if line.slurm_id}
    names = {line.slurm_name for line in todo if line.slurm_name}
    states = accounting.states(ids, names) if ids or names else {}
    by_name: dict[str, JobState] = {}
    for state in states.values():
        if state.name and (state.name not in by_name or _newer(state, by_name[state.name])):
            by_name[state.name] = state
    seen: dict[int, JobState] = {}
    again: set[int] = set()
    for line in todo:
        if line.slurm_name:
            adopted = by_name.get(line.slurm_name)
            if adopted is None:  # never reached Slurm: submitted now
                if line.status.endswith(" again"):
                    again.add(line.number)
                line.status = ""
                continue
            line.status = f"submitted: slurm {adopted.job_id}"
        job_id = line.slurm_id
        if job_id is None:
            if line.pid is not None or line.status.startswith("failed"):
                again.add(line.number)
            continue
        history.add(line, job_id)
        state = states.get(job_id)
        if state is None:  # Slurm forgot it: its result file says how it ended
            if _succeeded(folder, job_id):
                line.status = word
            else:
                line.status = f"failed: {log_of(folder, job_id)} (lost)"
                again.add(line.number)
                print(
                    f"again: line {line.number}: slurm {job_id} is unknown to Slurm and left no "
                    "result; submitted again",
                    flush=True,
                )
            continue
        seen[line.number] = state
        if state.kind == "done":
            line.status = word
        elif state.kind == "failed":
            if state.state in ACTIVE:
                accounting.cancel(job_id)  # pending on a dependency that failed: never runs
            line.status = f"failed: {log_of(folder, job_id)}"
            again.add(line.number)
            ended = state.reason if state.state in ACTIVE else state.state
            print(
                f"again: line {line.number}: slurm {job_id} ended {ended} (log "
                f"{log_of(folder, job_id)}); submitted again",
                flush=True,
            )
    return seen, again


def _newer(a: JobState, b: JobState) -> bool:
    return int(a.job_id.split("_")[0]) > int(b.job_id.split("_")[0])


def submit_jobs(
    path: Path,
    lines: list[Line],
    order: list[int],
    waits: dict[int, set[int]],
    options: SlurmOptions,
    logs: Path,
    accounting: Accounting | None = None,
) -> int:
    """``xd-queue JOBS --executor slurm``: reconcile, submit what is to do, and (unless
    ``options.wait`` is false) follow the jobs until none is pending or running."""
    accounting = accounting or Accounting()
    folder = (logs / "slurm").resolve()  # the job scripts name it: absolute
    folder.mkdir(parents=True, exist_ok=True)
    for line in jobs(lines):
        if line.pid is not None and alive(line.pid, line.argv[0]):
            raise UserError(
                f"{path}: line {line.number} runs here as pid {line.pid} (local executor); let "
                "it finish or stop it before giving the file to Slurm"
            )
    save_file = writer(path)
    history = History(folder / "history.json")

    def save() -> None:
        save_file(lines)
        history.save()

    check_programs(path, lines)  # an xd-* program that is not installed: refused here
    _, again = reconcile(lines, folder, accounting, history)
    save()
    by_number = {line.number: line for line in jobs(lines)}
    todo = [by_number[n] for n in order if not by_number[n].finished and not by_number[n].slurm_id]
    if todo:
        plans = plan(path, todo, options, accounting)
        made = executor(folder, options)
        submit(path, todo, plans, by_number, again, waits, made, history, save)
    if not options.wait:
        return summary(path, lines, waiting=True)
    return follow(path, lines, folder, accounting, options, save)


def plan(path: Path, todo: list[Line], options: SlurmOptions, accounting: Accounting) -> dict:
    """Every line's options and submitit parameters, checked before anything is submitted or
    written: its ``--slurm`` settings, the partition's own time limit where none is given, a
    time-limit signal that comes before the limit."""
    limits: dict[str | None, str | None] = {}
    plans = {}
    for line in todo:
        mine = line_options(options, line, path)
        if mine.time is None and mine.partition not in limits:
            limits[mine.partition] = accounting.time_limit(mine.partition)
        params = parameters(mine, limits.get(mine.partition), line.argv[0])
        if params["time"] != NO_LIMIT and params["time"] * 60 <= mine.signal_delay_s:
            raise UserError(
                f"{path}: line {line.number}: a time limit of {params['time']} min is no longer "
                f"than --signal-delay {mine.signal_delay_s} s: the job would be told to stop as "
                "it starts; give more --time or a shorter --signal-delay"
            )
        plans[line.number] = (mine, params)
    return plans


def submit(path, todo, plans, by_number, again, waits, made, history, save) -> None:
    """Submit ``todo`` with the submitit executor ``made``, in the order given (each after the
    lines it waits for). A submission Slurm refuses stops here with sbatch's message; the lines
    not submitted get their statuses back."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    before = {line.number: line.status for line in todo}
    for line in todo:  # the names first, in one write: a killed queue finds its jobs by them
        retry = " again" if line.number in again else ""
        line.status = f"submitting: slurm {_job_name(line)}{retry}"
    save()
    saved_at = time.monotonic()
    cwd = Path.cwd()
    for line in todo:
        after = []
        for number in sorted(waits.get(line.number, ())):
            dependency = by_number[number]
            if not dependency.finished:
                after.append(dependency.slurm_id)  # submitted before it: the order says so
        argv = resumed(line.argv) if line.number in again else line.argv
        mine, params = plans[line.number]
        extra = {"requeue": True, **mine.extra}
        if after:
            extra["kill-on-invalid-dep"] = "yes"
        made.update_parameters(
            **params,
            job_name=line.slurm_name,
            dependency=f"afterok:{':'.join(after)}" if after else None,
            additional_parameters=extra,
        )
        grace = max(10.0, mine.signal_delay_s - 20.0)
        procs = max(params["gpus_per_node"] or 0, 1)
        try:
            # submitit prints sbatch's complaint itself; the one line below says it instead
            with contextlib.redirect_stderr(io.StringIO()):
                job = made.submit(XdJob(argv, cwd, params["nodes"], procs, grace))
        except (FailedJobError, FailedSubmissionError, OSError) as exc:
            for other in todo:
                if other.slurm_name:  # not submitted: as it was
                    other.status = before[other.number]
            save()
            said = [t for t in str(exc).splitlines() if t.strip()]
            said = next(
                (t for t in reversed(said) if "error" in t.lower()), said[-1] if said else ""
            )
            raise UserError(
                f"{path}: line {line.number}: sbatch refused the job ({said.strip()}); the lines "
                "before it were submitted, this one and the rest were not. Fix its options and "
                "rerun"
            ) from None
        line.status = f"submitted: slurm {job.job_id}"
        history.add(line, job.job_id)
        print(f"submitted: line {line.number}: slurm {job.job_id}: {line.command}", flush=True)
        if time.monotonic() - saved_at > 2.0:
            save()
            saved_at = time.monotonic()
    save()


WAITING = {  # pending reasons that need a person, not time
    "PartitionConfig": "the partition cannot give what it asks for (nodes, GPUs, time)",
    "PartitionNodeLimit": "more nodes than the partition allows",
    "PartitionTimeLimit": "more time than the partition allows",
    "BadConstraints": "no node has the asked constraints",
    "InvalidAccount": "an account Slurm does not know",
    "InvalidQOS": "a QOS Slurm does not know",
    "JobHeldUser": "held (scontrol release <id>)",
    "JobHeldAdmin": "held by an administrator",
    "ReqNodeNotAvail": "the nodes it asks for are down or reserved",
}


def follow(path, lines, folder, accounting, options, save) -> int:
    """Poll Slurm until no job of the file is pending or running, writing each end; a job
    waiting for a person (held, asking what the partition cannot give) is said once."""
    word = done_word(lines)
    said: set[str] = set()
    try:
        while True:
            active = [line for line in jobs(lines) if line.slurm_id]
            if not active:
                break
            states = accounting.states({line.slurm_id for line in active})
            changed = False
            for line in active:
                state = states.get(line.slurm_id)
                if state is not None and state.kind == "active":
                    why = WAITING.get(state.reason) or (
                        "held" if state.state in ("REQUEUE_HOLD", "SPECIAL_EXIT") else None
                    )
                    if why and line.slurm_id not in said:
                        said.add(line.slurm_id)
                        print(
                            f"waiting: line {line.number}: slurm {line.slurm_id} is "
                            f"{state.state} ({state.reason}): {why}",
                            flush=True,
                        )
                    continue
                if state is None and not _succeeded(folder, line.slurm_id):
                    line.status = f"failed: {log_of(folder, line.slurm_id)} (lost)"
                elif state is None or state.kind == "done":
                    line.status = word
                else:
                    line.status = f"failed: {log_of(folder, line.slurm_id)}"
                changed = True
                announce(line)
            if changed:
                save()
            if any(line.slurm_id for line in jobs(lines)):
                time.sleep(options.poll_s)
    except KeyboardInterrupt:
        raise Interrupted(
            f"{path}: stopped following; the jobs stay in Slurm. Rerun the same command (or "
            "xd-queue status) to follow them"
        ) from None
    return summary(path, lines)


def summary(path: Path, lines: list[Line], waiting: bool = False) -> int:
    all_jobs = jobs(lines)
    done = sum(1 for line in all_jobs if line.finished)
    failed = sum(1 for line in all_jobs if line.status.startswith("failed"))
    queued = sum(1 for line in all_jobs if line.slurm_id)
    text = f"{path}: {done}/{len(all_jobs)} done, {failed} failed"
    if waiting and queued:
        text += f", {queued} in Slurm (rerun xd-queue or xd-queue status to follow them)"
    print(text)
    return 1 if failed else 0
