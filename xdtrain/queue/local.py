"""The local executor: jobs run on this machine, one per slot, each after the jobs it waits for
(:mod:`xdtrain.queue.depends`). Slots are the GPUs (``--gpus 0,1,…``: one job per GPU, through
``CUDA_VISIBLE_DEVICES``) or, on a machine without GPUs, ``--jobs N`` jobs at once on the CPU.
With more than one slot each job gets an equal share of the CPU cores as its thread count
(``OMP_NUM_THREADS``, which PyTorch's intra-op pool, OpenMP and BLAS follow), as torchrun does
for its workers: two PyTorch processes that each take every core make both several times slower,
not twice. An ``OMP_NUM_THREADS`` set by the user is left as it is.

A job found ``running: pid N`` when the queue starts was interrupted: its process group is
stopped if it outlived the queue, and it runs again, an ``xd-train`` job with ``--resume``.
A job whose wait ended in a failure is not started; it stays to do for the next run.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

from xdtrain.errors import UserError
from xdtrain.progress import stamp
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


CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one folder per GPU the driver sees


def cpu_cores(cpu_max: Path = CPU_MAX) -> int:
    """The CPU cores this process may use: its affinity mask (as Slurm or taskset set it),
    and no more than its cgroup's CPU quota (a container's ``--cpus``), rounded up."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def threads_per_job(slots: int, cores: int | None = None) -> int | None:
    """``OMP_NUM_THREADS`` for each of ``slots`` jobs at once: ⌊cores / slots⌋, at least 1;
    None for a single slot (the job takes the machine, PyTorch chooses) or when the user set
    ``OMP_NUM_THREADS`` (to anything but an empty value)."""
    if slots <= 1 or os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    return max(1, (cpu_cores() if cores is None else cores) // slots)


def gpus_present(folder: Path = NVIDIA_GPUS) -> int:
    """How many NVIDIA GPUs the driver lists on this machine (0 without the driver)."""
    try:
        return sum(1 for _ in folder.iterdir())
    except OSError:
        return 0


def run_jobs(
    path: Path,
    lines: list[Line],
    waits: dict[int, set[int]],
    gpus: list[str] | None,
    logs: Path,
    cpu_jobs: int = 1,
) -> int:
    """Run the jobs of ``lines`` that are not finished, one per GPU of ``gpus`` at a time, or
    ``cpu_jobs`` at a time without GPUs; returns 1 if one failed, else 0."""
    refuse_slurm_lines(path, lines)
    save = writer(path)
    by_number = {line.number: line for line in jobs(lines)}
    todo = [line for line in jobs(lines) if not line.finished]
    word = done_word(lines)
    check_programs(path, lines)
    logs.mkdir(parents=True, exist_ok=True)
    # no more CPU slots than jobs to run: their threads share the cores among those
    slots: list[str | None] = list(gpus) if gpus else [None] * max(1, min(cpu_jobs, len(todo)))
    threads = threads_per_job(len(slots))
    if len(slots) > 1:
        share = f", {threads} CPU thread(s) each (OMP_NUM_THREADS)" if threads else ""
        print(f"{path}: up to {len(slots)} jobs at once{share}; their logs: {logs}/", flush=True)
        present = 0 if gpus else gpus_present()
        if present:
            print(
                f"{path}: this machine has {present} GPU(s) and every job sees all of "
                "them; --gpus 0,1,… runs one job per GPU",
                flush=True,
            )
    running: dict[subprocess.Popen, tuple[Line, int]] = {}
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
            busy = {index for _, index in running.values()}
            free = [i for i in range(len(slots)) if i not in busy]
            for line in [line for line in pending if ready(line)][: len(free)]:
                pending.remove(line)
                index = free.pop(0)
                proc = start(line, slots[index], logs, threads)
                running[proc] = (line, index)
                line.status = f"running: pid {proc.pid}"
                save(lines)
                slot = f" (GPU {slots[index]})" if slots[index] is not None else ""
                print(f"{stamp()} started: line {line.number}{slot}: {line.command}", flush=True)
            if not running:
                break
            for proc in [p for p in running if p.poll() is not None]:
                line, _ = running.pop(proc)
                took = time.monotonic() - proc.started
                if proc.returncode == 0:
                    line.status = word
                else:
                    line.status = f"failed: {log_path(logs, line)}"
                    failed.add(line.number)
                save(lines)
                announce(line, took)
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


def start(line: Line, gpu: str | None, logs: Path, threads: int | None = None) -> subprocess.Popen:
    """Start the job of ``line`` on ``gpu`` (None: no GPU chosen) with ``threads`` CPU threads
    (None: as inherited), its output appended to its log."""
    argv = list(line.argv)
    if line.pid is not None or line.status.startswith("failed"):
        stop_leftover(line)
        argv = resumed(argv)  # it was interrupted or failed: continue its run folder
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
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
    proc.started = time.monotonic()
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
