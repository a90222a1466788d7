"""What xd-train knows before its first step: configurations that cannot learn, every input
the run will read, ranks without evaluation samples, and advice that works when followed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torchvision
from helpers import ROOT, demo_args

from xdtrain.errors import UserError
from xdtrain.evaluate import main as eval_main
from xdtrain.runlog import read_metrics
from xdtrain.shards.cli import main as shard_main
from xdtrain.train import main

NOWHERE = "/nonexistent/shards"


def rows(run: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == kind]


def lits_volumes(out: Path, depths: list[int], liver: bool = True) -> Path:
    """LiTS NIfTI volumes of ``depths`` slices (32 x 32), liver on every slice or nowhere."""
    out.mkdir(parents=True)
    aff = np.diag([-0.8, -0.8, 2.0, 1.0])
    for n, depth in enumerate(depths):
        hu = np.full((32, 32, depth), -1000.0, np.float32)
        hu[4:28, 4:28] = 0.0
        seg = np.zeros((32, 32, depth), np.uint8)
        if liver:
            seg[4:14, 8:24] = 1
            hu[seg == 1] = 150.0
        nib.save(nib.Nifti1Image(seg, aff), out / f"segmentation-{n}.nii")
        nib.save(nib.Nifti1Image(hu, aff), out / f"volume-{n}.nii")
    return out


def pack(src: Path, out: Path, *extra: str) -> Path:
    argv = ["--dataset", "lits", "--src", str(src), "--out", str(out), "--quiet", "--workers", "1"]
    assert shard_main([*argv, *extra]) == 0
    return out


# --------------------------------------------------------------------------- cannot learn


@pytest.mark.parametrize(
    "config,settings,message",
    [
        ("pt_simclr_imagenet.yaml", ["data.batch_size=1"], "SimCLR needs at least 2 samples"),
        (  # with gathered negatives, one sample on one rank still has none
            "pt_simclr_imagenet.yaml",
            ["data.batch_size=1", "loss.gather=true"],
            "SimCLR needs at least 2 samples per step",
        ),
        ("ft_lits.yaml", ["data.batch_size=1"], "batch norm cannot train on"),
        ("ft_imagenet.yaml", ["data.batch_size=1"], "batch norm cannot train on"),
    ],
)
def test_configs_that_cannot_learn_are_refused_before_any_data_is_read(
    tmp_path, config, settings, message
):
    run = tmp_path / "run"
    with pytest.raises(UserError, match=message) as info:
        main(demo_args(config, Path(NOWHERE), run, *settings))  # the shards do not exist
    assert "\n" not in str(info.value) and not run.exists()


def test_batch_norm_limit_follows_the_image_size_and_frozen_encoders(packed, tmp_path):
    """One sample per rank is refused at 32 px (1 x 1 at the last stage) but trains at 64 px
    (2 x 2 values per channel), and with a frozen encoder (no batch statistics)."""
    shards = packed["lits"]
    one = ["data.batch_size=1", "train.epochs=1", "train.limit_batches=2"]
    for extra in (["data.image_size=64"], ["model.frozen_encoder=true"]):
        run = tmp_path / extra[0].split("=")[0].replace(".", "_")
        assert main(demo_args("ft_lits.yaml", shards, run, *one, *extra)) == 0
        assert rows(run, "test")[0]["samples"] > 0


def test_a_training_split_without_foreground_is_refused(tmp_path):
    src = lits_volumes(tmp_path / "src", [4, 4, 4], liver=False)
    shards = pack(src, tmp_path / "shards", "--slices", "all")
    with pytest.raises(UserError, match="no training slice holds any foreground label"):
        main(demo_args("ft_lits.yaml", shards, tmp_path / "run", "data.batch_size=2"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_classification_tier_with_one_class_is_refused(raw, tmp_path):
    """ImageNet packed with a 1 % tier: one image, so one class. The whole split has every
    class, the tier does not; its per-shard counts in the manifest say so."""
    shards = tmp_path / "imagenet"
    argv = ["--dataset", "imagenet", "--src", str(raw / "imagenet"), "--out", str(shards)]
    assert shard_main([*argv, "--quiet", "--workers", "1", "--fractions", "0.01"]) == 0
    run = tmp_path / "run"
    base = demo_args("ft_imagenet.yaml", shards, run, "data.batch_size=1", "data.image_size=64")
    with pytest.raises(UserError, match=r"at data.fraction 0.01 holds 1 class\(es\)") as info:
        main([*base, "--set", "data.fraction=0.01"])
    assert "pick a larger data.fraction" in str(info.value)
    assert main([*base, "--set", "train.epochs=1", "--set", "train.limit_batches=1"]) == 0


# --------------------------------------------------------------------------- preflight


def test_every_split_and_the_fraction_tier_are_checked_before_the_first_step(packed, tmp_path):
    """A damaged test split stops the run at start (it used to train, then fail at the end);
    so does a training tier without samples and an unreadable encoder file."""
    shards = tmp_path / "lits"
    manifest = json.loads((packed["lits"] / "manifest.json").read_text())
    test_shard = manifest["splits"]["test"]["shards"][-1]["name"]
    run = tmp_path / "run"
    base = demo_args("ft_lits.yaml", shards, run, "data.batch_size=2", "train.epochs=1")
    damages = {
        "its .idx deleted": lambda tar: tar.with_suffix(".idx").unlink(),
        "cut short": lambda tar: os.truncate(tar, tar.stat().st_size - 1024),
        "its .idx replaced": lambda tar: tar.with_suffix(".idx").write_text("garbage\n"),
    }
    for damage in damages.values():
        shutil.rmtree(shards, ignore_errors=True)
        shutil.copytree(packed["lits"], shards)
        damage(shards / test_shard)
        with pytest.raises(UserError, match=re.escape(test_shard) + ".*xd-shard verify"):
            main(base)
        assert not (run / "metrics.jsonl").exists()  # not a single step
    shutil.rmtree(shards)
    shutil.copytree(packed["lits"], shards)
    # a tier whose volumes held no kept slice: no shard of its own
    manifest["fractions"] = {"p050": 0.5}
    for entry in manifest["splits"]["train"]["shards"]:
        entry["tier"] = "p100"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="holds no sample at data.fraction 0.5"):
        main([*base, "--set", "data.fraction=0.5"])
    bad = tmp_path / "encoder.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable weights file"):
        main([*base, "--set", f"model.encoder_weights={bad}"])
    diverged = {k: v.clone() for k, v in torchvision.models.resnet18().state_dict().items()}
    diverged["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(diverged, bad)
    with pytest.raises(UserError, match=r"1 tensor\(s\) hold NaN .*layer1.0.conv1.weight"):
        main([*base, "--set", f"model.encoder_weights={bad}"])
    assert not (run / "metrics.jsonl").exists()


# --------------------------------------------------------------------------- DDP


def torchrun2(*train_args: str, logs: Path):
    """``xd-train`` under torchrun with two CPU processes, each rank's output in ``logs``."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "--log-dir", str(logs), "--redirects", "3", "-m", "xdtrain.train", *train_args,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_ranks_without_evaluation_samples_score_every_sample_once(tmp_path):
    """Val and test splits of one slice on two ranks: rank 1 reads nothing, takes part in
    the reductions, and each split is scored on its one sample; a problem found by the
    preflight is said once, by one rank, and no rank hangs or dies on a closed connection."""
    shards = pack(lits_volumes(tmp_path / "src", [1, 1, 6]), tmp_path / "shards")
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["splits"]["val"]["samples"] == manifest["splits"]["test"]["samples"] == 1
    run = tmp_path / "run"
    common = ["data.image_size=64", "data.workers=1", "data.batch_size=1", "train.epochs=1"]
    argv = [str(ROOT / "configs/demo/ft_lits.yaml"), "--run-dir", str(run)]
    argv += [x for s in [f"data.shards={shards}", *common] for x in ("--set", s)]
    done = torchrun2(*argv, logs=tmp_path / "logs")
    assert done.returncode == 0, done.stderr[-3000:]
    assert rows(run, "val")[-1]["samples"] == 1 and rows(run, "test")[-1]["samples"] == 1
    # the same split at 32 px: refused before training, said once
    logs = tmp_path / "logs32"
    done = torchrun2(*argv, "--set", "data.image_size=32", "--force", logs=logs)
    assert done.returncode == 1 and re.search(r"exitcode\s*:\s*2\b", done.stderr)
    said = [p.read_text() for p in logs.rglob("stderr.log") if p.read_text()]
    assert len(said) == 1 and said[0].count("\n") == 1, said
    assert said[0].startswith("error: data.batch_size 1 at data.image_size 32")
    assert "Connection closed" not in done.stderr + "".join(said)


# --------------------------------------------------------------------------- advice


def test_the_advice_of_a_too_small_training_split_works(tmp_path):
    shards = pack(lits_volumes(tmp_path / "src", [2, 2, 6]), tmp_path / "shards")
    run = tmp_path / "run"
    base = demo_args("ft_lits.yaml", shards, run, "train.epochs=1")
    with pytest.raises(UserError, match="fewer than one batch of 8") as info:
        main([*base, "--set", "data.batch_size=8"])
    advice = re.search(r"set (data\.batch_size=\d+) or less", str(info.value))
    assert advice, info.value
    assert main([*base, "--set", advice.group(1)]) == 0
    assert rows(run, "train") and rows(run, "test")


def _interruptible() -> None:
    """In the child before it starts: Ctrl-C as a terminal gives it (default action, not
    blocked), whatever the test process inherited or set (in a long pytest run the child
    has been seen to ignore SIGINT and finish the run)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def test_the_advice_after_ctrl_c_and_for_an_unfinished_run_works(packed, tmp_path):
    run = tmp_path / "run"
    argv = demo_args("ft_lits.yaml", packed["lits"], run, "data.batch_size=2", "train.epochs=2")
    argv += ["--set", "train.checkpoint_minutes=1e-9"]  # last.pt after every step

    command = [sys.executable, "-m", "xdtrain.train", *argv]
    proc = subprocess.Popen(
        [*command, "--force"], stderr=subprocess.PIPE, text=True, preexec_fn=_interruptible
    )
    deadline = time.monotonic() + 120
    # the first checkpoint (after the first step): the interrupt lands with most of the run
    # still to go (waiting for the first train row, written at the epoch's end, left a
    # loaded machine the time to finish the run first)
    while time.monotonic() < deadline and not (run / "last.pt").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted:")
    assert "rerun the same command with --resume in place of --force" in line, line
    # xd-eval on the unfinished run: its advice names --checkpoint last
    with pytest.raises(UserError, match="try --checkpoint last"):
        eval_main([str(run)])
    assert eval_main([str(run), "--checkpoint", "last"]) == 0
    # following the Ctrl-C advice finishes the run
    assert subprocess.run([*command, "--resume"], capture_output=True).returncode == 0
    assert len(rows(run, "test")) == 1 and [r["epoch"] for r in rows(run, "val")][-1] == 2
