from __future__ import annotations

import os
import sys

import pytest

from xdtrain import fileio
from xdtrain.errors import Interrupted, UserError, run_cli
from xdtrain.progress import make_progress
from xdtrain.synth import generate


def test_atomic_write_creates_parents_and_normal_mode(tmp_path):
    path = fileio.atomic_write(tmp_path / "a" / "b.txt", "hello")
    assert path.read_text() == "hello"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    fileio.atomic_write(path, b"\x00bytes", fsync=False)
    assert path.read_bytes() == b"\x00bytes"
    assert [p.name for p in path.parent.iterdir()] == ["b.txt"]


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = fileio.atomic_write(tmp_path / "x.yaml", "old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", broken_replace)
    with pytest.raises(OSError):
        fileio.atomic_write(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.yaml"]


def test_run_cli_turns_errors_into_exit_codes(capsys):
    def fails(argv):
        raise UserError("data.yaml: something is off; do this")

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_cli(fails, []) == 2
    assert capsys.readouterr().err == "error: data.yaml: something is off; do this\n"
    assert run_cli(interrupted, []) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err

    def told(argv):  # a command that knows what continues it says so
        raise Interrupted("run/: rerun with --resume")

    assert run_cli(told, []) == 130
    assert capsys.readouterr().err == "interrupted: run/: rerun with --resume\n"

    def quiet(argv):  # another rank says it
        raise Interrupted("run/: rerun with --resume", quiet=True)

    assert run_cli(quiet, []) == 130
    assert capsys.readouterr().err == ""
    assert run_cli(lambda argv: None, []) == 0
    assert run_cli(lambda argv: 3, []) == 3


def test_progress_reports_rate_on_stderr(capsys):
    with make_progress() as progress:
        task = progress.add_task("items", total=3)
        for _ in range(3):
            progress.advance(task)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "3/3" in captured.err and "it/s" in captured.err
    with make_progress(enabled=False) as progress:
        progress.add_task("hidden", total=1)
    assert capsys.readouterr().err == ""


def test_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="check --out"):
        generate("lits-nifti", blocker, count=1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_start_writeback_asks_the_kernel_and_reports_refusals(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"x" * 100_000)
    fd = os.open(path, os.O_RDWR)
    try:
        assert fileio.start_writeback(fd, 0, 100_000) is True
    finally:
        os.close(fd)
    assert fileio.start_writeback(fd, 0, 100_000) is False  # a closed descriptor
    assert path.read_bytes() == b"x" * 100_000
