"""What a Slurm job asks for: the options of ``xd-queue --executor slurm``, a line's own
``--slurm KEY=VALUE`` settings, the checks on them, and submitit's parameters and executor."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from xdtrain.errors import UserError
from xdtrain.queue.jobsfile import Line


@dataclass
class SlurmOptions:
    """What every job of the file asks Slurm for (``xd-queue --executor slurm`` options)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_job: int = 0  # per node of an xd-train job; xd-eval/xd-analyze at most 1 (job_gpus)
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
