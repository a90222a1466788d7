"""``make demo``'s jobs file: the commands the Makefile writes, the order xd-queue infers from
their paths (each job after what it reads, the analysis beside the scoring), and a rerun that
keeps the statuses (what resumes the demo) unless the commands changed. The Makefile's recipe
runs for real, with a stand-in ``xd-queue`` that only records how it was called."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT

from xdtrain.queue import parse
from xdtrain.queue.depends import dependencies

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _make_demo(tmp_path: Path, *variables: str, check: bool = True):
    """``make demo`` with ``BIN`` a folder whose ``xd-queue`` records its arguments and
    writes the report's ``results.md`` as the real jobs would; returns the jobs file the
    recipe wrote (or, with ``check=False``, the finished process)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "xd-queue"
    report = tmp_path / "report"
    stand_in.write_text(
        f'#!/bin/sh\necho "$@" >> "{tmp_path}/queue-calls"\n'
        f'[ -e "{tmp_path}/skip-report" ] || '
        f'{{ mkdir -p "{report}"; touch "{report}/results.md"; }}\n'
    )
    stand_in.chmod(0o755)
    jobs = tmp_path / "demo-jobs.csv"
    done = subprocess.run(
        ["make", "-s", "-o", ".venv/.installed", "demo", f"BIN={bin_dir}", f"DEMO_JOBS={jobs}",
         f"REPORT={report}", *variables],
        cwd=ROOT, check=check, capture_output=True, text=True,
    )  # fmt: skip
    assert not jobs.with_name(jobs.name + ".new").exists()
    return jobs if check else done


def _names(lines) -> dict[str, int]:
    """Line numbers by what the line makes: ``synth NAME``, ``shard OUT``, a run name, or the
    program (xd-eval, xd-analyze, xd-report)."""
    number = {}
    for line in lines:
        argv = line.argv
        if argv[0] == "xd-synth":
            number["synth " + argv[1]] = line.number
        elif argv[0] == "xd-shard" and argv[1] != "verify":
            number["shard " + argv[argv.index("--out") + 1]] = line.number
        elif argv[0] == "xd-train":
            sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
            run = [v.split("=", 1)[1] for v in sets if v.startswith("run.name=")]
            number[run[0] if run else Path(argv[1]).stem] = line.number
        else:
            number[argv[0]] = line.number
    return number


def test_demo_jobs_wait_for_what_they_read_and_score_beside_the_analysis(tmp_path):
    jobs = _make_demo(tmp_path)
    assert (tmp_path / "queue-calls").read_text() == f"{jobs} --jobs 2\n"
    lines = [line for line in parse(jobs) if line.command]
    waits = dependencies(jobs, parse(jobs), ROOT)
    number = _names(lines)
    finetunings = {k: v for k, v in number.items() if k.startswith("ft_")}
    assert len(finetunings) == 11  # 4 tasks x 2 pretrainings, CT x 3
    assert waits[number["shard shards/imagenet"]] == {number["synth imagenet"]}
    assert waits[number["shard shards/ct"]] == {number["synth dicom"]}
    assert waits[number["shard shards/lits"]] == {number["synth lits-nifti"]}
    assert waits[number["pt_simclr_imagenet"]] == {number["shard shards/imagenet"]}
    assert waits[number["pt_simclr_ct"]] == {number["shard shards/ct"]}
    for name, line in finetunings.items():
        shard = number[f"shard shards/{name.split('_')[1]}"]
        if name.endswith("_scratch"):
            assert waits[line] == {shard}, name
        else:
            source = name.rsplit("simclr-", 1)[1]
            assert waits[line] == {shard, number[f"pt_simclr_{source}"]}, name
        argv = next(x.argv for x in lines if x.number == line)
        assert argv[argv.index("--seeds") + 1 :][:3] == ["0", "1", "--set"], name
    training = {v for k, v in number.items() if k.startswith(("ft_", "pt_"))}
    assert training <= waits[number["xd-analyze"]]
    assert set(finetunings.values()) <= waits[number["xd-eval"]]
    # scoring and analysis side by side; the report after both
    assert number["xd-eval"] not in waits[number["xd-analyze"]]
    assert {number["xd-eval"], number["xd-analyze"]} <= waits[number["xd-report"]]
    scored = next(x.argv for x in lines if x.argv[0] == "xd-eval")
    assert sorted(Path(p).name for p in scored if p.startswith("checkpoints/")) == sorted(
        f"{name}_s0" for name in finetunings
    )


def test_a_rerun_keeps_the_statuses_and_new_commands_replace_them(tmp_path):
    jobs = _make_demo(tmp_path)
    written = jobs.read_text()
    finished = "".join(
        line + (",done\n" if i else "\n") for i, line in enumerate(written.splitlines())
    )
    jobs.write_text(finished)
    (logs := tmp_path / "demo-jobs.csv.logs").mkdir()
    _make_demo(tmp_path)
    assert jobs.read_text() == finished and logs.is_dir()  # nothing reruns
    _make_demo(tmp_path, "SEEDS=3 4 5")  # other commands: a new file, the old logs gone
    text = jobs.read_text()
    assert ",done" not in text and not logs.exists()
    assert "--seeds 3 4 5 " in text and "checkpoints/demo/ft_lits_scratch_s3 " in text


def test_a_finished_demo_whose_report_was_deleted_says_so(tmp_path):
    """Every job done, but the report deleted by hand: the statuses would run nothing, so
    make fails with one line that says what to do instead of announcing the report."""
    jobs = _make_demo(tmp_path)
    jobs.write_text(
        "".join(
            line + (",done\n" if i else "\n")
            for i, line in enumerate(jobs.read_text().splitlines())
        )
    )
    (tmp_path / "report" / "results.md").unlink()
    (tmp_path / "skip-report").touch()
    done = _make_demo(tmp_path, check=False)
    assert done.returncode != 0
    assert (
        "results.md is missing (deleted by hand?): make clean-demo, then make demo" in done.stderr
    )
    assert "report in" not in done.stdout
