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

A job on ``--nodes N`` (or with more than one GPU) runs ``torchrun`` on every node through one
``srun`` task per node, the rendezvous taken from the SLURM_* environment (:func:`launch`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from xdtrain.errors import Interrupted, UserError
from xdtrain.fileio import atomic_write
from xdtrain.queue.accounting import ACTIVE, Accounting, JobState
from xdtrain.queue.jobsfile import Line, done_word, jobs, writer
from xdtrain.queue.local import alive, check_programs, resumed

REQUEUE_SIGNAL = signal.SIGUSR2  # submitit's default (SUBMITIT_PREEMPT_SIGNAL changes it)


@dataclass
class SlurmOptions:
    """What every job of the file asks Slurm for (``xd-queue --executor slurm`` options)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_job: int = 0  # GPUs on each node of a job
    nodes: int = 1
    cpus_per_gpu: int | None = None  # CPUs per GPU; the job's CPUs when it has no GPU
    mem: str | None = None  # per node, as sbatch takes it: 64G
    time: str | None = None  # sbatch's formats: minutes, HH:MM:SS, D-HH:MM:SS
    extra: dict[str, str] = field(default_factory=dict)  # --slurm-arg KEY=VALUE
    signal_delay_s: int = 120
    max_requeues: int = 100  # time-limit requeues of one job before it is given up
    poll_s: float = 30.0
    wait: bool = True


def minutes(text: str) -> int:
    """sbatch's ``--time`` formats (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``) in whole minutes, rounded up; raises :class:`UserError`."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match or text.strip() in ("", "0"):
        raise UserError(f"--time {text!r}: write minutes, HH:MM:SS or D-HH:MM:SS (e.g. 2-00:00:00)")
    days, a, b, c = match.groups()
    a, b, c = int(a), int(b or 0), int(c or 0)
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + a * 3600 + b * 60 + c
    elif match.group(4) is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    else:  # MM or MM:SS
        seconds = a * 60 + b
    return max(1, -(-seconds // 60))


def launch(argv: list[str], nodes: int, procs: int, env: dict[str, str]) -> list[str]:
    """The command one node of a job runs: the ``xd-*`` program, or for an ``xd-train`` job
    with ``nodes × procs`` > 1, ``torchrun`` with one process per GPU of the node. Node rank
    ``SLURM_NODEID``; the rendezvous at the job's first node (``SLURM_JOB_NODELIST``) on a port
    derived from ``SLURM_JOB_ID``, so two jobs sharing a node do not collide."""
    program = str(Path(sys.executable).with_name(argv[0]))
    if argv[0] != "xd-train" or nodes * procs == 1:
        return [program, *argv[1:]]
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}"]
    if nodes == 1:
        torchrun.append("--standalone")
    else:
        first = first_node(env.get("SLURM_JOB_NODELIST", ""))
        port = 15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        torchrun += [
            f"--nnodes={nodes}",
            f"--node-rank={env.get('SLURM_NODEID', '0')}",
            f"--master-addr={first}",
            f"--master-port={port}",
        ]
    return [*torchrun, "-m", "xdtrain.train", *argv[1:]]


def first_node(nodelist: str) -> str:
    """The first host of a Slurm node list (``gpu[03-05,07],cpu1`` → ``gpu03``)."""
    if not nodelist:
        raise UserError("SLURM_JOB_NODELIST is not set: a multi-node job runs inside Slurm")
    from submitit.slurm.slurm import _parse_node_list

    return _parse_node_list(nodelist)[0]


def _ignore_user_signals() -> None:
    """In the job's child: SIGUSR1/SIGUSR2 ignored until ``xd-train`` installs its own
    handlers, so ``torchrun`` (which has none) is not killed by the time-limit signal that
    Slurm sends to every process of the job."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class JobFailed(RuntimeError):
    """The job's command ended with a non-zero status."""


class XdJob:
    """What submitit runs on the node: one jobs-file command, in the folder the queue ran in.

    ``requeued``: the job was requeued by :meth:`checkpoint`; like a job Slurm requeued
    (``SLURM_RESTART_COUNT`` > 0), it runs its command resumed (``xd-train … --resume``).
    """

    def __init__(self, argv, cwd, nodes=1, procs=1, grace_s=100.0, requeued=False):
        self.argv, self.cwd, self.nodes, self.procs = list(argv), str(cwd), nodes, procs
        self.grace_s, self.requeued = grace_s, requeued
        self._proc = None
        self._status: int | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_proc"] = None
        return state

    def command(self, env: dict[str, str]) -> list[str]:
        argv = self.argv
        if self.requeued or int(env.get("SLURM_RESTART_COUNT") or 0) > 0:
            argv = resumed(argv)
        return launch(argv, self.nodes, self.procs, env)

    def __call__(self) -> int:
        command = self.command(dict(os.environ))
        print(f"$ {shlex.join(command)}", flush=True)
        self._proc = subprocess.Popen(command, cwd=self.cwd, preexec_fn=_ignore_user_signals)
        while self._proc.poll() is None:
            time.sleep(0.5)  # polling, not wait(): the signal handler may wait for the child
        code = self._proc.returncode
        if code != 0:
            why = ""
            if code > 128 or code < 0:
                why = " (stopped by a signal; an xd-train run wrote its checkpoint first)"
            raise JobFailed(f"{shlex.join(self.argv)} exited with status {code}{why}")
        return code

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on the time-limit signal: stop the command (``xd-train``
        writes its checkpoint on SIGTERM and exits) and hand submitit this job, resumed, to
        requeue."""
        from submitit.helpers import DelayedSubmission

        proc = self._proc
        finished = False
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + self.grace_s
            while time.monotonic() < deadline and not self._reaped(proc.pid):
                time.sleep(0.2)
            if not self._reaped(proc.pid):
                os.kill(proc.pid, signal.SIGKILL)
            finished = self._status == 0
        elif proc is not None:
            finished = proc.returncode == 0
        if finished:  # it ended well as the signal came: the requeued job has nothing to do
            return DelayedSubmission(_Finished())
        again = XdJob(self.argv, self.cwd, self.nodes, self.procs, self.grace_s, requeued=True)
        return DelayedSubmission(again)

    def _reaped(self, pid: int) -> bool:
        """Whether the child ended (reaping it; its exit status in ``_status``)."""
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if done == pid:
            self._status = os.waitstatus_to_exitcode(status)
        return done == pid


class _Finished:
    """A requeued job whose command had already ended well: nothing left to run."""

    def __call__(self) -> int:
        print("the command had ended well before the job was requeued: nothing to run")
        return 0


# --------------------------------------------------------------------------- the queue


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


NO_LIMIT = 10**7  # minutes: what submitit is told when a job asks for no --time


class _Executor:
    """Builds submitit's ``SlurmExecutor`` (a subclass, so that a job without a time limit
    sends no ``--time`` while submitit keeps a number for its own time-out bookkeeping)."""

    @staticmethod
    def make(folder: Path, max_requeues: int):
        import submitit
        from submitit.slurm.slurm import _make_sbatch_string

        class Executor(submitit.SlurmExecutor):
            def _make_submission_file_text(self, command: str, uid: str) -> str:
                params = dict(self.parameters)
                if params.get("time") == NO_LIMIT:
                    params["time"] = None  # the partition's own limit: none
                return _make_sbatch_string(command=command, folder=self.folder, **params)

        return Executor(folder=folder, max_num_timeout=max_requeues)


def executor(folder: Path, options: SlurmOptions):
    """A submitit ``SlurmExecutor`` writing into ``folder``."""
    try:
        return _Executor.make(folder, options.max_requeues)
    except RuntimeError:
        raise UserError(
            "srun: not found; run xd-queue --executor slurm on a machine of the cluster"
        ) from None


NUMBERS = ("gpus_per_job", "nodes", "cpus_per_gpu")
WORDS = ("partition", "account", "qos", "mem", "time")
# sbatch options the queue sets itself, or that would break what it counts on (one task per
# node, one job per line, the requeue and its signal): refused in --slurm and --slurm-arg
MANAGED = {
    "gpus-per-node": "gpus-per-job",
    "gpus": "gpus-per-job",
    "gres": "gpus-per-job (and constraint= for other resources)",
    "gpus-per-task": "gpus-per-job",
    "nodes": "nodes (--nodes, or --slurm nodes=N on a line)",
    "ntasks": None,
    "ntasks-per-node": None,
    "array": None,
    "dependency": "--after on a line",
    "job-name": None,
    "output": None,
    "error": None,
    "open-mode": None,
    "signal": "--signal-delay",
    "requeue": None,
    "no-requeue": None,
    "time": "--time (or --slurm time=T on a line)",
    "wrap": None,
}


def check_sbatch_key(key: str, where: str) -> None:
    """Refuses an sbatch option that the queue sets itself or that would break a job."""
    if key in MANAGED:
        instead = MANAGED[key]
        raise UserError(
            f"{where}: --{key} is set by xd-queue"
            + (f"; use {instead}" if instead else " (one job, one task per node, per line)")
        )


def line_options(options: SlurmOptions, line: Line, path: Path) -> SlurmOptions:
    """``options`` with the line's ``--slurm KEY=VALUE`` settings: the queue's own options by
    their name (``gpus-per-job``, ``nodes``, ``cpus-per-gpu``, ``partition``, ``account``,
    ``qos``, ``mem``, ``time``), any other sbatch option as it is (``hold``: a flag). Raises
    :class:`UserError` naming the line for a value Slurm or the queue cannot use."""
    where = f"{path}: line {line.number}"
    changes: dict = {}
    extra = dict(options.extra)
    for key, value in line.slurm.items():
        name = key.replace("-", "_")
        if name in NUMBERS + WORDS and value is True:
            raise UserError(f"{where}: --slurm {key} needs a value ({key}=…)")
        if name in NUMBERS:
            least = 1 if name == "nodes" else 0
            if not value.isdigit() or int(value) < least:
                raise UserError(f"{where}: --slurm {key}={value}: a whole number, {least} or more")
            changes[name] = int(value)
        elif name in WORDS:
            changes[name] = value
        else:
            check_sbatch_key(key, f"{where}: --slurm {key}")
            extra[key] = value
    mine = dataclasses.replace(options, extra=extra, **changes)
    if mine.time is not None:
        try:
            minutes(mine.time)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    if "nodes" in changes and mine.nodes > 1 and line.argv[0] != "xd-train":
        raise UserError(f"{where}: nodes={mine.nodes}: only an xd-train job runs on several nodes")
    return mine


def job_gpus(options: SlurmOptions, program: str) -> int:
    """The GPUs a job of ``program`` asks for: ``xd-train`` all of ``--gpus-per-job``,
    ``xd-eval`` and ``xd-analyze`` (one device) at most one, the others (packing, synthesis,
    the report) none."""
    if program == "xd-train":
        return options.gpus_per_job
    if program in ("xd-eval", "xd-analyze"):
        return min(options.gpus_per_job, 1)
    return 0


def parameters(options: SlurmOptions, limit: str | None, program: str = "xd-train") -> dict:
    """submitit's parameters for a job of ``program`` with ``options``: one task per node
    (``torchrun`` starts the processes of the node's GPUs); ``limit``: the time limit when the
    options give none, the partition's own (submitit would ask for 5 minutes); None: no
    ``--time`` at all."""
    gpus = job_gpus(options, program)
    cpus = options.cpus_per_gpu * max(gpus, 1) if options.cpus_per_gpu else None
    limit = options.time or limit
    return {
        "nodes": options.nodes if program == "xd-train" else 1,
        "ntasks_per_node": 1,
        "gpus_per_node": gpus or None,
        "cpus_per_task": cpus,
        "partition": options.partition,
        "account": options.account,
        "qos": options.qos,
        "mem": options.mem,
        # no limit: no --time, and no time-limit signal (preemption sends SIGTERM)
        "time": minutes(limit) if limit else NO_LIMIT,
        "signal_delay_s": options.signal_delay_s,
        "stderr_to_stdout": True,
    }


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
                print(
                    f"{line.status.split(':')[0]}: line {line.number}: {line.command}", flush=True
                )
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
