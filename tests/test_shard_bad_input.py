"""Bad inputs: clear one-line errors, or skipped and listed with the reason; --strict stops."""

from __future__ import annotations

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest

from xdtrain.errors import UserError, run_cli
from xdtrain.shards import manifest as manifest_mod
from xdtrain.shards.cli import main
from xdtrain.synth import brats as synth_brats
from xdtrain.synth import generate


def copy(raw, name, tmp_path):
    return shutil.copytree(raw / name, tmp_path / name)


def pack(dataset, src, out, *extra):
    return main(
        [
            "--dataset",
            dataset,
            "--src",
            str(src),
            "--out",
            str(out),
            "--quiet",
            "--workers",
            "1",
            *extra,
        ]
    )


def reasons(out) -> dict[str, str]:
    return {s["input"]: s["reason"] for s in manifest_mod.load(out)["skipped"]}


def test_corrupt_and_truncated_jpegs_are_skipped_and_listed(raw, tmp_path):
    src = copy(raw, "imagenet", tmp_path)
    train = sorted((src / "ILSVRC/Data/CLS-LOC/train/n01491361").iterdir())
    train[0].write_bytes(b"this is not a JPEG at all")
    data = train[1].read_bytes()
    train[2].write_bytes(data[: len(data) // 2])  # truncated
    assert pack("imagenet", src, tmp_path / "out") == 0
    found = reasons(tmp_path / "out")
    assert set(found) == {str(p.relative_to(src)) for p in (train[0], train[2])}
    assert all(r.startswith("cannot decode image") for r in found.values())
    total = sum(e["samples"] for e in manifest_mod.load(tmp_path / "out")["splits"].values())
    assert total == len(list(src.rglob("*.JPEG"))) - 2


def test_strict_stops_at_the_first_bad_input(raw, tmp_path, capsys):
    src = copy(raw, "imagenet", tmp_path)
    bad = next((src / "ILSVRC/Data/CLS-LOC/train/n01491361").iterdir())
    bad.write_bytes(b"garbage")
    argv = [
        "--dataset",
        "imagenet",
        "--src",
        str(src),
        "--out",
        str(tmp_path / "out"),
        "--quiet",
        "--workers",
        "1",
        "--strict",
    ]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and bad.name in err and "--strict" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_imagenet_labels_without_images_and_images_without_labels(raw, tmp_path):
    src = copy(raw, "imagenet", tmp_path)
    val = sorted((src / "ILSVRC/Data/CLS-LOC/val").iterdir())
    val[0].unlink()
    shutil.copy(val[1], val[1].with_name("ILSVRC2012_val_99999999.JPEG"))
    assert pack("imagenet", src, tmp_path / "out") == 0
    found = reasons(tmp_path / "out")
    assert found[f"LOC_val_solution.csv:{val[0].stem}"] == "listed but no image file"
    assert found["ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_99999999.JPEG"] == (
        "no row in LOC_val_solution.csv"
    )


def test_chestxray8_rows_without_images_and_images_without_rows(raw, tmp_path):
    src = copy(raw, "chestxray8", tmp_path)
    images = sorted(src.glob("images_*/images/*.png"))
    images[3].unlink()
    shutil.copy(images[4], images[4].with_name("99999999_000.png"))
    assert pack("chestxray8", src, tmp_path / "out", "--size", "32") == 0
    found = reasons(tmp_path / "out")
    assert any(r == f"{images[3].name}: listed but no image file" for r in found.values())
    stray = str(images[4].with_name("99999999_000.png").relative_to(src))
    assert found[stray] == "image without a row in Data_Entry_2017.csv"


def _case_dir(src, number):
    return src / synth_brats.ROOT / synth_brats.case_id(number)


def test_brats_unreadable_mismatched_and_missing_volumes(raw, tmp_path):
    src = copy(raw, "brats", tmp_path)
    one, two, three = (_case_dir(src, n) for n in (1, 2, 3))
    (one / f"{one.name}_t1.nii.gz").write_bytes(gzip.compress(b"not a nifti"))
    t2 = nib.load(two / f"{two.name}_t2.nii.gz")
    cropped = nib.Nifti1Image(np.asarray(t2.dataobj)[:-4], t2.affine)
    nib.save(cropped, tmp_path / "t2.nii.gz")
    shutil.move(tmp_path / "t2.nii.gz", two / f"{two.name}_t2.nii.gz")
    (three / f"{three.name}_flair.nii.gz").unlink()
    # Headers are read at scan time: every case is skipped before any is encoded, and the
    # error names the first reason.
    with pytest.raises(UserError, match=r"all 3 brats input\(s\) were skipped \(first: .*_001"):
        pack("brats", src, tmp_path / "out")
    # With good cases beside them, the run goes through and lists the bad ones.
    more = generate("brats", tmp_path / "more", count=6) / synth_brats.ROOT
    for number in (4, 5):
        shutil.copytree(more / synth_brats.case_id(number), _case_dir(src, number))
    assert pack("brats", src, tmp_path / "out") == 0
    found = reasons(tmp_path / "out")
    assert found[str(three.relative_to(src))] == "missing flair NIfTI file(s)"
    assert found[str(one.relative_to(src))].startswith("unreadable t1 NIfTI")
    assert found[str(two.relative_to(src))].startswith("volumes of different shapes")
    assert len(found) == 3


def test_lits_missing_segmentation_and_corrupt_volume(raw, tmp_path):
    src = copy(raw, "lits-nifti", tmp_path)
    (src / "segmentation-0.nii").unlink()
    (src / "volume-1.nii").write_bytes(b"\0" * 400)
    assert pack("lits", src, tmp_path / "out") == 0
    found = reasons(tmp_path / "out")
    assert found["volume-0.nii"] == "no matching segmentation file"
    assert found["volume-1.nii"].startswith("unreadable volume NIfTI volume-1.nii")


@pytest.mark.parametrize(
    ("dataset", "make", "message"),
    [
        ("brats", lambda p: p.mkdir(), "no BraTS20_Training_* case folders found"),
        ("lits", lambda p: p.mkdir(), "no LiTS volume-N.nii or volume-N_K.png files"),
        ("imagenet", lambda p: p.mkdir(), "LOC_synset_mapping.txt: not found"),
        ("chestxray8", lambda p: p.mkdir(), "Data_Entry_2017.csv: not found"),
        ("brats", lambda p: None, "source folder not found"),
    ],
)
def test_empty_or_wrong_src_is_one_line(tmp_path, capsys, dataset, make, message):
    src = tmp_path / "src"
    make(src)
    argv = ["--dataset", dataset, "--src", str(src), "--out", str(tmp_path / "o"), "--quiet"]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and str(src) in err


def test_src_of_another_data_set(raw, tmp_path, capsys):
    argv = ["--dataset", "brats", "--src", str(raw / "lits"), "--out", str(tmp_path), "--quiet"]
    assert run_cli(main, argv) == 2
    assert "no BraTS20_Training_* case folders" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--splits", "0.5,0.5"], "--splits 0.5,0.5: expected 3"),
        (["--splits", "a,b,c"], "expected numbers"),
        (["--fractions", "0.005"], "whole percentage"),
        (["--shard-size", "lots"], "--shard-size lots"),
        (["--shard-size", "10"], "too small"),
        (["--clip", "99,1"], "--clip 99,1"),
        (["--slices", "liver"], "BraTS keeps"),
        (["--workers", "0"], "--workers must be at least 1"),
    ],
)
def test_bad_options_are_one_line(raw, tmp_path, capsys, extra, message):
    argv = ["--dataset", "brats", "--src", str(raw / "brats"), "--out", str(tmp_path), "--quiet"]
    assert run_cli(main, argv + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_verify_finds_damage_and_info_prints_the_table(packed, tmp_path, capsys):
    folder = shutil.copytree(packed["lits"], tmp_path / "copy")
    assert run_cli(main, ["verify", str(folder)]) == 0
    assert "match the manifest" in capsys.readouterr().out
    shards = sorted(folder.glob("*.tar"))
    data = bytearray(shards[0].read_bytes())
    data[600] ^= 0xFF
    shards[0].write_bytes(bytes(data))
    shards[1].with_suffix(".idx").unlink()
    assert run_cli(main, ["verify", str(folder)]) == 1
    err = capsys.readouterr().err
    assert (
        f"{shards[0]}: sha256 differs" in err and f"{shards[1].with_suffix('.idx')}: missing" in err
    )
    assert run_cli(main, ["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "tumour" in out
    assert run_cli(main, ["info", str(tmp_path)]) == 2
    assert "no manifest" in capsys.readouterr().err


def test_lits_window_option(raw, tmp_path, capsys):
    src = str(raw / "lits-nifti")
    argv = ["--dataset", "lits", "--src", src, "--quiet", "--workers", "1"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--window=-100,200"]) == 0
    assert manifest_mod.load(tmp_path / "a")["preprocessing"]["window_hu"] == [-100.0, 200.0]
    assert run_cli(main, [*argv, "--out", str(tmp_path / "b"), "--window=5,1"]) == 2
    assert capsys.readouterr().err == "error: --window 5,1: low must be below high\n"
    assert run_cli(main, [*argv, "--out", str(tmp_path / "c"), "--slices", "brain"]) == 2
    assert "LiTS keeps 'liver', 'all' slices" in capsys.readouterr().err
