"""xd-queue --executor slurm against a real single-node Slurm (the ``slurm`` fixture:
munged, slurmctld and slurmd started from tools/slurm_local.py): a grid whose finetunings
wait for their encoders, a job requeued mid-epoch that ends with the weights of a run never
stopped, and a queue killed while it submits that submits nothing twice when rerun."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import torch
from helpers import demo_args

from xdtrain.queue import parse
from xdtrain.queue.slurm_options import NO_LIMIT
from xdtrain.runlog import read_metrics
from xdtrain.synth import generate

BIN = Path(sys.executable).parent


def _train(config: str, shards: Path, run: Path, *settings: str) -> str:
    argv = demo_args(config, shards, run, "data.batch_size=4", *settings)
    return " ".join(["xd-train", *argv])


def _jobs(path: Path, commands: list[str]) -> Path:
    path.write_text("command,status\n" + "".join(f"{c},\n" for c in commands))
    return path


def _env() -> dict[str, str]:
    """The environment (the cluster's SLURM_CONF) with one thread per job: two jobs share the
    two cores of a small machine."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _queue(jobs: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    argv = [str(BIN / "xd-queue"), str(jobs), "--executor", "slurm", "--poll", "1", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_env())


def _slurm(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def _times(ids: list[str]) -> dict[str, tuple[str, str]]:
    """Start and end time (ISO, to the second) of each job, from Slurm."""
    out = {}
    for row in _slurm("squeue", "-h", "-t", "all", "-o", "%i|%S|%e").splitlines():
        job, start, end = row.split("|")
        if job in ids:
            out[job] = (start, end)
    return out


def _history(jobs: Path) -> dict[str, list[str]]:
    return json.loads((jobs.with_name(jobs.name + ".logs") / "slurm" / "history.json").read_text())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pid_of(run: Path) -> int | None:
    found = subprocess.run(
        ["pgrep", "-f", "--", f"--run-dir {run} "], capture_output=True, text=True
    )
    pids = [int(p) for p in found.stdout.split()]
    return pids[0] if pids else None


@pytest.fixture(scope="module")
def grid_on_slurm(slurm, packed, tmp_path_factory):
    """One jobs file, followed by one ``xd-queue --executor slurm`` on the two cores:

    - a grid of 2 SimCLR runs and 4 finetunings from their encoders, the finetunings first in
      the file;
    - the same deterministic finetuning twice (6 steps an epoch, 2 epochs): ``whole`` runs
      through, ``requeued`` gets ``scontrol requeue`` in the middle of its second epoch (held
      with SIGSTOP while Slurm is asked, so that the signal lands mid-epoch).

    Returns the folder, the jobs file, the commands by name and the requeued job's id."""
    root = tmp_path_factory.mktemp("grid_on_slurm")
    runs = root / "runs"
    once = ("train.epochs=2", "train.deterministic=true", "train.log_every=1")
    once += ("data.batch_size=2",)  # six steps an epoch: room to stop in the middle of one
    commands = {
        name: _train("ft_lits.yaml", packed["lits"], runs / name, *once)
        for name in ("whole", "requeued")
    }
    for source in ("pt_s0", "pt_s1"):
        for seed in (0, 1):
            commands[f"ft_{source}_{seed}"] = _train(
                "ft_lits.yaml",
                packed["lits"],
                runs / f"ft_{source}_{seed}",
                "train.epochs=1",
                f"run.seed={seed}",
                f"model.encoder_weights={runs / source / 'encoder.pt'}",
            )
    for seed, source in enumerate(("pt_s0", "pt_s1")):
        commands[source] = _train(
            "pt_simclr_imagenet.yaml", packed["imagenet"], runs / source, "train.epochs=1"
        )
        # what a SimCLR line asks Slurm for by itself (xd-queue grid --pretrain-slurm)
        commands[source] += f" --set run.seed={seed} --slurm time=20 --slurm comment=simclr"
    jobs = _jobs(root / "jobs.csv", list(commands.values()))
    queue = subprocess.Popen(
        [str(BIN / "xd-queue"), str(jobs), "--executor", "slurm", "--poll", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )
    requeued, job = runs / "requeued", None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (requeued / "final.pt").exists():
        job = job or parse(jobs)[2].slurm_id
        train = [r for r in read_metrics(requeued / "metrics.jsonl") if r["kind"] == "train"]
        pid = _pid_of(requeued)
        if job and pid and any(r["epoch"] == 2 for r in train):
            os.kill(pid, signal.SIGSTOP)  # held mid-epoch while Slurm is asked to requeue
            steps = max(r["step"] for r in train)
            per_epoch = max(r["step"] for r in train if r["epoch"] == 1)
            if steps < 2 * per_epoch - 2:
                _slurm("scontrol", "requeue", job)
                os.kill(pid, signal.SIGCONT)  # Slurm's SIGTERM is handled now
                break
            os.kill(pid, signal.SIGCONT)
        time.sleep(0.05)
    else:
        queue.kill()
        pytest.fail("the job was not caught in its second epoch")
    # a requeued job is eligible again after Slurm's requeue delay (2 min): released now
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if _slurm("squeue", "-h", "-j", job, "-o", "%T").strip() == "PENDING":
            _slurm("scontrol", "update", f"JobId={job}", "StartTime=now")
            break
        time.sleep(0.2)
    output, _ = queue.communicate(timeout=300)
    print(output)
    assert queue.returncode == 0, output
    return root, jobs, commands, job


def test_grid_on_slurm_runs_each_finetuning_after_its_encoder(grid_on_slurm):
    """Slurm starts no finetuning before its encoder's job ended, and each read the final
    encoder of its own SimCLR run; a line's --slurm reaches its job script only."""
    root, jobs, commands, _ = grid_on_slurm
    runs = root / "runs"
    assert [line.status for line in parse(jobs) if line.command] == ["done"] * 8
    ids = {name: _history(jobs)[command] for name, command in commands.items()}
    assert all(len(v) == 1 for v in ids.values()), ids  # one Slurm job per line
    ids = {name: v[0] for name, v in ids.items()}
    times = _times(list(ids.values()))
    status = subprocess.run([str(BIN / "xd-queue"), "status", str(jobs)], capture_output=True)
    print(status.stdout.decode())
    for name in [n for n in commands if n.startswith("ft_")]:
        source = name.rsplit("_", 1)[0][3:]
        started, ended = times[ids[name]][0], times[ids[source]][1]
        assert started >= ended, (name, started, source, ended)
        env = json.loads((runs / name / "env.json").read_text())
        assert env["encoder"]["sha256"] == _sha256(runs / source / "encoder.pt")
        assert (runs / name / "final.pt").is_file()
    assert _sha256(runs / "pt_s0" / "encoder.pt") != _sha256(runs / "pt_s1" / "encoder.pt")
    folder = root / "jobs.csv.logs" / "slurm"
    script = (folder / f"{ids['pt_s0']}_submission.sh").read_text()
    assert "#SBATCH --time=20\n" in script and "#SBATCH --comment=simclr\n" in script
    assert "#SBATCH --requeue\n" in script and "#SBATCH --signal=USR2@120\n" in script
    script = (folder / f"{ids['ft_pt_s0_0']}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{ids['pt_s0']}\n" in script
    assert "--time" not in script and "--comment" not in script


def test_requeued_mid_epoch_resumes_from_its_checkpoint_with_the_same_weights(grid_on_slurm):
    """After ``scontrol requeue`` in its second epoch, xd-train wrote its checkpoint on Slurm's
    SIGTERM, the job ran again (the same job id) with --resume, and ended bit for bit where
    the same job never interrupted ends (deterministic mode)."""
    root, jobs, commands, job = grid_on_slurm
    runs = root / "runs"
    log = (root / "jobs.csv.logs" / "slurm" / f"{job}_0_log.out").read_text()
    print(log)
    stopped = [line for line in log.splitlines() if line.startswith("stopped: SIGTERM")]
    assert len(stopped) == 1 and "epoch 2 step" in stopped[0], log
    assert log.count("$ ") == 2 and "--resume" in log.split("$ ")[2].splitlines()[0]
    assert _history(jobs)[commands["requeued"]] == [job]  # requeued, not submitted again
    a = torch.load(runs / "whole" / "final.pt", weights_only=True)["model"]
    b = torch.load(runs / "requeued" / "final.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    train = [r for r in read_metrics(runs / "requeued" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, len(train) + 1))  # each step once


def test_a_killed_queue_submits_nothing_twice(slurm, tmp_path):
    """xd-queue SIGKILLed after sbatch returned but before it wrote the job ids: the rerun
    finds those jobs by name, and a rerun after the end submits nothing."""
    out = tmp_path / "out"
    commands = [f"xd-synth lits --out {out / str(n)} --count 1 --quiet" for n in range(6)]
    jobs = _jobs(tmp_path / "jobs.csv", commands)
    folder = tmp_path / "jobs.csv.logs" / "slurm"
    queue = subprocess.Popen(
        [str(BIN / "xd-queue"), str(jobs), "--executor", "slurm", "--poll", "1"],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        submitted = len(list(folder.glob("*_submitted.pkl")))
        recorded = sum(1 for line in parse(jobs) if line.slurm_id)
        if submitted >= 2 and recorded < submitted:
            queue.kill()
            break
        time.sleep(0.01)
    queue.wait()
    assert queue.returncode == -signal.SIGKILL, "the queue finished before it could be killed"
    assert any(line.slurm_name for line in parse(jobs))  # names, no ids: the window
    done = _queue(jobs)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [line.status for line in parse(jobs) if line.command] == ["done"] * 6
    assert len(list(folder.glob("*_submitted.pkl"))) == 6
    assert all(len(ids) == 1 for ids in _history(jobs).values())
    again = _queue(jobs)
    assert again.returncode == 0 and "submitted:" not in again.stdout
    assert len(list(folder.glob("*_submitted.pkl"))) == 6
    assert all((out / str(n) / "lits").is_dir() for n in range(6))
    # no time limit was asked for: sbatch got no --time, submitit a number for its bookkeeping
    pickled = next(folder.glob("*_submitted.pkl"))
    assert (
        "--time" not in pickled.with_name(pickled.name.split("_")[0] + "_submission.sh").read_text()
    )
    with open(pickled, "rb") as fh:
        assert cloudpickle.load(fh)._timeout_min == NO_LIMIT


def test_a_failed_job_and_the_job_waiting_for_it_run_again_on_the_next_run(slurm, tmp_path):
    """A job that fails is marked with its log; the job waiting for it is cancelled by Slurm
    (never started) and marked failed; the next run submits both again, in order."""
    raw, shards = tmp_path / "raw", tmp_path / "shards"
    jobs = _jobs(
        tmp_path / "jobs.csv",
        [
            f"xd-shard verify {shards}",
            f"xd-shard --dataset lits --src {raw / 'lits'} --out {shards} --quiet",
        ],
    )
    done = _queue(jobs)
    assert done.returncode == 1
    verify, pack = [line for line in parse(jobs) if line.command]
    log = Path(pack.status.removeprefix("failed: ")).read_text()
    assert "source folder not found" in log
    assert verify.status.startswith("failed: ")
    assert not Path(verify.status.removeprefix("failed: ")).exists()  # it never ran
    generate("lits", raw, size="small", seed=0, count=1)
    again = _queue(jobs)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [line.status for line in parse(jobs) if line.command] == ["done", "done"]
    assert all(len(ids) == 2 for ids in _history(jobs).values())


def test_a_job_sbatch_refuses_stops_the_queue_at_its_line(slurm, tmp_path):
    """An unknown partition on line 3: line 2 is submitted, the queue stops there in one
    line naming line 3 and sbatch's reason, and line 3 keeps its status."""
    out = tmp_path / "out"
    jobs = _jobs(
        tmp_path / "jobs.csv",
        [
            f"xd-synth lits --out {out} --count 1 --quiet",
            f"xd-synth imagenet --out {out} --count 1 --quiet --slurm partition=nope",
        ],
    )
    done = _queue(jobs, "--no-wait")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "line 3: sbatch refused the job" in done.stderr and "partition" in done.stderr.lower()
    first, second = [line for line in parse(jobs) if line.command]
    assert first.slurm_id and second.status == ""
