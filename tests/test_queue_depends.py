"""xd-queue without Slurm: which job waits for which, the local executor honouring it, the
reconcile with Slurm's answers (fake squeue/sacct output), and the job command on a node."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT

from xdtrain.errors import UserError
from xdtrain.queue import main as queue_main
from xdtrain.queue import parse
from xdtrain.queue.accounting import Accounting
from xdtrain.queue.depends import dependencies, order
from xdtrain.queue.jobsfile import writer
from xdtrain.queue.slurm import History, plan, reconcile
from xdtrain.queue.slurm_job import XdJob, launch
from xdtrain.queue.slurm_options import (
    NO_LIMIT,
    SlurmOptions,
    line_options,
    minutes,
    parameters,
)


def _write(path: Path, *commands: str, statuses: tuple[str, ...] = ()) -> Path:
    rows = [f"{c},{statuses[i] if i < len(statuses) else ''}" for i, c in enumerate(commands)]
    path.write_text("command,status\n" + "\n".join(rows) + "\n")
    return path


def test_grid_finetunings_wait_for_the_pretraining_whose_encoder_they_read(tmp_path):
    """The jobs file xd-queue grid writes: each finetuning from an encoder waits for the
    SimCLR line that writes it, scratch runs for nothing, and any order of the lines works."""
    out = tmp_path / "grid"
    argv = ["grid", "--pretrain", "none,imagenet,ct", "--tasks", "lits", "--seeds", "2"]
    assert queue_main([*argv, "--configs", str(ROOT / "configs"), "--out", str(out)]) == 0
    text = (out / "jobs.csv").read_text().splitlines()
    # the pretrainings last: the order must come from what the lines read, not the file
    jobs = [t for t in text[2:] if t.startswith("xd-train")]
    reordered = _write(tmp_path / "jobs.csv", *[j.rstrip(",") for j in jobs[2:] + jobs[:2]])
    lines = parse(reordered)
    waits = dependencies(reordered, lines, tmp_path)
    by_name = {Path(line.argv[1]).stem: line.number for line in lines if line.command}
    for name, number in by_name.items():
        if name.startswith("ft_lits_none"):
            assert waits[number] == set(), name
        elif name.startswith("ft_lits_imagenet"):
            assert waits[number] == {by_name["pt_imagenet"]}, name
        elif name.startswith("ft_lits_ct"):
            assert waits[number] == {by_name["pt_ct"]}, name
    ranked = order(waits)
    for number, wanted in waits.items():
        assert all(ranked.index(w) < ranked.index(number) for w in wanted)


def test_after_names_a_line_or_a_run_and_cycles_are_refused(tmp_path):
    base = str(ROOT / "configs" / "demo" / "ft_lits.yaml")
    jobs = _write(
        tmp_path / "jobs.csv",
        f"xd-train {base} --run-dir runs/a",
        f"xd-train {base} --run-dir runs/b --after 2",
        f"xd-train {base} --run-dir runs/c --after b",
        "xd-report runs --out report",
        f"xd-synth lits --out data --after={tmp_path / 'runs' / 'a'}",
    )
    lines = parse(jobs)
    assert lines[2].argv[-2:] == ["--run-dir", "runs/b"]  # --after is the queue's, not xd-train's
    waits = dependencies(jobs, lines, tmp_path)
    # xd-report reads runs/: it waits for every run written inside it
    assert waits == {2: set(), 3: {2}, 4: {3}, 5: {2, 3, 4}, 6: {2}}
    with pytest.raises(UserError, match="line 3: --after 9: line 9 holds no job"):
        bad = _write(
            tmp_path / "bad.csv", f"xd-train {base} --run-dir a", f"xd-train {base} --after 9"
        )
        dependencies(bad, parse(bad), tmp_path)
    with pytest.raises(UserError, match="--after nothing: no xd-train line writes a run named so"):
        bad = _write(tmp_path / "bad.csv", f"xd-train {base} --after nothing")
        dependencies(bad, parse(bad), tmp_path)
    loop = _write(
        tmp_path / "loop.csv",
        f"xd-train {base} --run-dir x --set model.encoder_weights=y/encoder.pt",
        f"xd-train {base} --run-dir y --set model.encoder_weights=x/encoder.pt",
    )
    with pytest.raises(UserError, match=r"lines 2 → 3 → 2 wait for each other"):
        dependencies(loop, parse(loop), tmp_path)


def test_local_slots_start_no_job_before_the_one_whose_output_it_reads(tmp_path, monkeypatch):
    """Three slots, the consumer first in the file: it waits for its producer (xd-shard reads
    what xd-synth writes), and a consumer of a failed producer is not started."""
    monkeypatch.chdir(tmp_path)
    jobs = _write(
        tmp_path / "jobs.csv",
        "xd-shard --dataset lits --src data/lits --out shards/lits --quiet",
        "xd-synth lits --out data --count 1 --quiet",
        "xd-synth imagenet --out elsewhere --count 1 --quiet",
    )
    assert queue_main([str(jobs), "--gpus", "a,b,c"]) == 0
    assert [line.status for line in parse(jobs) if line.command] == ["done"] * 3
    assert (tmp_path / "shards" / "lits" / "manifest.json").is_file()
    log = (tmp_path / "jobs.csv.logs" / "job0002.log").read_text()
    assert "skipped" not in log and log.count("$ xd-shard") == 1  # ran once, on the data
    # a producer that fails: its consumer stays to do
    chain = _write(
        tmp_path / "chain.csv",
        "xd-shard --dataset lits --src data2/lits --out shards/lits2 --quiet",
        "xd-shard --dataset lits --src gone/lits --out data2 --quiet",
    )
    assert queue_main([str(chain), "--gpus", "a,b,c"]) == 1
    first, second = [line.status for line in parse(chain) if line.command]
    assert first == "" and second.startswith("failed: ")


def _fake_programs(tmp_path: Path, monkeypatch) -> Path:
    """Every xd-* program of a jobs file is a shell script that records when it ran and the
    OMP_NUM_THREADS it was given in ``<tmp_path>/trace/<its first argument>``, then exits
    with its second argument after printing a last line."""
    script = tmp_path / "fake-xd"
    trace = tmp_path / "trace"
    trace.mkdir()
    script.write_text(
        "#!/bin/sh\n"
        f'out="{trace}/$1"\n'
        'echo "start $(date +%s.%N) threads ${OMP_NUM_THREADS:-unset}" > "$out"\n'
        "sleep 1\n"
        'echo "end $(date +%s.%N)" >> "$out"\n'
        'echo "error: $1 went wrong; rerun it"\n'
        'exit "$2"\n'
    )
    script.chmod(0o755)
    monkeypatch.setattr("xdtrain.queue.jobsfile.executable", lambda name: str(script))
    monkeypatch.setattr("xdtrain.queue.local.executable", lambda name: str(script))
    return trace


def _ran(trace: Path, name: str) -> tuple[float, float, str]:
    first, second = (trace / name).read_text().split("\n")[:2]
    return float(first.split()[1]), float(second.split()[1]), first.split()[3]


def test_local_cpu_slots_run_jobs_side_by_side_with_a_share_of_the_cores(
    tmp_path, monkeypatch, capsys
):
    """--jobs 2: two jobs at once, each with half the cores as OMP_NUM_THREADS (two PyTorch
    processes of all the cores each make both several times slower); one slot sets
    nothing; the user's OMP_NUM_THREADS is kept; a failure names its log and last line."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("xdtrain.queue.local.cpu_cores", lambda: 4)
    trace = _fake_programs(tmp_path, monkeypatch)
    pair = _write(tmp_path / "pair.csv", "xd-synth a 0", "xd-synth b 0", "xd-synth c 0")
    assert queue_main([str(pair), "--jobs", "2"]) == 0
    (a0, a1, a_threads), (b0, b1, b_threads) = _ran(trace, "a"), _ran(trace, "b")
    c0, _, _ = _ran(trace, "c")
    assert a_threads == b_threads == _ran(trace, "c")[2] == "2"  # 4 cores, 2 slots
    assert a0 < b1 and b0 < a1  # side by side
    assert c0 >= min(a1, b1)  # the third waited for a free slot
    out = capsys.readouterr().out
    assert "up to 2 jobs at once, 2 CPU thread(s) each (OMP_NUM_THREADS)" in out
    assert re.search(r"\d\d:\d\d:\d\d done: line 2 after 0:00:0[12]: xd-synth a 0", out)

    many = _write(tmp_path / "many.csv", "xd-synth m 0", "xd-synth n 0")
    assert queue_main([str(many), "--jobs", "1000000000000"]) == 0  # as many slots as jobs
    assert _ran(trace, "m")[2] == _ran(trace, "n")[2] == "2"  # 4 cores, 2 jobs
    assert "up to 2 jobs at once, 2 CPU thread(s) each" in capsys.readouterr().out

    one = _write(tmp_path / "one.csv", "xd-synth d 0", "xd-synth e 0")
    assert queue_main([str(one)]) == 0
    (_, d1, d_threads), (e0, _, _) = _ran(trace, "d"), _ran(trace, "e")
    assert d_threads == "unset" and e0 >= d1  # one at a time, PyTorch chooses its threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    failing = _write(tmp_path / "failing.csv", "xd-synth f 3", "xd-synth g 0")
    assert queue_main([str(failing), "--jobs", "2"]) == 1
    assert _ran(trace, "f")[2] == _ran(trace, "g")[2] == "3"
    out = capsys.readouterr().out
    log = tmp_path / "failing.csv.logs" / "job0002.log"
    assert f"failed: line 2 after 0:00:01: xd-synth f 3\n  its log: {log}; it ends: " in out
    assert "it ends: error: f went wrong; rerun it" in out
    assert [line.status for line in parse(failing) if line.command] == [f"failed: {log}", "done"]


def test_threads_per_job_shares_the_cores(monkeypatch):
    from xdtrain.queue.local import threads_per_job

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads_per_job(2, cores=2) == 1
    assert threads_per_job(3, cores=16) == 5
    assert threads_per_job(8, cores=2) == 1  # never 0
    assert threads_per_job(1, cores=16) is None  # one job: as PyTorch chooses
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # empty: not a choice
    assert threads_per_job(2, cores=4) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_per_job(2, cores=4) is None


def test_cpu_cores_follow_the_affinity_and_a_containers_quota(tmp_path):
    from xdtrain.queue.local import cpu_cores

    mask = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")  # no limit
    assert cpu_cores(quota) == mask
    quota.write_text("150000 100000\n")  # docker --cpus 1.5
    assert cpu_cores(quota) == min(mask, 2)
    quota.write_text("50000 100000\n")
    assert cpu_cores(quota) == 1
    assert cpu_cores(tmp_path / "absent") == mask


def test_gpus_are_counted_from_the_drivers_list(tmp_path):
    from xdtrain.queue.local import gpus_present

    assert gpus_present(tmp_path / "no-driver") == 0
    for bus in ("0000:17:00.0", "0000:65:00.0"):
        (tmp_path / bus).mkdir()
    assert gpus_present(tmp_path) == 2


def test_a_failures_last_line_is_plain_short_and_says_when_there_was_none(tmp_path, capsys):
    """The line after a failure: the log's last line without terminal control sequences,
    at most 200 characters; ``(no output)`` for a job that wrote nothing; a Slurm job's
    ``(lost)`` mark and a log folder with a parenthesis in its name kept apart."""
    from xdtrain.queue.jobsfile import Line, announce

    logs = tmp_path / "logs (run 2)"
    logs.mkdir()
    log = logs / "job0002.log"
    cases = [
        (b"$ xd-quiet\n", "it ends: (no output)"),
        (
            b"$ xd-x\nstep 1\n\x1b[2J\x1b]0;title\x07error: \x1b[31mred\x1b[0m\x00 thing\n\n",
            "it ends: error: red thing\n",
        ),
        (b"$ xd-x\n" + b"a" * 10_000 + b"\n", "it ends: " + "a" * 199 + "…\n"),
    ]
    for content, expected in cases:
        log.write_bytes(content)
        for status in (f"failed: {log}", f"failed: {log} (lost)"):
            announce(Line(text="", command="xd-x", status=status, number=2), 3.0)
            out = capsys.readouterr().out
            assert "failed: line 2 after 0:00:03: xd-x\n" in out
            assert f"  its log: {status[len('failed: ') :]}; {expected}" in out
            assert "\x1b" not in out and "\x00" not in out


class FakeSlurm:
    """squeue and sacct answers from fixed tables, as a cluster would print them."""

    def __init__(self, queued: list[str], accounted: list[str], squeue_rc: int = 0):
        self.queued, self.accounted, self.squeue_rc = queued, accounted, squeue_rc
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess:
        self.calls.append(argv)
        if argv[0] == "squeue":
            text = "\n".join(self.queued) + "\n"
            err = "slurm_load_jobs error: Unable to contact slurm controller"
            return subprocess.CompletedProcess(argv, self.squeue_rc, text, err)
        if argv[0] == "sacct":
            text = "JobID|State|Elapsed|JobName\n" + "\n".join(self.accounted) + "\n"
            return subprocess.CompletedProcess(argv, 0, text, "")
        if argv[0] == "scancel":
            return subprocess.CompletedProcess(argv, 0, "", "")
        raise AssertionError(argv)


def test_reconcile_reads_slurm_states_and_resubmits_only_ended_jobs(tmp_path):
    folder = tmp_path / "slurm"
    folder.mkdir()
    with open(folder / "16_0_result.pkl", "wb") as fh:  # a job Slurm forgot, that succeeded
        pickle.dump(("success", 0), fh)
    commands = [f"xd-synth lits --out d{n} --count 1" for n in range(9)]
    statuses = (
        "submitted: slurm 11",  # running
        "submitted: slurm 12",  # completed (squeue still has it)
        "submitted: slurm 13",  # failed
        "submitted: slurm 14",  # only sacct knows it: timed out
        "submitted: slurm 16",  # nobody knows it; its result file says success
        "submitted: slurm 17",  # nobody knows it, no result: lost
        "submitting: slurm xd-synth.00aa11bb",  # killed after sbatch: squeue has it as job 18
        "submitting: slurm xd-synth.ffee0011 again",  # killed before sbatch, a retry
        "submitted: slurm 19",  # pending on a dependency that failed
    )
    jobs = _write(tmp_path / "jobs.csv", *commands, statuses=statuses)
    lines = parse(jobs)
    fake = FakeSlurm(
        [
            "11|RUNNING|1:02|a.1|None",
            "12|COMPLETED|3:00|a.2|None",
            "13|FAILED|0:05|a.3|NonZeroExitCode",
            "18|PENDING|0:00|xd-synth.00aa11bb|Priority",
            "19|PENDING|0:00|a.9|DependencyNeverSatisfied",
        ],
        ["14|TIMEOUT|2:00:00|a.4"],
    )
    history = History(folder / "history.json")
    seen, again = reconcile(lines, folder, Accounting(fake), history)
    got = [line.status for line in lines if line.command]
    assert got[:3] == ["submitted: slurm 11", "done", f"failed: {folder / '13_0_log.out'}"]
    assert got[3] == f"failed: {folder / '14_0_log.out'}"
    assert got[4] == "done"
    assert got[5] == f"failed: {folder / '17_0_log.out'} (lost)"
    assert got[6] == "submitted: slurm 18"  # adopted by its name: not submitted twice
    assert got[7] == ""  # never reached Slurm: submitted now, resumed as it was a retry
    assert got[8] == f"failed: {folder / '19_0_log.out'}"
    assert ["scancel", "19"] in fake.calls  # it would never run; cancelled before a resubmit
    assert again == {4, 5, 7, 9, 10}  # 13, 14, 17, the retry, 19: again with --resume
    assert seen[2].state == "RUNNING" and seen[5].state == "TIMEOUT"


def test_no_answer_from_slurm_changes_nothing(tmp_path):
    jobs = _write(
        tmp_path / "jobs.csv", "xd-synth lits --out d --count 1", statuses=("submitted: slurm 5",)
    )
    before = jobs.read_text()
    fake = FakeSlurm([], [], squeue_rc=1)
    with pytest.raises(
        UserError, match="squeue failed .*Unable to contact slurm controller.*nothing"
    ):
        reconcile(parse(jobs), tmp_path, Accounting(fake), History(tmp_path / "h.json"))
    assert jobs.read_text() == before


def test_time_limits_and_the_command_each_node_runs():
    assert [minutes(t) for t in ("90", "1:30", "02:00:00", "1-00", "1-02:30", "0-00:00:30")] == [
        90,
        2,
        120,
        1440,
        1590,
        1,
    ]
    with pytest.raises(UserError, match="--time 'soon'"):
        minutes("soon")
    train = ["xd-train", "cfg.yaml", "--set", "run.seed=1"]
    env = {"SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_NODEID": "1", "SLURM_JOB_ID": "123456"}
    command = launch(train, nodes=2, procs=4, env=env)
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert "--nnodes=2" in command and "--node-rank=1" in command
    assert "--master-addr=gpu03" in command and "--nproc-per-node=4" in command
    assert f"--master-port={15000 + 123456 % 20000}" in command
    assert command[command.index("-m", 3) :] == ["-m", "xdtrain.train", *train[1:]]
    single = launch(train, nodes=1, procs=2, env={})
    assert "--standalone" in single and "--nnodes=2" not in single
    assert Path(launch(train, 1, 1, {})[0]).name == "xd-train"
    assert Path(launch(["xd-eval", "run"], 2, 4, env)[0]).name == "xd-eval"  # one process
    # a requeued job continues its run folder; --force would start it over
    job = XdJob(["xd-train", "cfg.yaml", "--force"], "/tmp")
    assert job.command({})[-1] == "--force"
    assert job.command({"SLURM_RESTART_COUNT": "1"})[-2:] == ["cfg.yaml", "--resume"]
    assert XdJob(train, "/tmp", requeued=True).command({})[-1] == "--resume"


def test_a_line_asks_slurm_for_its_own_resources(tmp_path):
    """``--slurm KEY=VALUE`` on a line (what xd-queue grid --pretrain-slurm writes on the
    SimCLR lines) replaces the queue's option for that job only; other keys go to sbatch."""
    out = tmp_path / "grid"
    argv = ["grid", "--pretrain", "none,imagenet", "--tasks", "lits", "--seeds", "1"]
    argv += ["--pretrain-slurm", "gpus-per-job=8", "--pretrain-slurm", "time=3-00:00:00"]
    argv += ["--pretrain-slurm", "constraint=a100"]
    assert queue_main([*argv, "--configs", str(ROOT / "configs"), "--out", str(out)]) == 0
    pretrain, scratch, finetune = [line for line in parse(out / "jobs.csv") if line.command]
    assert pretrain.slurm == {"gpus-per-job": "8", "time": "3-00:00:00", "constraint": "a100"}
    assert "--slurm" not in pretrain.argv and finetune.slurm == {}
    base = SlurmOptions(gpus_per_job=1, cpus_per_gpu=4, time="12:00:00", extra={"qos": "x"})
    mine = parameters(line_options(base, pretrain, out), None)
    assert mine["gpus_per_node"] == 8 and mine["cpus_per_task"] == 32
    assert mine["time"] == 3 * 24 * 60
    assert line_options(base, pretrain, out).extra == {"qos": "x", "constraint": "a100"}
    theirs = parameters(line_options(base, finetune, out), None)
    assert theirs["gpus_per_node"] == 1 and theirs["time"] == 12 * 60
    assert parameters(SlurmOptions(), None)["time"] == NO_LIMIT  # no limit: no --time sent
    assert parameters(SlurmOptions(), "2:00:00")["time"] == 120  # the partition's own
    bad = _write(tmp_path / "bad.csv", "xd-synth lits --out d --slurm nodes=two")
    with pytest.raises(UserError, match="line 2: --slurm nodes=two: a whole number, 1 or more"):
        line_options(base, parse(bad)[1], bad)
    with pytest.raises(UserError, match="--pretrain-slurm 'time=1 day'"):
        queue_main([*argv, "--pretrain-slurm", "time=1 day", "--out", str(out)])


def test_default_folders_and_equals_options_are_followed(tmp_path):
    """xd-synth and xd-shard write their default folders; --opt=VALUE reads VALUE; xd-eval
    writes its scores into the run, so a report after it waits for it."""
    base = str(ROOT / "configs" / "demo" / "ft_lits.yaml")
    jobs = _write(
        tmp_path / "jobs.csv",
        "xd-synth all --out datasets --count 1",  # 2: writes datasets/
        "xd-shard --dataset lits --src datasets/lits",  # 3: writes shards/lits
        f"xd-train {base}",  # 4: reads shards/lits, writes checkpoints/demo/ft_lits
        "xd-eval checkpoints/demo/ft_lits",  # 5
        "xd-report checkpoints/demo --out report/demo",  # 6
        "xd-shard --dataset=brats --src=datasets/brats --out=shards/b",  # 7
        "xd-eval checkpoints/demo/ft_lits --split val --shards=shards/b",  # 8
        "xd-shard verify shards/lits",  # 9
    )
    waits = dependencies(jobs, parse(jobs), tmp_path)
    assert waits == {2: set(), 3: {2}, 4: {3}, 5: {4}, 6: {4, 5}, 7: {2}, 8: {4, 5, 7}, 9: {3}}


def test_statuses_typed_by_hand_are_read_in_their_own_form(tmp_path):
    jobs = _write(
        tmp_path / "jobs.csv",
        *[f"xd-synth lits --out d{n}" for n in range(4)],
        statuses=(
            "Submitted: Slurm 12",
            "SUBMITTING: slurm lits.ab12 Again",
            "Running: PID 7",
            "FAILED: x",
        ),
    )
    lines = [line for line in parse(jobs) if line.command]
    assert [line.status for line in lines] == [
        "submitted: slurm 12",
        "submitting: slurm lits.ab12 again",
        "running: pid 7",
        "failed: x",
    ]
    assert lines[0].slurm_id == "12" and lines[1].slurm_name == "lits.ab12" and lines[2].pid == 7


def test_a_file_edited_while_the_queue_runs_keeps_the_edits(tmp_path):
    """The queue writes its statuses onto the file as it is now: lines added meanwhile stay."""
    jobs = _write(tmp_path / "jobs.csv", "xd-synth lits --out a", "xd-synth lits --out b")
    lines = parse(jobs)
    save = writer(jobs)
    jobs.write_text(jobs.read_text().replace("command,status\n", "command,status\n# mine\n"))
    with jobs.open("a") as fh:
        fh.write("xd-synth lits --out c,\n")
    lines[1].status = "done"
    save(lines)
    lines[2].status = "running: pid 5"
    save(lines)
    assert jobs.read_text().splitlines() == [
        "command,status",
        "# mine",
        "xd-synth lits --out a,done",
        "xd-synth lits --out b,running: pid 5",
        "xd-synth lits --out c,",
    ]


def test_options_are_checked_before_anything_runs_or_is_submitted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jobs = _write(tmp_path / "jobs.csv", "xd-synth lits --out a --count 1 --quiet")
    before = jobs.read_text()
    cases = [
        (["--partition", "gpu"], "--partition: options of the Slurm executor; add --executor"),
        (["--no-wait", "--gpus-per-job", "1"], "--gpus-per-job, --no-wait: options of the Slurm"),
        (["--executor", "slurm", "--time", "soon"], "--time 'soon'"),
        (["--executor", "slurm", "--poll", "0"], "--poll is more than 0"),
        (["--executor", "slurm", "--slurm-arg", "gres=gpu:8"], "--gres is set by xd-queue"),
        (["--executor", "slurm", "--slurm-arg", "array=0-3"], "--array is set by xd-queue"),
        (["--executor", "slurm", "--jobs", "2"], "--gpus and --jobs are for the local executor"),
        (["--jobs", "0"], "--jobs 0: a number of jobs at once, 1 or more"),
        (["--jobs", "-1"], "--jobs -1: a number of jobs at once, 1 or more"),
        (["--jobs", "2", "--gpus", "0,1"], "with --gpus the queue runs one job per GPU"),
    ]
    for extra, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            queue_main([str(jobs), *extra])
    with pytest.raises(SystemExit):  # a line's --slurm is not an abbreviation of --slurm-arg
        queue_main([str(jobs), "--executor", "slurm", "--slurm", "time=5"])
    assert jobs.read_text() == before and not (tmp_path / "a").exists()
    typo = _write(tmp_path / "typo.csv", "xd-synht lits --out a")
    with pytest.raises(UserError, match="typo.csv: line 2: xd-synht: no such xd-\\* program"):
        queue_main([str(typo)])


def test_each_line_asks_only_for_what_its_program_uses(tmp_path):
    jobs = _write(
        tmp_path / "jobs.csv",
        f"xd-train {ROOT / 'configs/demo/ft_lits.yaml'}",
        "xd-eval runs/x --slurm hold",
        "xd-shard --dataset lits",
        "xd-synth lits --slurm nodes=2",
        "xd-synth lits --slurm time=1:2:3:4",
        "xd-synth lits --slurm ntasks=4",
        "xd-synth lits --slurm time=1",
    )
    train, evaluate, pack, nodes, bad_time, tasks, short = [
        line for line in parse(jobs) if line.command
    ]
    options = SlurmOptions(gpus_per_job=8, nodes=2, cpus_per_gpu=4)
    assert parameters(line_options(options, train, jobs), None, "xd-train")["gpus_per_node"] == 8
    mine = line_options(options, evaluate, jobs)
    assert mine.extra == {"hold": True}
    assert parameters(mine, None, "xd-eval")["gpus_per_node"] == 1
    assert parameters(mine, None, "xd-eval")["nodes"] == 1
    packing = parameters(line_options(options, pack, jobs), None, "xd-shard")
    assert (
        packing["gpus_per_node"] is None and packing["nodes"] == 1 and packing["cpus_per_task"] == 4
    )
    for line, message in [
        (nodes, "line 5: nodes=2: only an xd-train job runs on several nodes"),
        (bad_time, "line 6: --time '1:2:3:4'"),
        (tasks, "line 7: --slurm ntasks: --ntasks is set by xd-queue"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            line_options(SlurmOptions(), line, jobs)
    with pytest.raises(UserError, match="line 8: a time limit of 1 min is no longer than"):
        plan(jobs, [short], SlurmOptions(), Accounting(FakeSlurm([], [])))


def test_grid_rows_quote_commas_and_spaces(tmp_path):
    out = tmp_path / "my grid"
    argv = ["grid", "--pretrain", "none,imagenet", "--tasks", "lits", "--seeds", "1"]
    argv += ["--pretrain-slurm", "exclude=node1,node2", "--configs", str(ROOT / "configs")]
    assert queue_main([*argv, "--out", str(out)]) == 0
    lines = [line for line in parse(out / "jobs.csv") if line.command]
    assert lines[0].slurm == {"exclude": "node1,node2"} and lines[0].status == ""
    assert all(Path(line.argv[1]).is_file() for line in lines)  # the space survived


def test_a_cluster_without_accounting_falls_back_to_the_result_files(tmp_path):
    """No slurmdbd and no job completion log: sacct and sacct -c both fail; a job gone from
    squeue is done if its submitit result says so, else submitted again."""

    def runner(argv):
        if argv[0] == "squeue":
            return subprocess.CompletedProcess(argv, 0, "", "")
        if "-c" in argv:
            return subprocess.CompletedProcess(argv, 1, "", "JobCompType is none")
        return subprocess.CompletedProcess(argv, 1, "", "Slurm accounting storage is disabled")

    folder = tmp_path / "slurm"
    folder.mkdir()
    with open(folder / "21_0_result.pkl", "wb") as fh:
        pickle.dump(("success", 0), fh)
    jobs = _write(
        tmp_path / "jobs.csv",
        "xd-synth lits --out a",
        "xd-synth lits --out b",
        statuses=("submitted: slurm 21", "submitted: slurm 22"),
    )
    lines = parse(jobs)
    _, again = reconcile(lines, folder, Accounting(runner), History(folder / "h.json"))
    assert [line.status for line in lines if line.command] == [
        "done",
        f"failed: {folder / '22_0_log.out'} (lost)",
    ]
    assert again == {3}


def test_a_line_with_seeds_writes_one_run_per_seed_and_xd_eval_touches_each(tmp_path):
    base = str(ROOT / "configs" / "demo" / "ft_lits.yaml")
    weights = "--set model.encoder_weights=runs/pre_s1/encoder.pt"
    jobs = _write(
        tmp_path / "jobs.csv",
        f"xd-train {base} --run-dir runs/pre --seeds 0 1",
        f"xd-train {base} --run-dir runs/ft {weights}",
        f"xd-train {base} --run-dir runs/other --after pre_s0",
        "xd-eval runs/ft runs/pre_s0 --split test",
        "xd-report runs/pre_s0 --out report",
    )
    waits = dependencies(jobs, parse(jobs), tmp_path)
    # line 3 reads pre_s1's encoder, line 4 names pre_s0, xd-report waits for what xd-eval
    # writes into the runs it reads
    assert waits == {2: set(), 3: {2}, 4: {2}, 5: {2, 3}, 6: {2, 5}}
    with pytest.raises(UserError, match="--after pre: no xd-train line writes a run named so"):
        bad = _write(tmp_path / "bad.csv", *[f"xd-train {base} --run-dir runs/pre --seeds 0 1",
                                             f"xd-train {base} --after pre"])  # fmt: skip
        dependencies(bad, parse(bad), tmp_path)
