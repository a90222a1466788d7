from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.fileset import FileSet
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRBigEndian, JPEG2000Lossless, RLELossless
from scipy import ndimage

from xdtrain.synth import dicom, generate

COUNT = 12
NOT_DICOM = {"README.txt", "labels.csv"}


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return generate("dicom", tmp_path_factory.mktemp("dicom"), size="small", seed=0, count=COUNT)


@pytest.fixture(scope="module")
def datasets(export) -> dict[str, pydicom.Dataset]:
    """Every DICOM file (DICOMDIR aside) by its relative path, pixels decoded."""
    out = {}
    for rel in files_of(export):
        if rel in NOT_DICOM or rel == "DICOMDIR":
            continue
        ds = pydicom.dcmread(export / rel)
        if "PixelData" in ds:
            ds.decoded = ds.pixel_array
        out[rel] = ds
    return out


@pytest.fixture(scope="module")
def rows(export) -> list[dict]:
    with open(export / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def series_index() -> list[tuple[int, int]]:
    """(patient, study) of each labels.csv row: rows come in patient, then study, order."""
    return [(p, s) for p in range(COUNT) for s in range(dicom.studies_of(p))]


def row_of(rows, patient: int, study: int) -> dict:
    return rows[series_index().index((patient, study))]


def members(datasets, series_uid: str) -> dict[str, pydicom.Dataset]:
    return {rel: ds for rel, ds in datasets.items() if ds.SeriesInstanceUID == series_uid}


def is_localizer(ds) -> bool:
    return "LOCALIZER" in ds.ImageType


def normal_of(orientation) -> np.ndarray:
    o = np.asarray(orientation, float)
    return np.cross(o[:3], o[3:])


def volume(datasets, series_uid: str) -> tuple[np.ndarray, np.ndarray]:
    """(HU [slices, rows, cols] sorted along the slice normal, positions along the normal)."""
    found = [ds for ds in members(datasets, series_uid).values() if not is_localizer(ds)]
    if len(found) == 1 and "PerFrameFunctionalGroupsSequence" in found[0]:
        ds = found[0]
        shared = ds.SharedFunctionalGroupsSequence[0]
        transform = shared.PixelValueTransformationSequence[0]
        normal = normal_of(shared.PlaneOrientationSequence[0].ImageOrientationPatient)
        hu = ds.decoded * float(transform.RescaleSlope) + float(transform.RescaleIntercept)
        where = np.array(
            [
                np.dot(frame.PlanePositionSequence[0].ImagePositionPatient, normal)
                for frame in ds.PerFrameFunctionalGroupsSequence
            ]
        )
        order = np.argsort(where)
        return hu[order], where[order]
    unique = {ds.SOPInstanceUID: ds for ds in found}.values()
    normal = normal_of(next(iter(unique)).ImageOrientationPatient)
    slices = sorted(unique, key=lambda ds: np.dot(ds.ImagePositionPatient, normal))
    hu = np.stack([apply_modality_lut(ds.decoded, ds) for ds in slices])
    where = np.array([np.dot(ds.ImagePositionPatient, normal) for ds in slices])
    return hu, where


def test_same_seed_same_bytes(tmp_path):
    first = files_of(generate("dicom", tmp_path / "a", seed=3, count=3))
    again = files_of(generate("dicom", tmp_path / "b", seed=3, count=3))
    other = files_of(generate("dicom", tmp_path / "c", seed=4, count=3))
    assert first == again
    assert set(first) != set(other)
    assert first["labels.csv"] != other["labels.csv"]


def test_layout(export):
    names = files_of(export)
    assert {"DICOMDIR", "README.txt", "labels.csv"} <= set(names)
    assert not (export / "README.txt").read_bytes().startswith(b"\0" * 128)
    dicom_files = [rel for rel in names if rel not in NOT_DICOM and rel != "DICOMDIR"]
    assert len(dicom_files) > 300
    folders = set()
    for rel in dicom_files:
        *parts, leaf = rel.split("/")
        assert re.fullmatch(r"[0-9A-F]{16}", leaf), rel  # no extension
        assert 1 <= len(parts) <= 3, rel
        folders.add("/".join(parts))
    assert len(folders) >= 4
    assert any(len(rel.split("/")) == 4 for rel in dicom_files)  # 3 levels deep somewhere
    for rel in dicom_files + ["DICOMDIR"]:
        data = names[rel]
        assert data[128:132] == b"DICM", rel


def test_every_file_reads_and_decodes(datasets):
    syntaxes = set()
    for rel, ds in datasets.items():
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID, rel
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID, rel
        if ds.Modality == "CT":
            assert ds.decoded.ndim in (2, 3) and ds.decoded.dtype.itemsize == 2
            assert ds.BitsAllocated == 16 and ds.SamplesPerPixel == 1
            assert ds.BitsStored in (12, 16)
            lo, hi = (
                (-(2 ** (ds.BitsStored - 1)), 2 ** (ds.BitsStored - 1) - 1)
                if ds.PixelRepresentation
                else (0, 2**ds.BitsStored - 1)
            )
            assert lo <= ds.decoded.min() and ds.decoded.max() <= hi, rel
    assert {RLELossless, JPEG2000Lossless, ExplicitVRBigEndian} <= syntaxes


QUIRK_SERIES = sorted(dicom.QUIRKS) + [(7, 0), (8, 1)]


@pytest.mark.parametrize(("patient", "study"), QUIRK_SERIES)
def test_hu_read_back_equals_series_hu(datasets, rows, patient, study):
    row = row_of(rows, patient, study)
    hu, where = volume(datasets, row["SeriesInstanceUID"])
    truth, label = dicom.series_hu("small", 0, patient, study)
    assert label == row["label"]
    assert truth.dtype == np.float32 and truth.shape[1:] == (64, 64)
    assert 16 <= truth.shape[0] <= 24
    if dicom.quirk_of(COUNT, patient, study) == "missing_slice":
        truth = np.delete(truth, dicom.missing_index(len(truth)), axis=0)
    np.testing.assert_array_equal(hu, truth)
    assert (np.diff(where) > 0).all()


def quirk_members(datasets, rows, quirk):
    ((patient, study),) = [k for k, v in dicom.QUIRKS.items() if v == quirk]
    assert dicom.quirk_of(COUNT, patient, study) == quirk
    return members(datasets, row_of(rows, patient, study)["SeriesInstanceUID"])


def by_position(found):
    normal = normal_of(found[0].ImageOrientationPatient)
    return sorted(found, key=lambda ds: np.dot(ds.ImagePositionPatient, normal))


def test_transfer_syntax_and_pixel_quirks(datasets, rows):
    expected = {
        "big_endian": ExplicitVRBigEndian,
        "rle": RLELossless,
        "jpeg2000": JPEG2000Lossless,
    }
    for quirk, syntax in expected.items():
        found = quirk_members(datasets, rows, quirk).values()
        assert {ds.file_meta.TransferSyntaxUID for ds in found} == {syntax}
    mono1 = quirk_members(datasets, rows, "monochrome1").values()
    assert {ds.PhotometricInterpretation for ds in mono1} == {"MONOCHROME1"}
    slope = quirk_members(datasets, rows, "slope").values()
    assert {float(ds.RescaleSlope) for ds in slope} == {0.5}
    others = [ds for ds in datasets.values() if ds.Modality == "CT" and "RescaleSlope" in ds]
    assert {ds.PhotometricInterpretation for ds in others} == {"MONOCHROME1", "MONOCHROME2"}
    assert {ds.PixelRepresentation for ds in others} == {0, 1}
    assert {float(ds.RescaleIntercept) for ds in others} == {0.0, -1024.0}
    assert all(ds.RescaleType == "HU" and "WindowCenter" in ds for ds in others)


def test_localizer(datasets, rows):
    found = list(quirk_members(datasets, rows, "localizer").values())
    localizers = [ds for ds in found if is_localizer(ds)]
    assert len(localizers) == 1 and len(found) > 16
    loc = localizers[0]
    assert list(loc.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert [float(v) for v in loc.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]
    assert loc.SOPClassUID == found[0].SOPClassUID
    assert (loc.Rows, loc.Columns) != (64, 64)
    assert all("AXIAL" in ds.ImageType for ds in found if ds is not loc)


def test_missing_slice_leaves_one_double_gap(datasets, rows):
    found = by_position(list(quirk_members(datasets, rows, "missing_slice").values()))
    normal = normal_of(found[0].ImageOrientationPatient)
    gaps = np.diff([np.dot(ds.ImagePositionPatient, normal) for ds in found])
    step = float(found[0].SpacingBetweenSlices)
    assert np.isclose(gaps, 2 * step, atol=1e-3).sum() == 1
    assert np.isclose(gaps, step, atol=1e-3).sum() == len(gaps) - 1
    middle = int(np.argmax(gaps))
    assert middle == dicom.missing_index(len(found) + 1) - 1


def test_duplicate_file(export, datasets, rows):
    found = quirk_members(datasets, rows, "duplicate")
    by_uid = defaultdict(list)
    for rel, ds in found.items():
        by_uid[ds.SOPInstanceUID].append(rel)
    twice = [rels for rels in by_uid.values() if len(rels) > 1]
    assert len(twice) == 1 and len(twice[0]) == 2
    a, b = twice[0]
    assert a != b and (export / a).read_bytes() == (export / b).read_bytes()
    sops = [ds.SOPInstanceUID for rel, ds in datasets.items() if rel not in (a, b)]
    assert len(sops) == len(set(sops))  # no other duplicates anywhere


def test_enhanced_multiframe(datasets, rows):
    (ds,) = quirk_members(datasets, rows, "enhanced").values()
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2.1"
    frames = int(ds.NumberOfFrames)
    assert ds.decoded.shape == (frames, 64, 64) and 16 <= frames <= 24
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert shared.PlaneOrientationSequence[0].ImageOrientationPatient == [1, 0, 0, 0, 1, 0]
    measures = shared.PixelMeasuresSequence[0]
    assert {"PixelSpacing", "SliceThickness", "SpacingBetweenSlices"} <= set(measures.dir())
    assert shared.PixelValueTransformationSequence[0].RescaleType == "HU"
    z = [
        f.PlanePositionSequence[0].ImagePositionPatient[2]
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    assert len(z) == frames and sorted(z) != z
    assert "RescaleSlope" not in ds


def test_orientation_and_numbering_quirks(datasets, rows):
    oblique = by_position(list(quirk_members(datasets, rows, "oblique").values()))
    orientation = np.asarray(oblique[0].ImageOrientationPatient, float)
    normal = normal_of(orientation)
    tilt = np.degrees(np.arccos(abs(normal[2])))
    assert 7 < tilt < 13 and np.allclose(orientation[:3], [1, 0, 0])
    steps = np.diff([np.asarray(ds.ImagePositionPatient, float) for ds in oblique], axis=0)
    assert np.allclose(steps, normal * float(oblique[0].SpacingBetweenSlices), atol=1e-3)

    feet = sorted(
        quirk_members(datasets, rows, "feet_first").values(), key=lambda d: d.InstanceNumber
    )
    z = [float(ds.ImagePositionPatient[2]) for ds in feet]
    assert (np.diff(z) < 0).all() and feet[0].PatientPosition == "FFS"

    desc = by_position(list(quirk_members(datasets, rows, "descending_numbers").values()))
    assert (np.diff([ds.InstanceNumber for ds in desc]) < 0).all()
    assert (np.diff([float(ds.ImagePositionPatient[2]) for ds in desc]) > 0).all()

    special = {"feet_first", "descending_numbers", "enhanced"}
    for (patient, study), row in zip(series_index(), rows, strict=True):
        if dicom.quirk_of(COUNT, patient, study) in special:
            continue
        found = [ds for ds in members(datasets, row["SeriesInstanceUID"]).values()]
        numbers = [
            ds.InstanceNumber for ds in by_position([d for d in found if not is_localizer(d)])
        ]
        assert not (np.diff(numbers) > 0).all() and not (np.diff(numbers) < 0).all()


def test_series_are_mixed_across_folders(datasets, rows):
    folders_of = defaultdict(set)
    series_in = defaultdict(set)
    for rel, ds in datasets.items():
        folder = rel.rsplit("/", 1)[0]
        folders_of[ds.SeriesInstanceUID].add(folder)
        series_in[folder].add(ds.SeriesInstanceUID)
    multi = [row for row in rows if len(folders_of[row["SeriesInstanceUID"]]) > 1]
    assert len(multi) >= len(rows) // 2
    assert any(len(s) > 1 for s in series_in.values())


def test_dicomdir_and_non_image_objects(export, datasets):
    fs = FileSet(export / "DICOMDIR")
    dicomdir = pydicom.dcmread(export / "DICOMDIR")
    assert dicomdir.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.1.3.10"
    listed = {instance.SOPInstanceUID for instance in fs}
    assert listed == {ds.SOPInstanceUID for ds in datasets.values()}
    assert len(fs.find(PatientID=next(iter(datasets.values())).PatientID)) > 0
    kinds = {
        "SR": "1.2.840.10008.5.1.4.1.1.88.11",
        "PR": "1.2.840.10008.5.1.4.1.1.11.1",
        "RTSTRUCT": "1.2.840.10008.5.1.4.1.1.481.3",
    }
    ct_patients = {ds.PatientID for ds in datasets.values() if ds.Modality == "CT"}
    for modality, sop_class in kinds.items():
        (ds,) = [ds for ds in datasets.values() if ds.Modality == modality]
        assert ds.SOPClassUID == sop_class
        assert ds.PatientID in ct_patients and str(ds.PatientName)
        assert str(ds.PatientName).split("^")[0] in ds.StudyDescription


@pytest.mark.parametrize("index", range(len(series_index())))
def test_label_follows_from_content(datasets, rows, index):
    row = rows[index]
    hu, _ = volume(datasets, row["SeriesInstanceUID"])
    assert hu.shape[0] >= 15
    for plane in hu:  # every slice shows its region
        body = ndimage.binary_fill_holes(plane > -400)
        core = ndimage.binary_erosion(body, iterations=2)
        lung = ((plane < -700) & core).sum()
        skull = plane > 500
        inside = ndimage.binary_fill_holes(skull) & ~skull
        if row["label"] == "head":
            assert inside.sum() > 300 and abs(np.median(plane[inside]) - 35) < 15
            assert lung == 0
        elif row["label"] == "chest":
            assert lung > 200 and inside.sum() < 20
        else:
            assert row["label"] == "abdomen"
            assert lung == 0 and inside.sum() < 20
            assert ((plane > 50) & (plane < 80)).sum() > 100  # liver


IDENTIFIERS = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "PatientAddress",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "OperatorsName",
    "PerformingPhysicianName",
    "StationName",
]


def test_identifiers_present_and_unique_per_patient(datasets, rows):
    per_patient = defaultdict(lambda: defaultdict(set))
    for ds in datasets.values():
        for key in IDENTIFIERS + ["PatientSex", "PatientAge", "AccessionNumber", "StudyID"]:
            assert key in ds and str(ds.data_element(key).value), key
        for key in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
            assert re.fullmatch(r"(19|20)\d{6}", ds.data_element(key).value)
        for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            assert re.fullmatch(r"2\.25\.[1-9]\d+", ds.data_element(key).value)
        surname = str(ds.PatientName).split("^")[0]
        assert surname in ds.StudyDescription and surname in ds.SeriesDescription
        for key in IDENTIFIERS:
            per_patient[ds.PatientID][key].add(str(ds.data_element(key).value))
        per_patient[ds.PatientID]["AccessionNumber"].add(ds.AccessionNumber)
    assert len(per_patient) == COUNT == len({row["PatientID"] for row in rows})
    for values in per_patient.values():
        assert all(len(v) == 1 for k, v in values.items() if k != "AccessionNumber")
        family, given = next(iter(values["PatientName"])).split("^")
        assert len(family) >= 6 and len(given) >= 6
        assert re.fullmatch(r"PID\d{9}", next(iter(values["PatientID"])))
    for key in IDENTIFIERS + ["AccessionNumber"]:
        seen = [v for values in per_patient.values() for v in values[key]]
        assert len(seen) == len(set(seen)), key  # no two patients share one
    frame_uids = [ds.FrameOfReferenceUID for ds in datasets.values() if ds.Modality == "CT"]
    assert len(set(frame_uids)) == len(rows)


def test_labels_csv(rows, datasets):
    assert len(rows) == len(series_index())
    assert {row["label"] for row in rows} == set(dicom.CLASSES)
    ct = {ds.SeriesInstanceUID for ds in datasets.values() if ds.Modality == "CT"}
    assert {row["SeriesInstanceUID"] for row in rows} == ct
    for (patient, _), row in zip(series_index(), rows, strict=True):
        assert row["label"] == dicom.region_of(0, patient)
