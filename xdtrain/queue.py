"""``xd-queue JOBS``: run an experiment grid one job after another, resumably.

The jobs file is CSV with a header ``command,status``, like the study's ``Jobs.csv``; lines
starting with ``#`` and blank lines are kept as they are. Only ``xd-*`` commands run, as
argument lists, never through a shell; every command is checked before the first one
starts. The file is rewritten atomically (temporary file, rename) whenever a status
changes, so neither Ctrl-C nor SIGKILL can leave it half written. Statuses: empty or
``open`` (to do), ``running: pid N`` (started; a job found running when the queue starts was
interrupted: its process group is stopped if it outlived the queue, and it runs again, an
``xd-train`` job with ``--resume``), ``done`` or ``completed`` (finished: never rerun),
``failed: <log>`` (runs again). The study's ``Jobs.csv`` says ``open``/``completed``; a file
that uses those words gets ``completed`` written back, any other ``done``. Any other status
stops the queue before a job starts: a misspelt word must not rerun a finished job.

``xd-queue grid …`` writes the configs and the jobs file of the study's grid.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import csv
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from xdtrain.errors import UserError, run_cli
from xdtrain.fileio import atomic_write

HEADER = "command,status"
TO_DO = ("", "open")
FINISHED = ("done", "completed")
SHELL = re.compile(r"[;&|`$<>(){}*?!~\\\n]")


@dataclass
class Line:
    text: str  # the line as read (comments, blanks)
    command: str | None = None
    status: str = ""
    argv: list[str] = field(default_factory=list)


def parse(path: Path) -> list[Line]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # spreadsheets write a byte-order mark
    except FileNotFoundError:
        raise UserError(
            f"{path}: no jobs file; write one (command,status) or use xd-queue grid"
        ) from None
    lines = text.splitlines()
    if not lines or lines[0].replace(" ", "").lower() != HEADER:
        raise UserError(f"{path}: line 1 must be the header {HEADER!r}")
    out = [Line(lines[0])]
    for number, raw in enumerate(lines[1:], start=2):
        if not raw.strip() or raw.lstrip().startswith("#"):
            out.append(Line(raw))
            continue
        try:
            (fields,) = list(csv.reader([raw]))
        except ValueError:
            raise UserError(f"{path}: line {number}: not a CSV row") from None
        if len(fields) not in (1, 2):
            raise UserError(f"{path}: line {number}: expected command,status; quote commas")
        command = fields[0].strip()
        status = fields[1].strip() if len(fields) == 2 else ""
        argv = check_command(command, path, number)
        out.append(Line(raw, command, check_status(status, path, number), argv))
    return out


def check_status(status: str, path: Path, number: int) -> str:
    """``status`` as the queue reads it (the words in lower case); refuses unknown words."""
    word = status.lower()
    if word in TO_DO or word in FINISHED:
        return word
    if re.fullmatch(r"running: pid \d+", word) or word.startswith("failed"):
        return status
    raise UserError(
        f"{path}: line {number}: unknown status {status!r}; write open (or leave it empty) to "
        "run the job, completed or done to skip it"
    )


def finished(line: Line) -> bool:
    return line.status in FINISHED


def done_word(lines: list[Line]) -> str:
    """``completed`` in a file that uses the study's words (open/completed), else ``done``."""
    used = {line.status for line in lines if line.command is not None}
    return "completed" if used & {"open", "completed"} else "done"


def check_command(command: str, path: Path, number: int) -> list[str]:
    """The argument list of ``command``; refuses anything but a plain ``xd-*`` command."""
    where = f"{path}: line {number}"
    if SHELL.search(command):
        raise UserError(
            f"{where}: shell syntax is not run ({command[:60]!r}); write a plain xd-* command"
        )
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None
    if not argv or not re.fullmatch(r"xd-[a-z]+", argv[0]):
        raise UserError(f"{where}: only xd-* commands run, not {argv[0] if argv else 'nothing'!r}")
    return argv


def render(lines: list[Line], newline: str = "\n") -> str:
    """The jobs file's text, each line ending in ``newline``."""
    out = []
    for line in lines:
        if line.command is None:
            out.append(line.text)
            continue
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="").writerow([line.command, line.status])
        out.append(buffer.getvalue())
    return newline.join(out) + newline


def writer(path: Path):
    """A function that writes ``lines`` back to ``path`` as it was written: with its
    byte-order mark and line endings (CRLF from Windows spreadsheets), atomically."""
    raw = path.read_bytes()
    mark = "\ufeff" if raw.startswith(codecs.BOM_UTF8) else ""
    newline = "\r\n" if b"\r\n" in raw else "\n"
    return lambda lines: atomic_write(path, mark + render(lines, newline))


def executable(name: str) -> str:
    """The ``xd-*`` program beside this Python, else on PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise UserError(f"{name}: not installed here; install xdtrain in this environment")
    return found


def run_jobs(path: Path, gpus: list[str] | None, logs: Path) -> int:
    lines = parse(path)
    save = writer(path)
    todo = [line for line in lines if line.command is not None and not finished(line)]
    word = done_word(lines)
    for line in todo:
        executable(line.argv[0])
    logs.mkdir(parents=True, exist_ok=True)
    slots = gpus or [None]
    running: dict[subprocess.Popen, tuple[Line, str | None]] = {}
    failed = 0
    pending = list(todo)
    try:
        while pending or running:
            free = [s for s in slots if s not in {slot for _, slot in running.values()}]
            while pending and free:
                line, slot = pending.pop(0), free.pop(0)
                argv = list(line.argv)
                if line.status.startswith("running"):
                    stop_leftover(line)
                    if argv[0] == "xd-train" and "--resume" not in argv:
                        argv.append("--resume")  # it was interrupted: continue its run folder
                number = lines.index(line)
                log = logs / f"job{number:04d}.log"
                env = dict(os.environ)
                if slot is not None:
                    env["CUDA_VISIBLE_DEVICES"] = slot
                with open(log, "ab") as fh:
                    fh.write(f"$ {shlex.join(argv)}\n".encode())
                    fh.flush()
                    proc = subprocess.Popen(
                        [executable(argv[0]), *argv[1:]],
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,  # its own process group, stopped as one
                        preexec_fn=_die_with_parent,
                    )
                line.status = f"running: pid {proc.pid}"
                save(lines)
                running[proc] = (line, slot)
                print(f"started: {line.command}" + (f" (GPU {slot})" if slot else ""), flush=True)
            for proc in [p for p in running if p.poll() is not None]:
                line, _ = running.pop(proc)
                number = lines.index(line)
                if proc.returncode == 0:
                    line.status = word
                else:
                    line.status = f"failed: {logs / f'job{number:04d}.log'}"
                    failed += 1
                save(lines)
                print(f"{line.status.split(':')[0]}: {line.command}", flush=True)
            time.sleep(0.2)
    except KeyboardInterrupt:
        for proc in running:
            _signal_group(proc.pid, signal.SIGINT)
        for proc in running:
            proc.wait()
        raise  # statuses stay "running": the next xd-queue resumes them
    done = sum(1 for line in lines if finished(line))
    total = sum(1 for line in lines if line.command is not None)
    print(f"{path}: {done}/{total} done, {failed} failed")
    return 1 if failed else 0


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop_leftover(line: Line, grace: float = 10.0) -> None:
    """Stop the process group of an interrupted job if it still runs (the queue was killed
    while it ran); only when that pid still runs the job's program."""
    match = re.fullmatch(r"running: pid (\d+)", line.status)
    if not match:
        return
    pid = int(match.group(1))
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return  # gone
    if line.argv[0] not in cmdline:
        return  # the pid was reused by another program
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)
    _signal_group(pid, signal.SIGKILL)
    time.sleep(0.2)


def _die_with_parent() -> None:
    """Linux: a job gets SIGTERM if the queue dies (even by SIGKILL), so a rerun never finds
    the interrupted job still running beside its replacement."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------- grid

PRETRAIN_PREFIX = "pt_simclr_"
TASK_PREFIX = "ft_"


def pretraining_sources(configs_root: Path) -> list[str]:
    """The SimCLR pretraining sources with a ``pt_simclr_<source>.yaml`` in ``configs_root``
    (imagenet, chestxray8, ct, or a user's own)."""
    return sorted(
        p.stem[len(PRETRAIN_PREFIX) :] for p in configs_root.glob(f"{PRETRAIN_PREFIX}*.yaml")
    )


def finetuning_tasks(configs_root: Path) -> list[str]:
    """The finetuning targets with a ``ft_<name>.yaml`` in ``configs_root``: the registry's
    tasks (imagenet, chestxray8, brats, lits) and data sets of one's own (``ct``: task
    ``classify`` on shards/ct)."""
    return sorted(p.stem[len(TASK_PREFIX) :] for p in configs_root.glob(f"{TASK_PREFIX}*.yaml"))


def grid(args) -> int:
    """Write the configs and jobs file of a pretraining × task × fraction × seed grid."""
    out = Path(args.out)
    configs_root = Path(args.configs)
    pretrains = [p.strip() for p in args.pretrain.split(",") if p.strip()]
    tasks = [t.strip() for t in (args.tasks or ",".join(finetuning_tasks(configs_root))).split(",")]
    tasks = [t for t in tasks if t]
    sources, targets = pretraining_sources(configs_root), finetuning_tasks(configs_root)
    for name in pretrains:
        if name != "none" and name not in sources:
            raise UserError(
                f"--pretrain: {name!r} is none or one of {sources} (the "
                f"{PRETRAIN_PREFIX}<name>.yaml files in {configs_root}/)"
            )
    for name in tasks:
        if name not in targets:
            raise UserError(
                f"--tasks: {name!r} is not one of {targets} (the {TASK_PREFIX}<name>.yaml files "
                f"in {configs_root}/)"
            )
    fractions = [float(f) for f in args.fractions.split(",")]
    (out / "configs").mkdir(parents=True, exist_ok=True)
    runs = out / "runs"
    jobs = [
        HEADER,
        f"# grid: pretrain {args.pretrain}; tasks {args.tasks}; seeds {args.seeds}; "
        f"fractions {args.fractions}; linear {args.linear}",
    ]

    def config(name: str, base: Path, overrides: dict) -> Path:
        lines = [f"_base_: {os.path.relpath(base.resolve(), (out / 'configs').resolve())}"]
        sections: dict[str, dict] = {}
        for key, value in overrides.items():
            section, _, leaf = key.partition(".")
            sections.setdefault(section, {})[leaf] = value
        for section, values in sections.items():
            lines.append(f"{section}:")
            lines += [f"  {k}: {v}" for k, v in values.items()]
        path = out / "configs" / f"{name}.yaml"
        atomic_write(path, "\n".join(lines) + "\n")
        return path

    encoders = {}
    for name in pretrains:
        if name == "none":
            continue
        path = config(
            f"pt_{name}",
            configs_root / f"{PRETRAIN_PREFIX}{name}.yaml",
            {"run.name": f"pt_{name}", "run.output_dir": str(runs)},
        )
        jobs.append(f"xd-train {path}")
        encoders[name] = runs / f"pt_{name}" / "encoder.pt"
    modes = ["full", "linear"] if args.linear else ["full"]
    for task in tasks:
        for fraction in fractions:
            for mode in modes:
                for pretrain in pretrains:
                    if pretrain == "none" and mode == "linear":
                        continue  # a frozen random encoder answers no question
                    for seed in range(args.seeds):
                        name = f"ft_{task}_{pretrain}_f{fraction:g}_{mode}_s{seed}"
                        overrides = {
                            "run.name": name,
                            "run.output_dir": str(runs),
                            "run.seed": seed,
                            "run.pretrain": "scratch"
                            if pretrain == "none"
                            else f"simclr-{pretrain}",
                            "data.fraction": fraction,
                            "model.frozen_encoder": str(mode == "linear").lower(),
                        }
                        if pretrain != "none":
                            overrides["model.encoder_weights"] = str(encoders[pretrain])
                        path = config(name, configs_root / f"ft_{task}.yaml", overrides)
                        jobs.append(f"xd-train {path}")
    atomic_write(out / "jobs.csv", "\n".join(jobs) + "\n")
    print(
        f"wrote {len(jobs) - 2} jobs to {out / 'jobs.csv'} and their configs to {out / 'configs'}/"
    )
    print(f"run them: xd-queue {out / 'jobs.csv'}; then: xd-report {runs}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["grid"]:
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
        return grid(parser.parse_args(argv[1:]))
    parser = argparse.ArgumentParser(
        prog="xd-queue", description="Run the xd-* commands of a jobs file, resumably."
    )
    parser.add_argument("jobs", help="CSV file: command,status")
    parser.add_argument("--gpus", help="e.g. 0,1,2,3: one job per GPU at a time")
    parser.add_argument("--logs", help="log folder (default: <jobs>.logs/)")
    args = parser.parse_args(argv)
    path = Path(args.jobs)
    gpus = [g.strip() for g in args.gpus.split(",")] if args.gpus else None
    logs = Path(args.logs) if args.logs else path.with_name(path.name + ".logs")
    return run_jobs(path, gpus, logs)


def entry() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
