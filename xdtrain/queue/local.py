"""The local executor: jobs run on this machine, one per slot (``--gpus 0,1,…``: one per GPU,
through ``CUDA_VISIBLE_DEVICES``), each after the jobs it waits for
(:mod:`xdtrain.queue.depends`).

A job found ``running: pid N`` when the queue starts was interrupted: its process group is
stopped if it outlived the queue, and it runs again, an ``xd-train`` job with ``--resume``.
A job whose wait ended in a failure is not started; it stays to do for the next run.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

from xdtrain.errors import UserError
from xdtrain.queue.jobsfile import (
    Line,
    alive,
    announce,
    check_programs,
    done_word,
    executable,
    jobs,
    resumed,
    writer,
)


def refuse_slurm_lines(path: Path, lines: list[Line]) -> None:
    for line in jobs(lines):
        if line.slurm_id or line.slurm_name:
            raise UserError(
                f"{path}: line {line.number} was given to Slurm ({line.status}); follow it with "
                "xd-queue --executor slurm, or scancel it and write open to run it here"
            )


def run_jobs(path: Path, lines: list[Line], waits: dict[int, set[int]], gpus, logs: Path) -> int:
    """Run the jobs of ``lines`` that are not finished; returns 1 if one failed, else 0."""
    refuse_slurm_lines(path, lines)
    save = writer(path)
    by_number = {line.number: line for line in jobs(lines)}
    todo = [line for line in jobs(lines) if not line.finished]
    word = done_word(lines)
    check_programs(path, lines)
    logs.mkdir(parents=True, exist_ok=True)
    slots = gpus or [None]
    running: dict[subprocess.Popen, tuple[Line, str | None]] = {}
    failed: set[int] = set()
    pending = list(todo)
    stuck: list[Line] = []  # they wait for a failed job

    def ready(line: Line) -> bool:
        return all(by_number[n].finished for n in waits.get(line.number, ()))

    def blocked(line: Line) -> bool:  # waits, now or through another job, for a failure
        seen, stack = set(), list(waits.get(line.number, ()))
        while stack:
            number = stack.pop()
            if number in failed:
                return True
            if number not in seen:
                seen.add(number)
                stack += waits.get(number, ())
        return False

    try:
        while True:
            stuck += [line for line in pending if blocked(line)]
            pending = [line for line in pending if line not in stuck]
            busy = {slot for _, slot in running.values()}
            free = [s for s in slots if s not in busy]
            for line in [line for line in pending if ready(line)][: len(free)]:
                pending.remove(line)
                proc = start(line, free.pop(0), logs)
                running[proc] = (line, proc.slot)
                line.status = f"running: pid {proc.pid}"
                save(lines)
                slot = f" (GPU {proc.slot})" if proc.slot else ""
                print(f"started: line {line.number}: {line.command}{slot}", flush=True)
            if not running:
                break
            for proc in [p for p in running if p.poll() is not None]:
                line, _ = running.pop(proc)
                if proc.returncode == 0:
                    line.status = word
                else:
                    line.status = f"failed: {log_path(logs, line)}"
                    failed.add(line.number)
                save(lines)
                announce(line)
            time.sleep(0.2)
    except KeyboardInterrupt:
        for proc in running:
            _signal_group(proc.pid, signal.SIGINT)
        for proc in running:
            proc.wait()
        raise  # statuses stay "running": the next xd-queue resumes them
    done = sum(1 for line in jobs(lines) if line.finished)
    total = len(jobs(lines))
    print(f"{path}: {done}/{total} done, {len(failed)} failed", end="")
    if stuck:
        numbers = ", ".join(str(line.number) for line in stuck)
        print(f"; not started, as they wait for a failed job: lines {numbers}", end="")
    print()
    return 1 if failed else 0


def log_path(logs: Path, line: Line) -> Path:
    return logs / f"job{line.number:04d}.log"


def start(line: Line, slot: str | None, logs: Path) -> subprocess.Popen:
    argv = list(line.argv)
    if line.pid is not None or line.status.startswith("failed"):
        stop_leftover(line)
        argv = resumed(argv)  # it was interrupted or failed: continue its run folder
    env = dict(os.environ)
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
    with open(log_path(logs, line), "ab") as fh:
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
    proc.slot = slot
    return proc


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop_leftover(line: Line, grace: float = 10.0) -> None:
    """Stop the process group of an interrupted job if it still runs (the queue was killed
    while it ran); only when that pid still runs the job's program."""
    pid = line.pid
    if pid is None or not alive(pid, line.argv[0]):
        return
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
