"""A single-node Slurm cluster in a folder, for the tests of ``xd-queue --executor slurm`` and
for trying it out: ``munged``, ``slurmctld`` and ``slurmd`` from Debian's ``munge`` and
``slurm-wlm`` packages, started without systemd from a generated ``slurm.conf``.

    python tools/slurm_local.py start /tmp/slurm   # prints export SLURM_CONF=…/slurm.conf
    python tools/slurm_local.py stop /tmp/slurm

Needs root (``slurmd`` starts jobs as their user). Job completions are logged with
``jobcomp/filetxt`` (``sacct -c`` reads them): there is no accounting database.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sacct", "scontrol")


class Unavailable(RuntimeError):
    """Slurm cannot start here; the message says why."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _memory_mb() -> int:
    for row in Path("/proc/meminfo").read_text().splitlines():
        if row.startswith("MemTotal:"):
            return int(row.split()[1]) // 1024 // 2  # half of it: room for the tests themselves
    return 1024


def config(root: Path, cpus: int) -> str:
    host = socket.gethostname().split(".")[0]
    ctl, node = _free_port(), _free_port()
    run = root / "run"
    return f"""\
ClusterName=xdlocal
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctl}
SlurmdPort={node}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={run}/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile={run}/slurmctld.pid
SlurmdPidFile={run}/slurmd.pid
SlurmdSpoolDir={root}/spool
StateSaveLocation={root}/state
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=3600
KillWait=20
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def start(root: Path, timeout: float = 90.0) -> dict[str, str]:
    """Start the cluster in ``root``; returns the environment its commands need
    (``SLURM_CONF``). Raises :class:`Unavailable` with the reason."""
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing:
        raise Unavailable(
            f"Slurm is not installed here (no {', '.join(missing)}); apt-get install slurm-wlm "
            "munge"
        )
    if os.geteuid() != 0:
        raise Unavailable("a local slurmd needs root")
    root = root.resolve()
    for sub in ("run", "spool", "state", "log", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(config(root, os.cpu_count() or 1))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    run = root / "run"
    munged = [
        "munged",
        "--force",
        f"--socket={run}/munge.socket",
        f"--key-file={key}",
        f"--log-file={root}/log/munged.log",
        f"--pid-file={run}/munged.pid",
        f"--seed-file={root}/munge/seed",
    ]
    for argv in (munged, ["slurmctld", "-c", "-i"], ["slurmd"]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip().splitlines()
            stop(root)
            raise Unavailable(f"{argv[0]} did not start: {said[-1] if said else done.returncode}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
        if state.stdout.strip() in ("idle", "mixed", "allocated"):
            return {"SLURM_CONF": str(conf)}
        time.sleep(0.5)
    logs = root / "log"
    stop(root)
    raise Unavailable(f"the node did not come up in {timeout:.0f} s; see {logs}")


def stop(root: Path) -> None:
    """Stop the cluster's daemons and every job step they left."""
    root = root.resolve()
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
    subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True)
    pids = []
    for name in ("slurmd", "slurmctld", "munged"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((root / "run" / f"{name}.pid").read_text().split()[0])
            if name in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                pids.append(pid)  # still that daemon, not a reused pid
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.2)
    for pid in pids:  # a daemon that waits for a job step that never ends (a stopped process)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if args.action == "stop":
        stop(args.folder)
        return 0
    try:
        env = start(args.folder)
    except Unavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"export SLURM_CONF={env['SLURM_CONF']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
