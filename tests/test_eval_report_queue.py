"""xd-eval, xd-report and xd-queue on tiny runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, demo_args
from scipy import stats

from xdtrain.config import load_config
from xdtrain.errors import UserError
from xdtrain.evaluate import main as eval_main
from xdtrain.queue import main as queue_main
from xdtrain.queue import parse
from xdtrain.report import main as report_main
from xdtrain.runlog import read_metrics
from xdtrain.train import main as train_main

BIN = Path(sys.executable).parent


def tiny(config: str, shards: Path, run: Path, *extra: str) -> list[str]:
    return [*demo_args(config, shards, run, "data.batch_size=4", "train.epochs=1"), *extra]


@pytest.fixture(scope="module")
def grid_runs(packed, tmp_path_factory):
    """A SimCLR run and LiTS runs from scratch and from its encoder, two seeds each."""
    root = tmp_path_factory.mktemp("runs")
    pre = root / "pt"
    assert train_main(tiny("pt_simclr_imagenet.yaml", packed["imagenet"], pre)) == 0
    for seed in (0, 1):
        scratch = tiny(
            "ft_lits.yaml", packed["lits"], root / f"scratch{seed}", "--set", f"run.seed={seed}"
        )
        assert train_main(scratch) == 0
        weights = [
            "--set",
            f"model.encoder_weights={pre / 'encoder.pt'}",
            "--set",
            f"run.seed={seed}",
        ]
        assert train_main(tiny("ft_lits.yaml", packed["lits"], root / f"pre{seed}", *weights)) == 0
    return root


def test_eval_reproduces_the_runs_own_test_row_and_draws(grid_runs, capsys):
    run = grid_runs / "pre0"
    assert eval_main([str(run), "--split", "test"]) == 0
    report = json.loads((run / "eval_test.json").read_text())
    test_row = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "test"][-1]
    for key, value in report["metrics"].items():
        assert test_row[key] == pytest.approx(value, abs=1e-9), key
    for plot in report["plots"]:
        assert Path(plot).read_bytes()[:4] == b"\x89PNG"
    assert {Path(p).name for p in report["plots"]} == {"overlays_test.png", "dice_test.png"}
    assert "dice_liver" in capsys.readouterr().out


def test_eval_classification_plots(packed, tmp_path):
    run = tmp_path / "cx8"
    assert train_main(tiny("ft_chestxray8.yaml", packed["chestxray8"], run)) == 0
    assert eval_main([str(run), "--split", "val", "--checkpoint", "last"]) == 0
    assert (run / "roc_val.png").exists() and (run / "eval_val.json").exists()
    im = tmp_path / "im"
    assert train_main(tiny("ft_imagenet.yaml", packed["imagenet"], im)) == 0
    assert eval_main([str(im), "--batch-size", "3"]) == 0
    assert (im / "confusion_test.png").exists()


def test_eval_with_a_missing_or_damaged_checkpoint_says_so(grid_runs, tmp_path):
    with pytest.raises(UserError, match="no config.yaml"):
        eval_main([str(tmp_path)])
    with pytest.raises(UserError, match=r"none.pt: no checkpoint \(--checkpoint takes final"):
        eval_main([str(grid_runs / "pre1"), "--checkpoint", str(tmp_path / "none.pt")])
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((grid_runs / "pre1" / "final.pt").read_bytes()[:5000])
    with pytest.raises(UserError, match="damaged checkpoint") as info:
        eval_main([str(grid_runs / "pre1"), "--checkpoint", str(damaged)])
    assert "\n" not in str(info.value)
    other = tmp_path / "other.pt"
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, other)
    with pytest.raises(UserError, match="does not fit the run's unet_resnet18"):
        eval_main([str(grid_runs / "pre1"), "--checkpoint", str(other)])


def test_report_table_statistics_and_heatmap(grid_runs, tmp_path, capsys):
    unfinished = grid_runs / "unfinished"
    unfinished.mkdir(exist_ok=True)
    (unfinished / "config.yaml").write_text((grid_runs / "pre0" / "config.yaml").read_text())
    out = tmp_path / "report"
    assert report_main([str(grid_runs), "--out", str(out)]) == 0
    text = (out / "results.md").read_text()
    assert "simclr-imagenet" in text and "scratch" in text
    assert "unfinished" in text and str(unfinished) in text  # listed, not averaged
    rows = {r["pretrain"]: r for r in _csv(out / "results.csv")}
    scores = {
        name: [_test(grid_runs / f"{name}{s}")["dice_liver"] for s in (0, 1)]
        for name in ("scratch", "pre")
    }
    expected = stats.ttest_ind(scores["pre"], scores["scratch"], equal_var=False).pvalue
    pre = rows["simclr-imagenet"]
    assert int(pre["seeds"]) == 2 and int(rows["scratch"]["seeds"]) == 2
    if np.isnan(expected):
        assert pre["p_welch"] in ("", "nan")
    else:
        assert float(pre["p_welch"]) == pytest.approx(expected, rel=1e-9)
    assert float(pre["mean"]) == pytest.approx(np.mean(scores["pre"]))
    delta = np.mean(scores["pre"]) - np.mean(scores["scratch"])
    assert float(pre["delta_vs_scratch"]) == pytest.approx(delta)
    import matplotlib.image

    heat = matplotlib.image.imread(out / "heatmap.png")
    assert heat.ndim == 3 and heat.shape[0] > 100 and heat.shape[1] > 100 and heat.std() > 0
    assert (out / "curves.png").exists() and (out / "runs.csv").exists()


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path) as fh:
        return list(csv.DictReader(fh))


def _test(run: Path) -> dict:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "test"][-1]


# --------------------------------------------------------------------------- xd-queue


def _jobs(path: Path, commands: list[str]) -> Path:
    path.write_text(
        "command,status\n# a comment that stays\n" + "".join(f"{c},\n" for c in commands)
    )
    return path


def test_queue_refuses_non_xd_commands_and_shell_syntax_before_running_anything(tmp_path):
    ok = f"xd-synth imagenet --out {tmp_path / 'a'} --count 1 --quiet"
    for bad, message in [
        ("ls -la", "only xd-\\* commands run"),
        (f"xd-synth imagenet --out {tmp_path} ; rm -rf /", "shell syntax is not run"),
        ("xd-synth imagenet $(whoami)", "shell syntax is not run"),
    ]:
        jobs = _jobs(tmp_path / "jobs.csv", [ok, bad])
        before = jobs.read_text()
        with pytest.raises(UserError, match=message) as info:
            queue_main([str(jobs)])
        assert "line 4" in str(info.value)
        assert jobs.read_text() == before and not (tmp_path / "a").exists()


def test_queue_survives_sigkill_and_resumes_with_the_interrupted_job(tmp_path):
    out = tmp_path / "data"
    jobs = _jobs(
        tmp_path / "jobs.csv",
        [
            f"xd-synth imagenet --out {out} --count 1 --quiet",
            f"xd-synth brats --out {out} --count 3 --size full --workers 1 --quiet",
            f"xd-synth lits --out {out} --count 1 --quiet",
        ],
    )
    proc = subprocess.Popen([str(BIN / "xd-queue"), str(jobs)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        lines = parse(jobs)
        if lines[3].status.startswith("running"):
            time.sleep(0.5)
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    statuses = [line.status for line in parse(jobs) if line.command]
    assert statuses[0] == "done" and statuses[1].startswith("running: pid ") and statuses[2] == ""
    assert "# a comment that stays" in jobs.read_text()
    assert subprocess.run([str(BIN / "xd-queue"), str(jobs)], capture_output=True).returncode == 0
    statuses = [line.status for line in parse(jobs) if line.command]
    assert statuses == ["done", "done", "done"]
    logs = jobs.with_name("jobs.csv.logs")
    assert (logs / "job0002.log").read_text().count("$ xd-synth") == 1  # not rerun
    assert (logs / "job0003.log").read_text().count("$ xd-synth") == 2  # rerun
    assert (out / "brats").is_dir() and (out / "lits").is_dir()


def test_queue_marks_a_failed_job_with_its_log(tmp_path):
    jobs = _jobs(tmp_path / "jobs.csv", [f"xd-shard --dataset brats --src {tmp_path / 'none'}"])
    assert queue_main([str(jobs)]) == 1
    (line,) = [line for line in parse(jobs) if line.command]
    assert line.status.startswith("failed: ") and Path(line.status[8:]).is_file()
    assert (
        "no such folder" in Path(line.status[8:]).read_text()
        or "error" in Path(line.status[8:]).read_text()
    )


def test_grid_writes_loadable_configs_and_jobs(tmp_path):
    out = tmp_path / "grid"
    argv = [
        "grid",
        "--pretrain",
        "none,imagenet",
        "--tasks",
        "brats,lits",
        "--seeds",
        "2",
        "--fractions",
        "1.0,0.1",
        "--linear",
        "--configs",
        str(ROOT / "configs"),
        "--out",
        str(out),
    ]
    assert queue_main(argv) == 0
    lines = [line for line in parse(out / "jobs.csv") if line.command]
    # 1 pretraining; per task and fraction: scratch full, imagenet full and linear; x 2 seeds
    assert len(lines) == 1 + 2 * 2 * 3 * 2
    assert lines[0].argv[1].endswith("pt_imagenet.yaml")
    for line in lines:
        config = load_config(line.argv[1])
        assert config.run.output_dir == str(out / "runs")
    linear = load_config(out / "configs" / "ft_lits_imagenet_f0.1_linear_s1.yaml")
    assert linear.model.frozen_encoder and linear.data.fraction == 0.1 and linear.run.seed == 1
    assert linear.model.encoder_weights == str(out / "runs" / "pt_imagenet" / "encoder.pt")
    assert linear.run.pretrain == "simclr-imagenet"
    with pytest.raises(UserError, match="--tasks"):
        queue_main(["grid", "--tasks", "mnist", "--out", str(out)])
