"""``xd-queue``: run the ``xd-*`` commands of a jobs file resumably, on this machine or on
Slurm; ``xd-queue status`` shows where each line is; ``xd-queue grid`` writes the study's grid."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xdtrain.errors import UserError, run_cli
from xdtrain.queue import depends
from xdtrain.queue.grid import grid
from xdtrain.queue.jobsfile import locked, parse
from xdtrain.queue.local import run_jobs
from xdtrain.queue.slurm import submit_jobs
from xdtrain.queue.slurm_options import SlurmOptions, check_sbatch_key, minutes
from xdtrain.queue.status import show, table


def _grid_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xd-queue grid", description=grid.__doc__)
    parser.add_argument(
        "--pretrain",
        default="none,imagenet,chestxray8",
        help="comma-separated: none and the sources of the configs' pt_simclr_<source>.yaml "
        "(imagenet, chestxray8, ct, …)",
    )
    parser.add_argument(
        "--tasks",
        default=None,
        help="comma-separated targets of the configs' ft_<task>.yaml (default: all of "
        "them: brats, chestxray8, ct, imagenet, lits, …)",
    )
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--fractions", default="1.0", help="e.g. 1.0,0.5,0.1,0.01")
    parser.add_argument("--linear", action="store_true", help="add linear-evaluation runs")
    parser.add_argument("--configs", default="configs", help="folder of the base configs")
    parser.add_argument("--out", default="grid", help="where configs, jobs.csv and runs go")
    parser.add_argument(
        "--pretrain-slurm",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="what each SimCLR job asks Slurm for, in place of xd-queue's option of that name "
        "(e.g. gpus-per-job=8, time=3-00:00:00; repeatable)",
    )
    return parser


def _queue_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xd-queue",
        allow_abbrev=False,  # --slurm (a line's option) must not pass for --slurm-arg
        description="Run the xd-* commands of a jobs file, resumably: here (one job per GPU, "
        "or --jobs N at once on the CPU) or on Slurm (one Slurm job per line). Jobs wait for "
        "the jobs whose outputs they read. Also: xd-queue status JOBS, xd-queue grid …",
    )
    parser.add_argument("jobs", help="CSV file: command,status")
    parser.add_argument("--executor", choices=["local", "slurm"], default="local")
    parser.add_argument("--logs", help="log folder (default: <jobs>.logs/)")
    local = parser.add_argument_group("local executor")
    local.add_argument("--gpus", help="e.g. 0,1,2,3: one job per GPU at a time")
    local.add_argument(
        "--jobs",
        dest="cpu_jobs",  # "jobs" is the jobs file
        type=int,
        default=None,
        metavar="N",
        help="without GPUs: N jobs at once on the CPU (default 1). With more than one slot "
        "(jobs or GPUs) each job gets an equal share of the cores as its threads "
        "(OMP_NUM_THREADS), unless OMP_NUM_THREADS is set",
    )
    slurm = parser.add_argument_group("slurm executor (sbatch options of every job)")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument(
        "--gpus-per-job",
        type=int,
        default=None,
        help="GPUs per node of an xd-train job; xd-eval and xd-analyze get at most 1, other "
        "programs none (default 0)",
    )
    slurm.add_argument(
        "--nodes",
        type=int,
        default=None,
        help="nodes per xd-train job (default 1): torchrun on each",
    )
    slurm.add_argument(
        "--cpus-per-gpu", type=int, help="CPUs per GPU (per job, for a job without GPUs)"
    )
    slurm.add_argument("--mem", help="memory per node, e.g. 64G")
    slurm.add_argument("--time", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    slurm.add_argument(
        "--slurm-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other sbatch option, e.g. constraint=a100 (repeatable)",
    )
    slurm.add_argument(
        "--signal-delay",
        type=int,
        default=None,
        metavar="S",
        help="seconds before the time limit that a job is told to checkpoint (default 120)",
    )
    slurm.add_argument(
        "--poll", type=float, default=None, metavar="S", help="seconds between looks at Slurm"
    )
    slurm.add_argument(
        "--no-wait",
        action="store_true",
        help="submit and return; rerun (or xd-queue status) to follow the jobs",
    )
    return parser


SLURM_ONLY = (
    "partition",
    "account",
    "qos",
    "gpus_per_job",
    "nodes",
    "cpus_per_gpu",
    "mem",
    "time",
    "slurm_arg",
    "signal_delay",
    "poll",
    "no_wait",
)


def slurm_options(args) -> SlurmOptions:
    """The Slurm options given, the defaults (``--signal-delay 120``, ``--poll 30``) filled
    in; refuses values sbatch or the queue cannot use."""
    args.signal_delay = 120 if args.signal_delay is None else args.signal_delay
    args.poll = 30.0 if args.poll is None else args.poll
    args.nodes = 1 if args.nodes is None else args.nodes
    args.gpus_per_job = 0 if args.gpus_per_job is None else args.gpus_per_job
    extra = {}
    for item in args.slurm_arg:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key or (sep and not value):
            raise UserError(f"--slurm-arg {item!r}: write KEY=VALUE, e.g. constraint=a100")
        check_sbatch_key(key, f"--slurm-arg {item}")
        extra[key] = value if sep else True
    if args.nodes < 1 or args.gpus_per_job < 0:
        raise UserError("--nodes is 1 or more and --gpus-per-job 0 or more")
    if args.time is not None:
        minutes(args.time)  # refuses a format sbatch would not take
    if args.poll <= 0 or args.signal_delay < 0:
        raise UserError("--poll is more than 0 seconds and --signal-delay 0 or more")
    return SlurmOptions(
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        gpus_per_job=args.gpus_per_job,
        nodes=args.nodes,
        cpus_per_gpu=args.cpus_per_gpu,
        mem=args.mem,
        time=args.time,
        extra=extra,
        signal_delay_s=args.signal_delay,
        poll_s=args.poll,
        wait=not args.no_wait,
    )


def logs_of(path: Path, given: str | None) -> Path:
    return Path(given) if given else path.with_name(path.name + ".logs")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["grid"]:
        return grid(_grid_parser().parse_args(argv[1:]))
    if argv[:1] == ["status"]:
        parser = argparse.ArgumentParser(prog="xd-queue status", description=__doc__)
        parser.add_argument("jobs", help="CSV file: command,status")
        parser.add_argument("--logs", help="log folder (default: <jobs>.logs/)")
        args = parser.parse_args(argv[1:])
        path = Path(args.jobs)
        print(show(table(parse(path), logs_of(path, args.logs))))
        return 0
    args = _queue_parser().parse_args(argv)
    path = Path(args.jobs)
    logs = logs_of(path, args.logs)
    if args.executor == "slurm" and (args.gpus or args.cpu_jobs is not None):
        raise UserError(
            "--gpus and --jobs are for the local executor; on Slurm give --gpus-per-job "
            "(each line is a Slurm job, run as the cluster's resources allow)"
        )
    if args.cpu_jobs is not None and args.cpu_jobs < 1:
        raise UserError(f"--jobs {args.cpu_jobs}: a number of jobs at once, 1 or more")
    if args.cpu_jobs is not None and args.gpus:
        raise UserError(
            "--jobs is for a machine without GPUs; with --gpus the queue runs one job per GPU"
        )
    given = [name for name in SLURM_ONLY if getattr(args, name) not in (None, False, [])]
    if args.executor == "local" and given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise UserError(
            f"{flags}: options of the Slurm executor; add --executor slurm (the local executor "
            "runs the jobs on this machine)"
        )
    options = slurm_options(args) if args.executor == "slurm" else None
    lines = parse(path)
    waits = depends.dependencies(path, lines, Path.cwd())
    with locked(path):
        lines = parse(path)  # as it is now that this queue holds it
        if options is not None:
            return submit_jobs(path, lines, depends.order(waits), waits, options, logs)
        gpus = [g.strip() for g in args.gpus.split(",")] if args.gpus else None
        return run_jobs(path, lines, waits, gpus, logs, args.cpu_jobs or 1)


def entry() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
