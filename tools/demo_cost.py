#!/usr/bin/env python3
"""What the README's first command costs: ``make demo`` in a fresh clone; prints JSON.

The repository is cloned (``git clone``, committed files only) into ``--workdir``, and in
the clone ``make install`` then ``make demo`` run one after the other, each timed (wall, and
the user and system CPU of every process it started). Measured:

- ``install_s``, ``demo_s``, ``total_s``: wall seconds; ``total_s`` is what a new user waits;
- ``demo_written_bytes``: bytes the demo's processes sent to storage (``write_bytes`` of
  ``/proc/<pid>/io``, which the kernel accumulates over every child reaped), and
  ``demo_wchar_bytes``, every byte they passed to ``write()`` (pipes and terminals too);
  ``disk_written_bytes``: the machine's block devices' written sectors over the demo
  (``/proc/diskstats``; the whole machine, so meaningful on an idle one), 0 when the writes
  did not reach a block device yet (page cache) or the file system has none (tmpfs);
- ``outputs_bytes`` (what the demo leaves: data, shards, runs, report) per folder, and
  ``venv_bytes``: the environment ``make install`` built.

``--venv PATH`` links an existing environment into the clone instead of installing (the
demo alone): ``make`` is told the environment is up to date (``-o .venv/.installed``) and
the clone's package comes first on ``PYTHONPATH``, so the environment is never changed and
the clone's code is what runs. Example, on an idle machine::

    python tools/demo_cost.py --workdir /tmp/demo-cost
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = (
    "datasets",
    "shards",
    "checkpoints/demo",  # with the jobs file and its logs
    "report/demo",
)


def folder_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (links not followed, each file once)."""
    seen, total = set(), 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def disk_sectors() -> int:
    """Sectors written to whole block devices (not partitions), from ``/proc/diskstats``."""
    total = 0
    try:
        lines = Path("/proc/diskstats").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        fields = line.split()
        name = fields[2]
        if Path(f"/sys/block/{name}").exists() and not name.startswith(("loop", "ram")):
            total += int(fields[9])
    return total


def timed(command: list[str], cwd: Path, log: Path, env: dict | None = None) -> dict:
    """Run ``command`` through a shell that reports its ``/proc/self/io`` once the command
    (and so every process it started) has been reaped; wall seconds, CPU and I/O."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    sectors = disk_sectors()
    script = f'{" ".join(command)} > "{log}" 2>&1; rc=$?; sync; cat /proc/$$/io; exit $rc'
    start = time.perf_counter()
    done = subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    io = dict(line.split(": ") for line in done.stdout.splitlines() if ": " in line)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed (exit {done.returncode}); see {log}")
    return {
        "wall_s": round(wall, 1),
        "user_s": round(after.ru_utime - before.ru_utime, 1),
        "system_s": round(after.ru_stime - before.ru_stime, 1),
        # write_bytes less the bytes of files deleted before they reached the disk
        "written_bytes": int(io.get("write_bytes", 0)) - int(io.get("cancelled_write_bytes", 0)),
        "wchar_bytes": int(io.get("wchar", 0)),
        "disk_written_bytes": (disk_sectors() - sectors) * 512,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="the clone (replaced)")
    parser.add_argument("--venv", type=Path, help="link this environment, skip the install")
    args = parser.parse_args()
    clone = args.workdir.resolve()
    load = os.getloadavg()[0]  # an idle machine reads near 0
    if clone.exists():
        shutil.rmtree(clone)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    result: dict = {"commit": subprocess.check_output(
        ["git", "-C", str(clone), "rev-parse", "--short", "HEAD"], text=True
    ).strip()}  # fmt: skip
    demo_command, env = ["make", "demo"], None
    if args.venv:
        (clone / ".venv").symlink_to(args.venv.resolve())
        install = {"wall_s": 0.0, "user_s": 0.0, "system_s": 0.0, "skipped": str(args.venv)}
        demo_command = ["make", "-o", ".venv/.installed", "demo"]
        env = dict(os.environ, PYTHONPATH=str(clone))
    else:
        install = timed(["make", "install"], clone, clone.parent / f"{clone.name}-install.log")
    demo = timed(demo_command, clone, clone.parent / f"{clone.name}-demo.log", env)
    outputs = {name: folder_bytes(clone / name) for name in OUTPUTS}
    result |= {
        "install_s": install["wall_s"],
        "demo_s": demo["wall_s"],
        "total_s": round(install["wall_s"] + demo["wall_s"], 1),
        "install_cpu_s": round(install["user_s"] + install["system_s"], 1),
        "demo_cpu_s": round(demo["user_s"] + demo["system_s"], 1),
        "demo_written_bytes": demo["written_bytes"],
        "demo_wchar_bytes": demo["wchar_bytes"],
        "disk_written_bytes": demo["disk_written_bytes"],
        "outputs_bytes": outputs,
        "outputs_total_bytes": sum(outputs.values()),
        "checkpoint_bytes": {
            kind: sum(p.stat().st_size for p in (clone / "checkpoints/demo").rglob(kind))
            for kind in ("last.pt", "final.pt", "best.pt", "encoder.pt")
        },
        "venv_bytes": None if args.venv else folder_bytes(clone / ".venv"),
        "cpus": os.cpu_count(),
        "load_before": round(load, 2),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
