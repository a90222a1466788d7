#!/usr/bin/env python3
"""Cost of ``xd-queue --executor slurm`` on a large jobs file; prints JSON.

The jobs file is the study's grid written by ``xd-queue grid`` (3 pretrainings x every task x
4 fractions x full/linear x seeds, enough seeds for ``--lines``). Measured:

- ``read_s``: reading the file and deriving which job waits for which (every ``xd-train``
  line's config resolved);
- ``reconcile_fake_s``: reconciling every line, ``submitted: slurm N``, with Slurm's answers
  given as fixed ``squeue`` (empty) and ``sacct`` (every job COMPLETED) output: no cluster;
- with ``--submit`` (a running Slurm, ``SLURM_CONF`` set, e.g. from ``tools/slurm_local.py``):
  ``submit_s``, ``xd-queue --no-wait`` submitting every line as a held job (``--slurm-arg
  hold``, each finetuning ``afterok`` its pretraining), and ``reconcile_s``, the rerun that
  finds them all in ``squeue`` and submits nothing; the jobs are cancelled after.

Example::

    python tools/slurm_local.py start /tmp/slurm && export SLURM_CONF=/tmp/slurm/slurm.conf
    python tools/bench_queue.py --lines 1000 --submit
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_grid(out: Path, lines: int) -> Path:
    from xdtrain.queue.cli import main
    from xdtrain.queue.grid import finetuning_tasks
    from xdtrain.queue.jobsfile import jobs, parse

    tasks = len(finetuning_tasks(ROOT / "configs"))
    per_seed = tasks * 4 * 5  # fractions x (scratch + 2 pretrainings x full/linear)
    seeds = max(1, -(-(lines - 2) // per_seed))
    argv = ["grid", "--pretrain", "none,imagenet,chestxray8", "--fractions", "1.0,0.5,0.1,0.01"]
    argv += ["--linear", "--seeds", str(seeds), "--configs", str(ROOT / "configs")]
    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        try:
            main([*argv, "--out", str(out)])
        finally:
            sys.stdout = stdout
    path = out / "jobs.csv"
    text = path.read_text().splitlines()
    keep = 2 + len(jobs(parse(path))[:lines]) if lines else len(text)
    path.write_text("\n".join(text[:keep]) + "\n")
    return path


def fake_runner(ids: list[str]):
    def run(argv):
        if argv[0] == "squeue":
            return subprocess.CompletedProcess(argv, 0, "", "")
        rows = "".join(f"{i}|COMPLETED|00:10:00|job{i}\n" for i in ids)
        return subprocess.CompletedProcess(argv, 0, "JobID|State|Elapsed|JobName\n" + rows, "")

    return run


def bench(args) -> dict:
    from xdtrain.queue.accounting import Accounting
    from xdtrain.queue.depends import dependencies, order
    from xdtrain.queue.jobsfile import jobs, parse
    from xdtrain.queue.slurm import History, reconcile

    out: dict = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = write_grid(Path(tmp) / "grid", args.lines)
        start = time.perf_counter()
        lines = parse(path)
        waits = dependencies(path, lines, Path.cwd())
        order(waits)
        out["read_s"] = round(time.perf_counter() - start, 3)
        out["lines"] = len(jobs(lines))
        out["waiting_lines"] = sum(1 for w in waits.values() if w)
        ids = [str(1000 + n) for n in range(len(jobs(lines)))]
        for line, job in zip(jobs(lines), ids, strict=True):
            line.status = f"submitted: slurm {job}"
        folder = Path(tmp) / "slurm"
        folder.mkdir()
        start = time.perf_counter()
        reconcile(lines, folder, Accounting(fake_runner(ids)), History(folder / "h.json"))
        out["reconcile_fake_s"] = round(time.perf_counter() - start, 3)
        assert all(line.finished for line in jobs(lines))
        if args.submit:
            out.update(submit(path))
    return out


def submit(path: Path) -> dict:
    queue = [sys.executable, "-m", "xdtrain.queue.cli", str(path), "--executor", "slurm"]
    queue += ["--no-wait", "--slurm-arg", "hold"]
    out = {}
    try:
        for key in ("submit_s", "reconcile_s"):
            start = time.perf_counter()
            done = subprocess.run(queue, capture_output=True, text=True)
            out[key] = round(time.perf_counter() - start, 3)
            if done.returncode != 0:
                raise SystemExit(done.stdout + done.stderr)
            if key == "reconcile_s" and "submitted:" in done.stdout:
                raise SystemExit("the rerun submitted jobs again")
    finally:
        history = json.loads(
            (path.with_name(path.name + ".logs") / "slurm/history.json").read_text()
        )
        ids = [i for known in history.values() for i in known]
        out["jobs_submitted"] = len(ids)
        for first in range(0, len(ids), 200):
            subprocess.run(["scancel", *ids[first : first + 200]], capture_output=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1000, help="jobs in the file")
    parser.add_argument("--submit", action="store_true", help="submit to the Slurm of SLURM_CONF")
    parser.add_argument("--tmp", default=None, help="folder for the temporary jobs file")
    args = parser.parse_args(argv)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    result = {"machine": machine, **bench(args)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
