"""xd-shard --dataset dicom on a generated hospital export: what is packed, what is left out
and why, the selection and label options, bad input by kind, resume, MR, and the loader."""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from test_shard_resume import XD_SHARD, _kill_when, digests

from xdtrain.errors import UserError
from xdtrain.shards import manifest as manifest_mod
from xdtrain.shards.base import decode_png
from xdtrain.shards.cli import main
from xdtrain.shards.pseudonyms import KEY_ENV, Pseudonyms, load_key
from xdtrain.shards.tar import read_samples
from xdtrain.synth import dicom as synth
from xdtrain.synth import generate

COUNT = 7  # patients 0-6: every quirk of the generator


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return generate("dicom", tmp_path_factory.mktemp("ct"), size="small", seed=0, count=COUNT)


def pack(src: Path, out: Path, *extra: str) -> dict:
    argv = ["--dataset", "dicom", "--src", str(src), "--out", str(out), "--quiet"]
    assert main([*argv, "--workers", "1", "--size", "32", "--shard-size", "40KB", *extra]) == 0
    return manifest_mod.load(out)


def samples_of(out: Path) -> dict[str, dict]:
    found = {}
    for shard in sorted(out.glob("*.tar")):
        split = shard.name.split("-")[0]
        for key, parts in read_samples(shard):
            found[key] = parts | {"split": split}
    return found


def headers(src: Path) -> dict[str, pydicom.Dataset]:
    """Every CT image header of the export (independently of the packer), by path."""
    out = {}
    for path in sorted(src.rglob("*")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if getattr(ds, "Modality", "") == "CT" and "LOCALIZER" not in list(ds.ImageType or []):
            out[str(path)] = ds
    return out


@pytest.fixture(scope="module")
def packed(export, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "ct"
    pack(export, out, "--labels", str(export / "labels.csv"))
    return out


def test_quirks_are_packed_or_counted(export, packed):
    manifest = manifest_mod.load(packed)
    decisions = {d["decision"]: d["count"] for d in manifest["decisions"]}
    assert decisions["left out: DICOMDIR files"] == 1
    assert decisions["left out: non-DICOM files"] == 3  # README.txt, labels.csv, the marker
    assert decisions["left out: localizer (scout) images"] == 1
    assert decisions["left out: files repeating a SOPInstanceUID already read"] == 1
    for modality in ("SR", "PR", "RTSTRUCT"):
        assert decisions[f"left out: non-image or other objects ({modality})"] == 1
    assert decisions["series split"] == 1  # the missing slice
    assert decisions["series without a labels row"] == 0
    assert manifest["skipped"] == []
    # every slice of every series, but the missing one
    expected = 0
    for patient in range(COUNT):
        for study in range(synth.studies_of(patient)):
            expected += synth.series_hu("small", 0, patient, study)[0].shape[0]
    expected -= 1
    assert sum(s["samples"] for s in manifest["splits"].values()) == expected
    assert manifest["classes"] == synth.CLASSES
    assert manifest["preprocessing"]["labels"]["kind"] == "single-label"


def test_labels_follow_the_csv_and_patients_stay_in_one_split(export, packed):
    names = Pseudonyms(load_key(Path(os.environ[KEY_ENV])))
    with open(export / "labels.csv") as fh:
        region = {row["PatientID"]: row["label"] for row in csv.DictReader(fh)}
    by_pseudonym = {names.patient(pid): label for pid, label in region.items()}
    splits = defaultdict(set)
    series_depth = {}
    seen = defaultdict(list)
    for key, parts in samples_of(packed).items():
        meta = json.loads(parts["json"])
        label = int(np.frombuffer(parts["label.i64"], "<i8")[0])
        assert synth.CLASSES[label] == by_pseudonym[meta["patient"]], key
        splits[meta["patient"]].add(parts["split"])
        series_depth[meta["series"]] = meta["slices"]
        seen[meta["series"]].append(meta["slice"])
        assert key == f"{meta['series']}_{meta['slice']:03d}"
        assert set(meta) == {"patient", "series", "slice", "slices", "modality", "spacing_mm"}
        assert decode_png(parts["img.png"]).shape == (32, 32)
    assert all(len(s) == 1 for s in splits.values())
    assert len(splits) == COUNT
    for series, indices in seen.items():  # every slice of every part, once
        assert sorted(indices) == list(range(series_depth[series])), series


def test_selection_options(export, tmp_path):
    manifest = pack(export, tmp_path / "a", "--slice-stride", "2", "--slices-per-series", "4")
    record = manifest["preprocessing"]["selection"]
    found = samples_of(tmp_path / "a")
    per_series = Counter(json.loads(p["json"])["series"] for p in found.values())
    assert max(per_series.values()) == 4 and record["slices_kept"] == len(found)
    assert all(json.loads(p["json"])["slice"] % 2 == 0 for p in found.values())

    manifest = pack(export, tmp_path / "b", "--max-samples", "50")
    found = samples_of(tmp_path / "b")
    assert len(found) == 50 == manifest["preprocessing"]["selection"]["slices_kept"]
    per_patient = Counter(json.loads(p["json"])["patient"] for p in found.values())
    assert len(per_patient) == COUNT and max(per_patient.values()) - min(per_patient.values()) <= 1
    assert pack(export, tmp_path / "c", "--max-samples", "50")  # same seed, same subset
    assert digests(tmp_path / "b") == digests(tmp_path / "c")


def test_multilabel_and_file_level_labels(export, tmp_path):
    cts = headers(export)
    patients = sorted({ds.PatientID for ds in cts.values()})
    table = tmp_path / "multi.csv"
    table.write_text(
        "PatientID,label\n"
        + "".join(
            f"{p},{'nodule|effusion' if i % 2 else 'effusion'}\n" for i, p in enumerate(patients)
        )
    )
    manifest = pack(export, tmp_path / "m", "--labels", str(table))
    assert manifest["classes"] == ["effusion", "nodule"]
    assert manifest["preprocessing"]["labels"]["kind"] == "multi-label"
    names = Pseudonyms(load_key(Path(os.environ[KEY_ENV])))
    wanted = {names.patient(p): [1, i % 2] for i, p in enumerate(patients)}
    for parts in samples_of(tmp_path / "m").values():
        assert "label.i64" not in parts
        assert list(parts["labels.u8"]) == wanted[json.loads(parts["json"])["patient"]]

    two = sorted(cts)[:2]  # slice-level rows: only these two slices are packed
    table = tmp_path / "files.csv"
    table.write_text(
        "file,label\n"
        + "".join(f"{Path(p).relative_to(export)},{c}\n" for p, c in zip(two, "ab", strict=False))
    )
    manifest = pack(export, tmp_path / "f", "--labels", str(table), "--splits", "1,0,0")
    assert sum(s["samples"] for s in manifest["splits"].values()) == 2
    assert manifest["preprocessing"]["labels"]["rows_used"] == 2


def _copy(export: Path, to: Path) -> Path:
    shutil.copytree(export, to)
    return to


def _series_files(src: Path) -> dict[str, list[Path]]:
    out = defaultdict(list)
    for path, ds in headers(src).items():
        out[ds.SeriesInstanceUID].append(Path(path))
    return {uid: sorted(files) for uid, files in sorted(out.items())}


def test_bad_input_is_skipped_by_kind_with_the_file_named(export, tmp_path):
    src = _copy(export, tmp_path / "src")
    series = [files for files in _series_files(src).values() if len(files) > 3]
    truncated = series[0][2]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size * 2 // 3])
    ds = pydicom.dcmread(series[1][1])  # one file of a series in a syntax nothing decodes
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2
    ds.PixelData = encapsulate([ds.PixelData])
    ds.save_as(series[1][1])
    (src / "junk").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(200))  # a broken header
    twin = pydicom.dcmread(series[2][0])  # a second slice at the same place, same acquisition
    twin.SOPInstanceUID = twin.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    twin.save_as(src / "TWIN")
    manifest = pack(src, tmp_path / "out", "--labels", str(src / "labels.csv"))
    reasons = {s["input"]: s["reason"] for s in manifest["skipped"]}
    cut = [r for r in reasons.values() if r.startswith(f"{truncated.relative_to(src)}: ")]
    assert len(cut) == 1 and "pixel data" in cut[0] and "the series is skipped" in cut[0]
    mpeg = [r for r in reasons.values() if "MPEG2" in r]
    assert len(mpeg) == 1 and "no pixel data decoder" in mpeg[0]
    assert "unreadable DICOM header" in reasons["junk"]
    assert any("two slices at one position" in r for r in reasons.values())
    kept = {json.loads(p["json"])["series"] for p in samples_of(tmp_path / "out").values()}
    assert len(kept) == len(_series_files(export)) - 3 + 1  # three skipped; the gap split in 2
    with pytest.raises(UserError, match="--strict"):
        main(
            [
                "--dataset",
                "dicom",
                "--src",
                str(src),
                "--out",
                str(tmp_path / "s"),
                "--strict",
                "--quiet",
            ]
        )


def test_sigkill_while_packing_then_rerun_is_byte_identical(export, tmp_path):
    args = ["--dataset", "dicom", "--src", str(export), "--size", "32", "--shard-size", "20KB"]
    args += ["--workers", "1", "--quiet", "--labels", str(export / "labels.csv")]
    assert main([*args, "--out", str(tmp_path / "reference")]) == 0
    out = tmp_path / "out"
    spool = out / ".spool"
    _kill_when(
        [XD_SHARD, *args, "--out", str(out)],
        lambda: len(list(spool.glob("*.json"))) >= 2 if spool.is_dir() else False,
    )
    assert not (out / "manifest.json").exists()
    assert main([*args, "--out", str(out)]) == 0
    assert digests(out) == digests(tmp_path / "reference")


def test_mr_series_are_windowed_by_their_own_percentiles(export, tmp_path):
    src = _copy(export, tmp_path / "src")
    files = next(iter(_series_files(src).values()))
    uid = pydicom.uid.generate_uid()
    for path in files:  # one CT series becomes MR (no HU)
        ds = pydicom.dcmread(path)
        ds.Modality, ds.SeriesInstanceUID = "MR", uid
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.save_as(path)
    manifest = pack(src, tmp_path / "ct")
    decisions = {d["decision"]: d["count"] for d in manifest["decisions"]}
    assert decisions["left out: MR images (not in --modalities)"] == len(files)
    # at the stored 64 px (no resampling), the series' own 0-100 % range spans 0-255
    pack(
        src, tmp_path / "both", "--modalities", "CT,MR", "--mr-percentiles", "0,100", "--size", "64"
    )
    mr = [
        p
        for p in samples_of(tmp_path / "both").values()
        if json.loads(p["json"])["modality"] == "MR"
    ]
    assert len(mr) == len(files)
    images = np.stack([decode_png(p["img.png"]) for p in mr])
    assert images.min() == 0 and images.max() == 255
    with pytest.raises(UserError, match="--modalities"):
        main(["--dataset", "dicom", "--src", str(src), "--modalities", "PET", "--quiet"])


def test_the_loader_reads_a_window_stack_as_three_greyscale_channels(export, tmp_path):
    from xdtrain.config import DataConfig
    from xdtrain.data import build_loader

    out = tmp_path / "ct"
    pack(
        export,
        out,
        "--labels",
        str(export / "labels.csv"),
        "--windows",
        "soft/lung/bone",
        "--bits",
        "16",
    )
    data = DataConfig(
        dataset="dicom",
        shards=str(out),
        image_size=32,
        channels=3,
        batch_size=4,
        workers=1,
        device="cpu",
        augment="study",  # ft_ct.yaml's: evaluation resizes the whole slice (no crop)
    )
    loader = build_loader(data, "test", train=False)
    assert loader.shardset.layout.greyscale and loader.shardset.layout.stored_channels == 3
    batch = next(iter(loader))
    stored = {k: decode_png(p["img.png"]) for k, p in samples_of(out).items()}
    for key, image in zip(batch["keys"], batch["image"], strict=True):
        expected = (stored[key].astype(np.float32) / 65535 - 0.5) / 0.25  # channels as windows
        np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), expected, atol=1e-4)
    assert batch["label"].dtype.is_floating_point is False


def test_a_series_uid_shared_by_two_patients_is_skipped_not_merged(export, tmp_path):
    """Merged, the second patient's slices would take the first's pseudonym and could land
    in another split than the rest of that patient."""
    src = _copy(export, tmp_path / "src")
    series = list(_series_files(src).values())
    first = pydicom.dcmread(series[0][0], stop_before_pixels=True)
    other = [f for f in series[1:] if pydicom.dcmread(f[0]).PatientID != first.PatientID][0]
    for path in other:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = first.SeriesInstanceUID
        ds.save_as(path)
    manifest = pack(src, tmp_path / "out")
    reasons = [s["reason"] for s in manifest["skipped"]]
    assert len(reasons) == 1 and "shared by 2 PatientIDs" in reasons[0]


def test_files_without_the_dicom_preamble_are_read(export, tmp_path):
    src = _copy(export, tmp_path / "src")
    plain = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # implicit, explicit little endian
    files = next(
        f
        for f in _series_files(src).values()
        if pydicom.dcmread(f[0], stop_before_pixels=True).file_meta.TransferSyntaxUID in plain
    )
    for path in files:  # as older PACS exports write them: no preamble, no DICM, no meta
        ds = pydicom.dcmread(path)
        del ds.file_meta
        ds.preamble = None
        ds.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)
        assert path.read_bytes()[128:132] != b"DICM"
    before = sum(e["samples"] for e in pack(export, tmp_path / "a")["splits"].values())
    after = sum(e["samples"] for e in pack(src, tmp_path / "b")["splits"].values())
    assert after == before


def test_headers_cut_short_are_listed_and_strict_stops(export, tmp_path):
    src = _copy(export, tmp_path / "src")
    victim = next(iter(_series_files(src).values()))[3]
    victim.write_bytes(victim.read_bytes()[:400])  # inside the header
    manifest = pack(src, tmp_path / "out")
    reasons = {s["input"]: s["reason"] for s in manifest["skipped"]}
    assert "cut short" in reasons[str(victim.relative_to(src))]
    with pytest.raises(UserError, match="--strict"):
        main(["--dataset", "dicom", "--src", str(src), "--out", str(tmp_path / "s"), "--strict"])


def test_labels_rows_by_normalised_path_and_rows_that_match_nothing(export, tmp_path):
    files = sorted(headers(export))[:3]
    spelled = [f"./{Path(files[0]).relative_to(export)}", files[1], f"{files[2]}"]
    table = tmp_path / "files.csv"
    table.write_text(
        "file,label\n" + "".join(f"{p},{c}\n" for p, c in zip(spelled, "abb", strict=True))
    )
    manifest = pack(export, tmp_path / "f", "--labels", str(table), "--splits", "1,0,0")
    assert sum(s["samples"] for s in manifest["splits"].values()) == 3
    decisions = {d["decision"]: d["count"] for d in manifest["decisions"]}
    assert decisions["labels rows matching nothing"] == 0
    nothing = tmp_path / "nothing.csv"
    nothing.write_text("PatientID,label\nX1,a\nX2,b\n")
    with pytest.raises(UserError, match="has a row in --labels"):
        pack(export, tmp_path / "n", "--labels", str(nothing))


def test_paths_written_hold_no_identifier_and_out_is_not_named_after_a_patient(export, tmp_path):
    ds = next(iter(headers(export).values()))
    family = str(ds.PatientName).split("^")[0]
    src = _copy(export, tmp_path / f"export_{ds.PatientID}")
    table = tmp_path / f"labels_{family}.csv"
    shutil.copy(export / "labels.csv", table)
    manifest = pack(src, tmp_path / "out", "--labels", str(table))
    text = json.dumps(manifest)
    assert ds.PatientID not in text and family not in text
    assert "export_[redacted]" in manifest["source"]
    with pytest.raises(UserError, match="--out: its path holds a name or ID"):
        pack(src, tmp_path / f"shards_{family}")


def test_bad_windows_and_key_files_are_one_line_errors(export, tmp_path):
    for windows in ("nan,inf", "-inf,inf"):
        with pytest.raises(UserError, match="--windows"):
            pack(export, tmp_path / "w", f"--windows={windows}")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot create the pseudonym key"):
        pack(export, tmp_path / "k", "--key-file", str(tmp_path / "file" / "key"))


def test_a_moved_key_packs_the_same_shards_and_another_key_is_named(export, tmp_path):
    key = Path(os.environ[KEY_ENV])
    moved = tmp_path / "keys" / "moved.key"
    moved.parent.mkdir()
    shutil.copy(key, moved)
    pack(export, tmp_path / "out", "--key-file", str(key))
    before = digests(tmp_path / "out")
    pack(export, tmp_path / "out", "--key-file", str(moved))  # up to date: nothing repacked
    assert digests(tmp_path / "out") == before
    with pytest.raises(UserError, match="pseudonym_key"):  # every pseudonym would change
        pack(export, tmp_path / "out", "--key-file", str(tmp_path / "keys" / "other.key"))
    with pytest.raises(UserError, match="lies inside --src"):
        pack(export, export / "shards")
