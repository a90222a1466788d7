from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from xdtrain import synth
from xdtrain.errors import UserError, run_cli
from xdtrain.synth import GENERATORS, generate
from xdtrain.synth.cli import main


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("name", list(GENERATORS))
def test_same_seed_same_bytes(tmp_path, name):
    a = generate(name, tmp_path / "a", count=2, seed=3)
    b = generate(name, tmp_path / "b", count=2, seed=3, workers=2)
    c = generate(name, tmp_path / "c", count=2, seed=4)
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def test_killed_run_resumes_without_redoing_items(tmp_path, monkeypatch):
    reference = digest(generate("brats", tmp_path / "ref", count=4))
    real_render = synth.brats.render
    rendered = []

    def dying_render(job, size, seed):
        if len(rendered) == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the third case
        rendered.append(job.key)
        return real_render(job, size, seed)

    monkeypatch.setattr(synth.brats, "render", dying_render)
    with pytest.raises(KeyboardInterrupt):
        generate("brats", tmp_path / "out", count=4)
    assert not (tmp_path / "out/brats").exists()  # nothing looks complete
    assert (tmp_path / "out/.brats.partial").is_dir()
    # A file the killed run was writing when it died.
    (tmp_path / "out/.brats.partial/.half.nii.gz.x1y2.tmp").write_bytes(b"half")

    monkeypatch.setattr(
        synth.brats,
        "render",
        lambda job, size, seed: (rendered.append(job.key), real_render(job, size, seed))[1],
    )
    folder = generate("brats", tmp_path / "out", count=4)
    assert rendered == [
        "BraTS20_Training_001",
        "BraTS20_Training_002",
        "BraTS20_Training_003",
        "BraTS20_Training_004",
    ]
    assert digest(folder) == reference
    assert not (tmp_path / "out/.brats.partial").exists()


def test_partial_folder_from_other_settings_is_discarded(tmp_path, monkeypatch):
    def dying_render(job, size, seed):
        raise KeyboardInterrupt

    monkeypatch.setattr(
        synth.lits.Release, "render", lambda self, job, size, seed: dying_render(job, size, seed)
    )
    with pytest.raises(KeyboardInterrupt):
        generate("lits-nifti", tmp_path, count=2, seed=1)
    monkeypatch.undo()
    folder = generate("lits-nifti", tmp_path, count=2, seed=2)
    assert digest(folder) == digest(generate("lits-nifti", tmp_path / "ref", count=2, seed=2))


def test_finished_data_set_is_kept_or_refused(tmp_path):
    folder = generate("lits-nifti", tmp_path, count=1)
    stamp = (folder / "volume-0.nii").stat().st_mtime_ns
    assert generate("lits-nifti", tmp_path, count=1) == folder
    assert (folder / "volume-0.nii").stat().st_mtime_ns == stamp  # not rewritten
    with pytest.raises(UserError, match="--force"):
        generate("lits-nifti", tmp_path, count=2)
    generate("lits-nifti", tmp_path, count=2, force=True)
    assert (folder / "volume-1.nii").is_file()


def test_foreign_folder_is_not_overwritten(tmp_path):
    (tmp_path / "brats").mkdir()
    (tmp_path / "brats" / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="not written by xd-synth"):
        generate("brats", tmp_path, count=1)
    assert (tmp_path / "brats" / "mine.txt").read_text() == "keep"


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="unknown data set"):
        generate("mnist", tmp_path)
    with pytest.raises(UserError, match="--count must be at least 1"):
        generate("brats", tmp_path, count=0)


def test_cli_all_writes_every_layout(tmp_path, capsys):
    assert main(["all", "--out", str(tmp_path), "--count", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / name) for name in GENERATORS]
    assert (tmp_path / "imagenet/LOC_synset_mapping.txt").is_file()
    assert (tmp_path / "chestxray8/Data_Entry_2017.csv").is_file()
    assert (tmp_path / "brats/MICCAI_BraTS2020_TrainingData").is_dir()
    assert (tmp_path / "lits/dataset_6/dataset_6/volume-0_0.png").is_file()
    assert (tmp_path / "lits-nifti/volume-0.nii").is_file()


def test_cli_error_is_one_line(tmp_path, capsys):
    assert run_cli(main, ["brats", "--out", str(tmp_path), "--count", "0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --count must be at least 1, got 0\n"


def test_console_script_is_installed(tmp_path):
    script = Path(sys.executable).with_name("xd-synth")
    done = subprocess.run(
        [str(script), "lits-nifti", "--out", str(tmp_path), "--count", "1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "lits-nifti")


def test_cli_summary_table_on_stderr(tmp_path, capsys):
    assert main(["lits-nifti", "--out", str(tmp_path), "--count", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(tmp_path / "lits-nifti")
    row = next(line for line in captured.err.splitlines() if "lits-nifti" in line and "│" in line)
    assert row.split("│")[3].strip() == "4"  # two volumes, two segmentations
