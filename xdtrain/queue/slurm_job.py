"""What runs on a Slurm node for one jobs-file line (pickled by submitit): the command,
``torchrun`` on every node for a multi-node or multi-GPU ``xd-train``, and the checkpoint
hook submitit calls on the time-limit signal (:class:`XdJob`)."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time

from xdtrain.errors import UserError
from xdtrain.queue.jobsfile import executable, resumed


def launch(argv: list[str], nodes: int, procs: int, env: dict[str, str]) -> list[str]:
    """The command one node of a job runs: the ``xd-*`` program, or for an ``xd-train`` job
    with ``nodes × procs`` > 1, ``torchrun`` with one process per GPU of the node. Node rank
    ``SLURM_NODEID``; the rendezvous at the job's first node (``SLURM_JOB_NODELIST``) on a port
    derived from ``SLURM_JOB_ID``, so two jobs sharing a node do not collide."""
    program = executable(argv[0])  # beside this Python, else on PATH, as the queue checked
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
