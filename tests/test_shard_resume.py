"""Same inputs, same bytes; a killed run, rerun, finishes with exactly those bytes."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import fail_at_close

from xdtrain.errors import UserError
from xdtrain.shards import manifest as manifest_mod
from xdtrain.shards.cli import main
from xdtrain.shards.pack import STATE
from xdtrain.synth import generate

XD_SHARD = str(Path(sys.executable).with_name("xd-shard"))


def digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def test_same_inputs_and_seed_give_identical_shards(raw, tmp_path):
    args = ["--dataset", "lits", "--src", str(raw / "lits"), "--shard-size", "20KB", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a"), "--workers", "1"]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--workers", "2"]) == 0
    assert main([*args, "--out", str(tmp_path / "c"), "--workers", "1", "--seed", "1"]) == 0
    a, b, c = (digests(tmp_path / n) for n in "abc")
    assert a == b  # manifest included: it holds no time stamps or worker counts
    assert a != c


def _kill_when(command: list[str], ready, timeout: float = 60.0) -> None:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert process.poll() is None, "the run finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()


def _finished_shards(out: Path) -> int:
    try:
        state = json.loads((out / STATE).read_text())
    except (OSError, ValueError):
        return 0
    return sum(len(g["shards"]) for g in state["groups"].values())


def test_sigkill_halfway_then_rerun_is_byte_identical(tmp_path):
    src = generate("imagenet", tmp_path / "raw", count=30)
    args = [
        "--dataset",
        "imagenet",
        "--src",
        str(src),
        "--shard-size",
        "4KB",
        "--workers",
        "1",
        "--quiet",
    ]
    reference = tmp_path / "reference"
    assert main([*args, "--out", str(reference)]) == 0
    total = sum(len(e["shards"]) for e in manifest_mod.load(reference)["splits"].values())
    assert total > 100

    out = tmp_path / "out"
    _kill_when([XD_SHARD, *args, "--out", str(out)], lambda: _finished_shards(out) >= total // 3)
    assert not (out / "manifest.json").exists()  # nothing looks complete
    done_before = _finished_shards(out)
    assert 0 < done_before < total
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}

    assert main([*args, "--out", str(out)]) == 0
    assert digests(out) == digests(reference)
    rewritten = [n for n, t in finished.items() if (out / n).stat().st_mtime_ns != t]
    assert len(rewritten) <= 1  # at most the shard renamed just before the kill was recorded


def test_sigkill_while_spooling_volumes_then_rerun_is_byte_identical(tmp_path):
    src = generate("brats", tmp_path / "raw", count=8)  # enough cases to be killed among
    args = [
        "--dataset",
        "brats",
        "--src",
        str(src),
        "--shard-size",
        "40KB",
        "--workers",
        "1",
        "--quiet",
    ]
    assert main([*args, "--out", str(tmp_path / "reference")]) == 0
    out = tmp_path / "out"
    spool = out / ".spool"
    _kill_when(
        [XD_SHARD, *args, "--out", str(out)],
        lambda: len(list(spool.glob("*.json"))) >= 1 if spool.is_dir() else False,
    )
    assert not (out / "manifest.json").exists()
    assert main([*args, "--out", str(out)]) == 0
    assert digests(out) == digests(tmp_path / "reference")


def test_rerun_of_a_finished_folder_and_other_arguments(raw, tmp_path):
    args = [
        "--dataset",
        "lits",
        "--src",
        str(raw / "lits-nifti"),
        "--out",
        str(tmp_path),
        "--quiet",
        "--workers",
        "1",
    ]
    assert main(args) == 0
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert main(args) == 0  # up to date: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    with pytest.raises(UserError, match="--force"):
        main([*args, "--seed", "5"])
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):  # not xd-shard's: never touched
        main([*args, "--seed", "5", "--force"])
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "notes.txt").unlink()
    assert main([*args, "--seed", "5", "--force"]) == 0
    assert manifest_mod.load(tmp_path)["seed"] == 5


def test_a_shard_that_fails_to_close_stops_the_records_after_it(raw, tmp_path, monkeypatch):
    """Shards are closed (fsync, rename) on a helper thread while the next is written: a
    failure there surfaces in the run, nothing after it is recorded, and a rerun finishes
    with the bytes of an uninterrupted run."""
    from xdtrain.shards import tar

    args = ["--dataset", "imagenet", "--src", str(raw / "imagenet"), "--shard-size", "20KB"]
    args += ["--quiet", "--workers", "1"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    closed, failed, real_close = [], [], tar.ShardWriter.close

    def failing_close(self):
        if len(closed) == 3:
            failed.append(self.path.name)
            raise OSError(28, "No space left on device")
        closed.append(self.path.name)
        return real_close(self)

    monkeypatch.setattr(tar.ShardWriter, "close", failing_close)
    out = tmp_path / "broken"
    with pytest.raises(OSError, match="No space left"):
        main([*args, "--out", str(out)])
    state = json.loads((out / STATE).read_text())
    recorded = [s["name"] for g in state["groups"].values() for s in g["shards"]]
    assert recorded == closed  # every closed shard, in order, and nothing after the failure
    assert state["groups"][failed[0].rpartition("-")[0]]["done"] is False
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(tar.ShardWriter, "close", real_close)
    assert main([*args, "--out", str(out)]) == 0
    assert digests(out) == digests(tmp_path / "whole")


def _interrupted(raw, out: Path, monkeypatch, shards_before_failure: int, *extra: str) -> list[str]:
    """Pack ImageNet into ``out`` until the close of a shard fails; the recorded shards."""
    from xdtrain.shards import tar

    real_close = tar.ShardWriter.close
    closed = fail_at_close(monkeypatch, shards_before_failure)
    with pytest.raises(OSError):
        main(imagenet_args(raw) + ["--out", str(out), *extra])
    monkeypatch.setattr(tar.ShardWriter, "close", real_close)
    return closed


def imagenet_args(raw) -> list[str]:
    args = ["--dataset", "imagenet", "--src", str(raw / "imagenet"), "--shard-size", "20KB"]
    return [*args, "--quiet", "--workers", "1"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda shard: shard.write_bytes(shard.read_bytes()[:-1024]),  # the tail never written
        lambda shard: shard.write_bytes(bytes(shard.stat().st_size)),  # written back as zeros
        lambda shard: shard.with_suffix(".idx").unlink(),  # the index lost
    ],
    ids=["truncated", "zeroed", "index-lost"],
)
def test_a_rerun_repacks_recorded_shards_that_a_power_cut_damaged(
    raw, tmp_path, monkeypatch, caplog, damage
):
    """With --no-fsync a power cut can lose recorded shards: the rerun checks them all."""
    assert main(imagenet_args(raw) + ["--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "cut"
    recorded = _interrupted(raw, out, monkeypatch, 4, "--no-fsync")
    state = json.loads((out / STATE).read_text())
    assert not any(s["durable"] for g in state["groups"].values() for s in g["shards"])
    damage(out / recorded[1])
    assert main(imagenet_args(raw) + ["--out", str(out), "--no-fsync"]) == 0
    assert digests(out) == digests(tmp_path / "whole")
    assert f"{recorded[1]}: " in caplog.text and "packing" in caplog.text


def test_shards_are_fsynced_unless_no_fsync_is_asked(raw, tmp_path, monkeypatch):
    import os

    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
    assert main(imagenet_args(raw) + ["--out", str(tmp_path / "durable")]) == 0
    shards = json.loads((tmp_path / "durable" / "manifest.json").read_text())
    count = sum(len(s["shards"]) for s in shards["splits"].values())
    assert len(calls) >= 3 * count  # shard, index and state file per shard, then the manifest
    calls.clear()
    assert main(imagenet_args(raw) + ["--out", str(tmp_path / "kernel"), "--no-fsync"]) == 0
    assert calls == []  # write-back left to the kernel, as tar leaves it
    assert digests(tmp_path / "kernel") == digests(tmp_path / "durable")


def test_a_rerun_checks_fsynced_shards_for_size_and_index_only(raw, tmp_path, monkeypatch):
    assert main(imagenet_args(raw) + ["--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "cut"
    recorded = _interrupted(raw, out, monkeypatch, 4)
    state = json.loads((out / STATE).read_text())
    assert all(s["durable"] for g in state["groups"].values() for s in g["shards"])
    (out / recorded[2]).write_bytes((out / recorded[2]).read_bytes()[:-512])
    (out / recorded[0]).with_suffix(".idx").unlink()
    assert main(imagenet_args(raw) + ["--out", str(out)]) == 0
    assert digests(out) == digests(tmp_path / "whole")
