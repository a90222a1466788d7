"""xd-train end to end on generated shards: the run folder, resume after SIGKILL, stop
signals, non-finite losses, torchrun with two CPU processes, and config errors before any
data is read."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import ROOT, demo_args
from sklearn.metrics import roc_auc_score

from xdtrain import tasks
from xdtrain.config import load_config
from xdtrain.data import build_loader
from xdtrain.errors import Stopped, UserError, run_cli
from xdtrain.models import get_model
from xdtrain.runlog import read_metrics
from xdtrain.train import StopSignals, Trainer, main


def args(config: str, shards: Path, run: Path, *extra: str) -> list[str]:
    return [*demo_args(config, shards, run, "train.log_every=1"), *extra]


def rows(run: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == kind]


class _ShiftedLoss:
    """Metrics that add the next of ``shifts`` to the loss each computation reports (taken
    when computed, not when built: the trainer also builds metrics to learn their names)."""

    def __init__(self, metrics, shifts):
        self.metrics, self.shifts = metrics, shifts
        self.names = metrics.names

    def update(self, outputs, batch) -> None:
        self.metrics.update(outputs, batch)

    def compute(self) -> dict:
        result = self.metrics.compute()
        return result | {"loss": result["loss"] + next(self.shifts, 0.0)}


def test_simclr_run_writes_a_complete_run_folder(packed, tmp_path, monkeypatch):
    # SimCLR's best epoch is the lowest validation NT-Xent. A real loss often falls every
    # epoch, where "the last epoch" or "the first" would pass too: shift the validation loss
    # of epochs 1 and 3 up (by more than NT-Xent at batch 8 can reach) so the middle epoch
    # is the best, then check the rows against the values actually logged.
    task = tasks.TASKS["simclr"]
    shifts = iter([10.0, 0.0, 20.0])  # validation of epochs 1, 2, 3; then the test split
    shifted = dataclasses.replace(
        task, metrics=lambda c, cfg: _ShiftedLoss(task.metrics(c, cfg), shifts)
    )
    monkeypatch.setitem(tasks.TASKS, "simclr", shifted)
    run = tmp_path / "simclr"
    extra = ["--set", "data.batch_size=8", "--set", "train.epochs=3"]
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
    assert [r["epoch"] for r in val] == [1, 2, 3] and len(test) == 1
    for row in train:
        assert math.isfinite(row["loss"]) and row["samples_per_s"] > 0
        assert 0 <= row["data_wait"] <= 1 and row["lr"] > 0
    # the best epoch is the lowest validation loss so far (the first of equals), every epoch
    losses = [r["loss"] for r in val]
    assert all(math.isfinite(v) for v in losses)
    running = [min(range(i + 1), key=lambda j: (losses[j], j)) for i in range(len(val))]
    assert [r["best_epoch"] for r in val] == [val[j]["epoch"] for j in running]
    best = running[-1]
    assert best == 1  # the middle epoch: the shifts above put it there
    assert test[0]["checkpoint"] == "final.pt"
    assert test[0]["best_val_epoch"] == val[best]["epoch"] == 2
    assert test[0]["best_val_value"] == losses[best]
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
    env = json.loads((run / "env.json").read_text())
    loaded = env["encoder_weights"]
    assert loaded["missing"] == [] and loaded["unexpected"] == [] and loaded["loaded"]
    # what xd-report identifies the run's inputs by, whatever the working folder
    from xdtrain.shards.manifest import content_digest
    from xdtrain.shards.manifest import load as load_manifest
    from xdtrain.shards.tar import file_sha256

    assert env["encoder"] == {
        "path": str((pre / "encoder.pt").resolve()),
        "sha256": file_sha256(pre / "encoder.pt"),
    }
    assert env["shards"]["content"] == content_digest(load_manifest(packed["chestxray8"]))
    train = rows(run, "train")
    assert train[-1]["loss"] < train[0]["loss"]
    test = rows(run, "test")[0]
    expected = _test_auroc(run)
    assert 2 <= len(expected) <= 14  # findings with both classes in the test split
    assert test["auroc_classes"] == len(expected)
    assert test["auroc_mean"] == pytest.approx(float(np.mean(list(expected.values()))), abs=1e-6)
    findings = [k for k in test if k.startswith("auroc/") and k != "auroc/No Finding"]
    assert len(findings) == 14
    for key in findings:
        name = key.removeprefix("auroc/")
        if name in expected:
            assert test[key] == pytest.approx(expected[name], abs=1e-6), name
        else:
            assert test[key] is None, name  # one class only: no AUROC


def _test_auroc(run: Path) -> dict[str, float]:
    """Per-finding AUROC of the run's final.pt on its test split, computed here: the saved
    config's test batches through the saved weights, scored with scikit-learn, for the
    findings (the manifest's first 14 classes) whose test labels hold both classes."""
    config = load_config(run / "config.yaml")
    loader = build_loader(config.data, "test", seed=config.run.seed, train=False)
    classes = list(loader.shardset.classes)
    model = get_model(config.model.name, num_classes=len(classes), in_channels=config.data.channels)
    model.load_state_dict(torch.load(run / "final.pt", weights_only=True)["model"])
    model.eval()
    if config.train.channels_last:  # as the run scored it: the same convolution kernels
        model.to(memory_format=torch.channels_last)
    scores, labels, keys = [], [], []
    with torch.no_grad():
        for batch in loader:
            image = batch["image"]
            if config.train.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            scores.append(model(image).float().numpy())
            labels.append(batch["label"].numpy())
            keys += list(batch["keys"])
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    assert len(keys) == len(set(keys)) == len(labels)  # every test sample once
    out = {}
    for i, name in enumerate(classes[:14]):
        if labels[:, i].min() != labels[:, i].max():
            out[name] = float(roc_auc_score(labels[:, i], scores[:, i]))
    return out


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
    message = str(info.value)
    assert "\n" not in message
    train = rows(run, "train")
    assert train[1]["nonfinite_skipped"] == 1 and math.isfinite(train[2]["loss"])
    assert not (run / "final.pt").exists()
    # the advice is followed as written: the flags it names, the learning rate it proposes
    pattern = r"rerun without --resume, with (--force --set optim\.lr=(\S+)) \(or (--set \S+)\)"
    advice = re.search(pattern, message)
    assert advice, message
    assert float(advice.group(2)) == pytest.approx(load_config(base[0]).optim.lr / 10, rel=1e-2)
    monkeypatch.setitem(tasks.TASKS, "lits", task)
    for flags in (advice.group(1), advice.group(3) + " --force"):
        with pytest.raises(UserError, match="choose one"):  # why it says "without --resume"
            main([*base, "--resume", *flags.split()])
        assert main([*base, *flags.split()]) == 0
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
    # an image size the network cannot take: before the (missing) shards are looked at
    for name, size, message in [
        ("timm/test_vit", 72, "timm/test_vit cuts images into 16 px patches"),
        ("timm/test_convnext", 48, "a U-Net on timm/test_convnext needs a multiple of 32"),
        ("unet_resnet18", 48, "a U-Net on resnet18 needs a multiple of 32"),
    ]:
        argv = [str(ROOT / "configs/demo/ft_brats.yaml"), "--set", f"model.name={name}"]
        argv += ["--set", f"data.image_size={size}", "--set", "data.shards=/nonexistent"]
        with pytest.raises(UserError, match=f"data.image_size {size}: {message}"):
            main([*argv, "--run-dir", str(tmp_path / "r")])


def test_timm_backbone_pretrains_then_finetunes_a_unet(packed, tmp_path):
    """SimCLR on a timm ConvNeXt, then a LiTS U-Net on it: encoder.pt has timm's keys and
    every one of them reaches the U-Net's encoder."""
    import timm

    pre, ft = tmp_path / "pre", tmp_path / "ft"
    name = ["--set", "model.name=timm/test_convnext", "--set", "train.epochs=1"]
    common = ["--set", "data.batch_size=8", "--set", "train.limit_batches=3", *name]
    assert main(args("pt_simclr_imagenet.yaml", packed["imagenet"], pre, *common)) == 0
    reference = timm.create_model("test_convnext", pretrained=False, num_classes=0)
    reference.load_state_dict(torch.load(pre / "encoder.pt", weights_only=True), strict=True)
    weights = ["--set", f"model.encoder_weights={pre / 'encoder.pt'}"]
    assert main(args("ft_lits.yaml", packed["lits"], ft, *common, *weights)) == 0
    loaded = json.loads((ft / "env.json").read_text())["encoder_weights"]
    assert loaded["missing"] == [] and loaded["unexpected"] == []
    assert loaded["adapted"] == ["stem.0.weight"]  # RGB into LiTS's one channel
    assert len(loaded["loaded"]) == len(reference.state_dict())
    final = torch.load(ft / "final.pt", weights_only=True)["model"]
    # the head norm, unused by the U-Net, was frozen: still the pretrained values
    assert torch.equal(final["encoder.head.norm.weight"], reference.head.norm.weight)
    test = rows(ft, "test")[0]
    assert math.isfinite(test["loss"]) and 0 <= test["dice_liver"] <= 1


def _train_command(run: Path, shards: Path, epochs: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "xdtrain.train",
        *args("ft_lits.yaml", shards, run),
        "--set",
        f"train.epochs={epochs}",
        "--set",
        "data.batch_size=4",
        "--set",
        "train.deterministic=true",
        *extra,
    ]


def test_sigkill_mid_epoch_then_resume_gives_identical_weights(packed, tmp_path):
    """Killed after a checkpoint written in the middle of an epoch, a resumed run replays
    the epoch's batches up to the checkpoint's step and ends bit for bit where a run that
    was never stopped ends, with every metrics row once."""
    shards = packed["lits"]
    whole = tmp_path / "whole"
    # one thread each: the uninterrupted reference runs meanwhile, on the other core
    env = dict(os.environ, OMP_NUM_THREADS="1")
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    reference = subprocess.Popen(_train_command(whole, shards, 2), **quiet)
    # last.pt after every step (checkpoint_minutes is tiny), not only at the epoch's end
    often = ("--set", "train.checkpoint_minutes=1e-9")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_command(killed, shards, 2, *often),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    steps_per_epoch = 0
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        train = rows(killed, "train")
        if not steps_per_epoch and any(r["epoch"] == 2 for r in train):
            steps_per_epoch = max(r["step"] for r in train if r["epoch"] == 1)
        # in the second epoch
        if steps_per_epoch and max(r["step"] for r in train) >= steps_per_epoch + 1:
            # frozen, it is killed once its last.pt is from within the epoch and it has
            # logged a step after it (rows the resumed run must drop); else it goes on
            os.kill(proc.pid, signal.SIGSTOP)
            saved = torch.load(killed / "last.pt", weights_only=True)
            logged = max(r["step"] for r in rows(killed, "train"))
            if saved["step_in_epoch"] > 0 and logged > saved["global_step"]:
                os.kill(proc.pid, signal.SIGKILL)
                break
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert reference.wait(timeout=180) == 0, reference.stderr.read()[-3000:]
    assert steps_per_epoch >= 3  # room for a checkpoint and a logged step after it
    assert steps_per_epoch == max(r["step"] for r in rows(whole, "train") if r["epoch"] == 1)
    state = torch.load(killed / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and 0 < state["step_in_epoch"] < steps_per_epoch, (
        state["epoch"],
        state["step_in_epoch"],
    )
    assert state["global_step"] == steps_per_epoch + state["step_in_epoch"]
    assert max(r["step"] for r in rows(killed, "train")) > state["global_step"]  # rows to drop
    resume = [*_train_command(killed, shards, 2, *often), "--resume"]
    subprocess.run(resume, check=True, capture_output=True, env=env)  # the same threads
    a = torch.load(whole / "final.pt", weights_only=True)["model"]
    b = torch.load(killed / "final.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # rows after the checkpoint were dropped, not doubled, and the replayed batches were the
    # same: every step's loss is the uninterrupted run's
    train = rows(killed, "train")
    assert [r["step"] for r in train] == list(range(1, 2 * steps_per_epoch + 1))
    assert [r["loss"] for r in train] == [r["loss"] for r in rows(whole, "train")]
    assert [r["epoch"] for r in rows(killed, "val")] == [1, 2]
    assert [r["loss"] for r in rows(killed, "val")] == [r["loss"] for r in rows(whole, "val")]
    assert len(rows(killed, "test")) == 1
    assert rows(killed, "test")[0]["loss"] == rows(whole, "test")[0]["loss"]


def test_sigterm_mid_epoch_checkpoints_at_the_step_it_stops(packed, tmp_path):
    """SIGTERM (Slurm's preemption, requeue or scancel) in the second epoch: the run writes
    last.pt at the step where it stops, says so in one line and exits with 143 (128 +
    SIGTERM). That a run resumed from there ends bit for bit where a run never stopped ends
    is checked on a real Slurm (tests/test_queue_slurm.py: scontrol requeue mid-epoch), and
    for a mid-epoch last.pt in general by the SIGKILL test above."""
    shards = packed["lits"]
    # batch 2: six steps an epoch, so the stop lands mid-epoch however late it is seen
    small = ("--set", "data.batch_size=2")
    stopped = tmp_path / "stopped"
    pipes = dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(_train_command(stopped, shards, 2, *small), **pipes)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(r["epoch"] == 2 for r in rows(stopped, "train")):
            # frozen, it is sent SIGTERM once sure to stop before the epoch's last step (it
            # stops after the step it is in, or the next one when past that step's check)
            os.kill(proc.pid, signal.SIGSTOP)
            train = rows(stopped, "train")
            steps_per_epoch = max(r["step"] for r in train if r["epoch"] == 1)
            if max(r["step"] for r in train) + 2 >= 2 * steps_per_epoch:
                proc.kill()
                pytest.fail("seen in its second epoch too late to stop it mid-epoch")
            os.kill(proc.pid, signal.SIGTERM)
            os.kill(proc.pid, signal.SIGCONT)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]  # not -15: killed by it
    state = torch.load(stopped / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and 0 < state["step_in_epoch"] < steps_per_epoch
    assert state["global_step"] == steps_per_epoch + state["step_in_epoch"]
    # stopped at the step it saved: no train row after it, no validation of epoch 2
    assert max(r["step"] for r in rows(stopped, "train")) == state["global_step"]
    assert [r["epoch"] for r in rows(stopped, "val")] == [1] and not rows(stopped, "test")
    lines = err.rstrip("\n").splitlines()
    assert "Traceback" not in err and sum(line.startswith("stopped:") for line in lines) == 1
    assert lines[-1] == (
        f"stopped: SIGTERM: checkpoint written at epoch 2 step {state['step_in_epoch']}; "
        f"{stopped}: rerun the same command with --resume; it continues from last.pt"
    )


def test_a_stop_signal_during_validation_stops_after_the_epochs_checkpoint(
    packed, tmp_path, monkeypatch, capsys
):
    """SIGUSR1 (ahead of a time limit) during the first epoch's validation: the run stops
    once that epoch is saved, before the next one, and exits with 138 (128 + SIGUSR1)."""
    run = tmp_path / "run"
    validate = Trainer.validate

    def signalled(self):
        signal.raise_signal(signal.SIGUSR1)
        validate(self)

    monkeypatch.setattr(Trainer, "validate", signalled)
    before = signal.getsignal(signal.SIGUSR1)
    base = args("ft_lits.yaml", packed["lits"], run, "--set", "data.batch_size=4")
    assert run_cli(main, [*base, "--set", "train.epochs=2"]) == 128 + signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before  # restored
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step_in_epoch"] == 0
    assert [r["epoch"] for r in rows(run, "val")] == [1]
    assert {r["epoch"] for r in rows(run, "train")} == {1} and not rows(run, "test")
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"stopped: SIGUSR1: checkpoint written after epoch 1; {run}: rerun the same command "
        "with --resume; it continues from last.pt"
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2])
def test_stop_signals_are_noted_then_their_handlers_restored(signum, capsys):
    """The first stop signal is noted, Ctrl-C is left alone, the previous handlers are back
    afterwards, and the command exits with 128 + the signal number."""
    previous = {s: signal.getsignal(s) for s in (signum, signal.SIGINT)}
    with StopSignals() as stop:
        assert stop.signum is None
        assert signal.getsignal(signal.SIGINT) is previous[signal.SIGINT]  # Ctrl-C as before
        signal.raise_signal(signum)
        signal.raise_signal(signal.SIGUSR2 if signum != signal.SIGUSR2 else signal.SIGTERM)
        assert stop.signum == signum  # the first one
    assert {s: signal.getsignal(s) for s in previous} == previous

    def stopped(argv):
        raise Stopped("checkpoint written", signum)

    assert run_cli(stopped) == {"SIGTERM": 143, "SIGUSR1": 138, "SIGUSR2": 140}[signum.name]
    assert capsys.readouterr().err == "stopped: checkpoint written\n"


def test_stop_signals_install_nothing_outside_the_main_thread():
    """``signal.signal`` fails outside the main thread: there, nothing is installed."""
    seen = []

    def train():
        with StopSignals():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=train)
    thread.start()
    thread.join()
    assert seen == [signal.getsignal(signal.SIGTERM)]


def torchrun2(*train_args: str, torchrun: tuple[str, ...] = ()):
    """``xd-train`` under ``torchrun --standalone`` with two CPU processes."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *torchrun,
        "-m",
        "xdtrain.train",
        *train_args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(
    "config,data,extra",
    [
        (
            "pt_simclr_imagenet.yaml",
            "imagenet",
            [
                "--set",
                "data.batch_size=4",
                "--set",
                "monitor.every=1",
                "--set",
                "monitor.bank_samples=20",
                "--set",
                "monitor.query_samples=9",
                "--set",
                "monitor.k=5",
            ],
        ),  # fmt: skip
        # a timm ViT U-Net: the pyramid, and encoder parameters the U-Net never uses (the
        # final norm), which DDP refuses unless they are frozen
        (
            "ft_brats.yaml",
            "brats",
            ["--set", "data.batch_size=4", "--set", "model.name=timm/test_vit"],
        ),
    ],
)
def test_torchrun_with_two_cpu_processes(packed, tmp_path, config, data, extra):
    run = tmp_path / "ddp"
    done = torchrun2(*args(config, packed[data], run, "--set", "train.epochs=2", *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run: ") == 1  # only rank 0 prints
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    train = rows(run, "train")
    assert [r["step"] for r in train] == list(range(1, len(train) + 1))
    assert [r["epoch"] for r in rows(run, "val")] == [1, 2] and len(rows(run, "test")) == 1
    assert all(math.isfinite(r["loss"]) for r in train)
    if config.startswith("pt_"):
        # NT-Xent's negatives are the batch-mates: batches of 2 ranks score otherwise; the
        # kNN monitor is the same whatever the ranks: one process scoring the final encoder
        # agrees with the last monitor row (each rank embedded its half of both samples)
        from xdtrain.evaluate import precision
        from xdtrain.models.encoders import build_encoder
        from xdtrain.monitor import KnnMonitor

        watched = rows(run, "monitor")
        assert [r["epoch"] for r in watched] == [0, 1, 2]
        encoder = build_encoder("resnet18")
        encoder.load_state_dict(torch.load(run / "encoder.pt", weights_only=True))
        alone = KnnMonitor(load_config(run / "config.yaml"), 0, 1)
        cpu = torch.device("cpu")
        result = alone(encoder, cpu, precision("off", cpu))
        assert watched[-1]["knn_top1"] == pytest.approx(result["knn_top1"], abs=1e-9)
        assert watched[-1]["knn_chance"] == result["knn_chance"]
        return
    # the test row is the saved model's score: one process scoring final.pt agrees (the
    # ranks' batch-norm statistics differ after training until rank 0's are sent to all)
    from xdtrain.evaluate import main as eval_main

    assert eval_main([str(run)]) == 0
    scored = json.loads((run / "eval_test.json").read_text())["metrics"]
    test = rows(run, "test")[0]
    assert scored["samples"] == test["samples"]
    for key, value in scored.items():
        assert test[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_sync_bn_on_cpu_ranks_is_refused_in_one_line_before_any_data_is_read(tmp_path):
    """SyncBatchNorm needs CUDA: two CPU ranks under torchrun refuse ``train.sync_bn: true``
    at start with one line from one rank (shards that do not exist are never opened)."""
    run, logs = tmp_path / "ddp", tmp_path / "logs"
    done = torchrun2(
        str(ROOT / "configs/demo/ft_lits.yaml"),
        "--run-dir",
        str(run),
        "--set",
        "data.shards=/nonexistent",
        "--set",
        "data.device=cpu",  # CPU ranks on a machine with GPUs too
        "--set",
        "train.sync_bn=true",
        # each rank's stdout and stderr into its own files under logs/
        torchrun=("--log-dir", str(logs), "--redirects", "3"),
    )
    # torchrun fails (1) and reports the rank that failed first with xd-train's status 2
    assert done.returncode == 1, done.stderr[-3000:]
    assert re.search(r"exitcode\s*:\s*2\b", done.stderr), done.stderr[-3000:]
    errs = {p.parent.name: p.read_text() for p in logs.rglob("stderr.log")}
    outs = [p.read_text() for p in logs.rglob("stdout.log")]
    assert sorted(errs) == ["0", "1"] and outs == ["", ""], (errs, outs)
    said = [text for text in errs.values() if text]
    assert len(said) == 1, errs  # every rank refuses; one says why
    assert said[0].count("\n") == 1 and "Traceback" not in said[0], said[0]  # one line
    line = said[0].rstrip("\n")
    assert line.startswith(f"error: {ROOT / 'configs/demo/ft_lits.yaml'}: train.sync_bn: ")
    assert "CUDA" in line and "set train.sync_bn: false" in line, line
    assert not run.exists()  # no run folder, no files
