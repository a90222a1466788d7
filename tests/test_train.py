"""xd-train end to end on generated shards: the run folder, resume after SIGKILL, non-finite
losses, torchrun with two CPU processes, and config errors before any data is read."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import ROOT, demo_args

from xdtrain import tasks
from xdtrain.errors import UserError
from xdtrain.runlog import read_metrics
from xdtrain.train import main


def args(config: str, shards: Path, run: Path, *extra: str) -> list[str]:
    return [*demo_args(config, shards, run, "train.log_every=1"), *extra]


def rows(run: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == kind]


def test_simclr_run_writes_a_complete_run_folder(packed, tmp_path):
    run = tmp_path / "simclr"
    extra = ["--set", "data.batch_size=8", "--set", "train.epochs=2"]
    assert main(args("pt_simclr_imagenet.yaml", packed["imagenet"], run, *extra)) == 0
    for name in ("config.yaml", "env.json", "metrics.jsonl", "last.pt", "final.pt", "encoder.pt"):
        assert (run / name).is_file(), name
    assert (run / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 1 and env["packages"]["torch"] and env["precision"] == "fp32"
    train, val, test = rows(run, "train"), rows(run, "val"), rows(run, "test")
    steps = [r["step"] for r in train]
    assert steps == list(range(1, len(steps) + 1))  # every row once, every step logged
    assert [r["epoch"] for r in val] == [1, 2] and len(test) == 1
    for row in train:
        assert math.isfinite(row["loss"]) and row["samples_per_s"] > 0
        assert 0 <= row["data_wait"] <= 1 and row["lr"] > 0
    assert test[0]["checkpoint"] == "final.pt" and test[0]["best_val_epoch"] in (1, 2)
    final = torch.load(run / "final.pt", weights_only=True)
    last = torch.load(run / "last.pt", weights_only=True)
    assert "optimizer" not in final and "optimizer" in last  # only last.pt is for resuming
    assert final["global_step"] == last["global_step"] == len(steps)
    assert all(torch.equal(final["model"][k], v) for k, v in last["model"].items())
    encoder = torchvision.models.resnet18()
    result = encoder.load_state_dict(
        torch.load(run / "encoder.pt", weights_only=True), strict=False
    )
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]


def test_finetuning_from_a_pretrained_encoder_records_what_it_loaded(packed, tmp_path):
    pre = tmp_path / "pre"
    main(
        args(
            "pt_simclr_imagenet.yaml",
            packed["imagenet"],
            pre,
            "--set",
            "train.epochs=1",
            "--set",
            "data.batch_size=8",
        )
    )
    run = tmp_path / "ft"
    extra = [
        "--set",
        f"model.encoder_weights={pre / 'encoder.pt'}",
        "--set",
        "train.epochs=2",
        "--set",
        "data.batch_size=8",
    ]
    assert main(args("ft_chestxray8.yaml", packed["chestxray8"], run, *extra)) == 0
    loaded = json.loads((run / "env.json").read_text())["encoder_weights"]
    assert loaded["missing"] == [] and loaded["unexpected"] == [] and loaded["loaded"]
    train = rows(run, "train")
    assert train[-1]["loss"] < train[0]["loss"]
    assert 0 <= rows(run, "test")[0]["auroc_mean"] <= 1


def test_an_existing_run_needs_resume_or_force(packed, tmp_path):
    run = tmp_path / "lits"
    base = args(
        "ft_lits.yaml", packed["lits"], run, "--set", "train.epochs=1", "--set", "data.batch_size=4"
    )
    assert main(base) == 0
    with pytest.raises(UserError, match="add --resume to continue it or --force"):
        main(base)
    with pytest.raises(UserError, match=r"different config \(optim.lr\)"):
        main([*base, "--resume", "--set", "optim.lr=0.5"])
    assert main([*base, "--resume"]) == 0  # finished: nothing to do, nothing rewritten
    assert len(rows(run, "test")) == 1
    assert main([*base, "--resume", "--set", "train.epochs=2"]) == 0  # one more epoch
    assert [r["epoch"] for r in rows(run, "val")] == [1, 2] and len(rows(run, "test")) == 1
    assert main([*base, "--force"]) == 0
    assert [r["epoch"] for r in rows(run, "val")] == [1]


def test_nonfinite_losses_are_skipped_then_stop_the_run_resumably(packed, tmp_path, monkeypatch):
    task = tasks.TASKS["lits"]
    calls = {"n": 0}
    run = tmp_path / "nan"

    def poisoned(model, batch, config):
        loss, out = task.forward(model, batch, config)
        if model.training:
            calls["n"] += 1
            # one stray NaN in the first epoch, then NaN for good once epoch 1 is saved
            if calls["n"] == 2 or (run / "last.pt").exists():
                loss = loss * float("nan")
        return loss, out

    monkeypatch.setitem(tasks.TASKS, "lits", dataclasses.replace(task, forward=poisoned))
    base = args(
        "ft_lits.yaml",
        packed["lits"],
        run,
        "--set",
        "train.epochs=3",
        "--set",
        "data.batch_size=4",
        "--set",
        "train.max_nonfinite=3",
    )
    with pytest.raises(UserError, match="3 non-finite losses in a row") as info:
        main(base)
    assert "--resume" in str(info.value) and "\n" not in str(info.value)
    train = rows(run, "train")
    assert train[1]["nonfinite_skipped"] == 1 and math.isfinite(train[2]["loss"])
    # stopped in epoch 2, resumable from the checkpoint of epoch 1
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    assert not (run / "final.pt").exists()
    monkeypatch.setitem(tasks.TASKS, "lits", task)
    assert main([*base, "--resume"]) == 0
    assert len(rows(run, "test")) == 1 and (run / "final.pt").exists()
    assert [r["epoch"] for r in rows(run, "val")] == [1, 2, 3]


def test_a_config_typo_fails_before_any_data_is_read(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text(
        f"_base_: {ROOT / 'configs/demo/ft_lits.yaml'}\ndata:\n  shards: /nonexistent\n"
        "optim:\n  learning_rate: 0.1\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "xdtrain.train", str(config), "--run-dir", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "optim.learning_rate" in done.stderr and "typo.yaml" in done.stderr
    assert done.stderr.count("\n") == 1 and not (tmp_path / "r").exists()
    with pytest.raises(UserError, match="unknown task 'brat'.*did you mean 'brats'"):
        main([str(ROOT / "configs/demo/ft_brats.yaml"), "--set", "task=brat"])
    with pytest.raises(UserError, match="needs a unet model"):
        main([str(ROOT / "configs/demo/ft_brats.yaml"), "--set", "model.name=resnet18"])


def _train_command(run: Path, shards: Path, epochs: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "xdtrain.train",
        *args("ft_lits.yaml", shards, run),
        "--set",
        f"train.epochs={epochs}",
        "--set",
        "data.batch_size=2",
        "--set",
        "train.deterministic=true",
    ]


def test_sigkill_in_the_second_epoch_then_resume_gives_identical_weights(packed, tmp_path):
    shards = packed["lits"]
    whole = tmp_path / "whole"
    subprocess.run(_train_command(whole, shards, 3), check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_command(killed, shards, 3), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(r["epoch"] == 2 for r in rows(killed, "train")):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    state = torch.load(killed / "last.pt", weights_only=True)
    assert state["epoch"] == 1  # killed during the second epoch
    subprocess.run(
        [*_train_command(killed, shards, 3), "--resume"], check=True, capture_output=True
    )
    a = torch.load(whole / "final.pt", weights_only=True)["model"]
    b = torch.load(killed / "final.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in rows(killed, "train")]
    assert steps == sorted(set(steps))  # rows after the checkpoint were dropped, not doubled
    assert rows(killed, "test")[0]["loss"] == rows(whole, "test")[0]["loss"]


@pytest.mark.parametrize(
    "config,data,extra",
    [
        ("pt_simclr_imagenet.yaml", "imagenet", ["--set", "data.batch_size=4"]),
        ("ft_brats.yaml", "brats", ["--set", "data.batch_size=4"]),
    ],
)
def test_torchrun_with_two_cpu_processes(packed, tmp_path, config, data, extra):
    run = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "xdtrain.train",
        *args(config, packed[data], run, "--set", "train.epochs=2", *extra),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run: ") == 1  # only rank 0 prints
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    train = rows(run, "train")
    assert [r["step"] for r in train] == list(range(1, len(train) + 1))
    assert [r["epoch"] for r in rows(run, "val")] == [1, 2] and len(rows(run, "test")) == 1
    assert all(math.isfinite(r["loss"]) for r in train)
