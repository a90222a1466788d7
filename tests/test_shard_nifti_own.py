"""xd-shard --dataset nifti: a research export of NIfTI volumes, whatever their orientation,
split by patient folder, labelled by folder or file, with no folder name written."""

from __future__ import annotations

import json
import os
import re

import nibabel as nib
import numpy as np
import pytest

from xdtrain.errors import UserError
from xdtrain.shards import manifest as manifest_mod
from xdtrain.shards.base import decode_png
from xdtrain.shards.cli import main
from xdtrain.shards.pseudonyms import KEY_ENV, Pseudonyms, load_key
from xdtrain.shards.tar import read_samples
from xdtrain.synth import dicom as synth

LPS = np.diag([-1.0, -1.0, 2.5, 1.0])  # voxel axes to the patient's left, posterior, superior


def volume(patient: int) -> tuple[np.ndarray, str]:
    """A generated CT series as an x, y, z (LPS) array, and its region."""
    hu, region = synth.series_hu("small", 0, patient, 0)  # [slices, rows, columns]
    return np.ascontiguousarray(hu.transpose(2, 1, 0)), region


def write(path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.int16), affine), path)


@pytest.fixture
def export(tmp_path):
    """Six patients named like people, each one volume; two stored RAS (x and y reversed)."""
    src = tmp_path / "export"
    for patient in range(6):
        data, _ = volume(patient)
        folder = src / f"Doe{patient}_Jane" / "CT_abdomen"
        if patient % 3 == 0:  # the same voxels stored RAS: canonical LPS must undo it
            ras = LPS @ np.diag([-1.0, -1.0, 1.0, 1.0])
            ras[:3, 3] = [-(data.shape[0] - 1) * -1.0, -(data.shape[1] - 1) * -1.0, 0]
            write(folder / "scan.nii.gz", data[::-1, ::-1, :], ras)
        else:
            write(folder / "scan.nii.gz", data, LPS)
    return src


def pack(src, out, *extra) -> dict:
    argv = ["--dataset", "nifti", "--src", str(src), "--out", str(out), "--quiet", "--workers", "1"]
    assert main([*argv, "--size", "64", "--windows=-1024,3071", "--bits", "16", *extra]) == 0
    return manifest_mod.load(out)


def samples(out) -> dict[str, dict]:
    found = {}
    for shard in sorted(out.glob("*.tar")):
        for key, parts in read_samples(shard):
            found[key] = parts
    return found


def test_orientations_agree_and_values_are_the_voxels(export, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "PatientID,label\n" + "".join(f"Doe{p}_Jane,{volume(p)[1]}\n" for p in range(6))
    )
    manifest = pack(export, tmp_path / "out", "--labels", str(labels), "--splits", "0.5,0.25,0.25")
    assert manifest["preprocessing"]["orientation"]["reoriented"] == 2
    names = Pseudonyms(load_key(os.environ[KEY_ENV]))
    truth = {names.patient(f"Doe{p}_Jane"): volume(p) for p in range(6)}
    found = samples(tmp_path / "out")
    assert len(found) == sum(v[0].shape[2] for v in truth.values())
    for parts in found.values():
        meta = json.loads(parts["json"])
        data, region = truth[meta["patient"]]
        expected = data[:, :, meta["slice"]].T  # rows posterior-ward, columns leftward
        image = decode_png(parts["img.png"]).astype(np.float64) / 65535 * (3071 + 1024) - 1024
        np.testing.assert_allclose(image, expected, atol=0.04)  # one 16-bit step is 0.06 HU
        assert manifest["classes"][int(np.frombuffer(parts["label.i64"], "<i8")[0])] == region
        assert meta["slices"] == data.shape[2]
    text = (tmp_path / "out" / "manifest.json").read_text()
    assert "Doe" not in text and "Jane" not in text  # folder names are identifiers


def test_patients_by_folder_or_file_and_bad_volumes(export, tmp_path, capsys):
    # a second volume of patient 0 stays with that patient; a 4-D file is skipped, named
    data, _ = volume(0)
    write(export / "Doe0_Jane" / "second" / "scan.nii.gz", data, LPS)
    write(export / "Doe1_Jane" / "dwi.nii.gz", np.zeros((4, 4, 4, 3)), LPS)
    manifest = pack(export, tmp_path / "a")
    assert manifest["classes"] == []  # no --labels: packed for SimCLR
    assert manifest["preprocessing"]["labels"] == {"kind": "none"}
    (skip,) = manifest["skipped"]
    # named by pseudonyms (patient/volume): file names hold names and dates as often as
    # folders do; xd-shard locate gives the file back to the key's holder
    assert re.fullmatch(r"P[0-9a-f]{12}/S[0-9a-f]{12}\.nii\.gz", skip["input"]), skip
    assert "4-D" in skip["reason"] and "dwi" not in json.dumps(manifest)
    assert "Doe" not in json.dumps(manifest)
    argv = ["locate", "--src", str(export), skip["input"]]
    assert main(argv) == 0
    assert capsys.readouterr().out.split("\t")[-1].strip() == "Doe1_Jane/dwi.nii.gz"
    by_patient = {}
    for parts in samples(tmp_path / "a").values():
        meta = json.loads(parts["json"])
        by_patient.setdefault(meta["patient"], set()).add(meta["series"])
        assert int(np.frombuffer(parts["label.i64"], "<i8")[0]) == -1
    assert len(by_patient) == 6 and sorted(len(s) for s in by_patient.values())[-1] == 2
    manifest = pack(export, tmp_path / "b", "--patient-from", "file")
    patients = sum(entry["patients"] for entry in manifest["splits"].values())
    assert patients == 7  # each file its own patient, though all are called scan.nii.gz
    with pytest.raises(UserError, match="pass CT or MR"):
        pack(export, tmp_path / "c", "--modalities", "CT,MR")
