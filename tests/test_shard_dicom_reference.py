"""The DICOM packer's slice order and Hounsfield units equal an independent reading.

For every CT series (or part of one) the packer keeps from the synthetic export
(:mod:`xdtrain.synth.dicom`, every quirk present), the same files are read again by ITK/GDCM
(SimpleITK's ``ImageSeriesReader``): files grouped by SeriesInstanceUID here with pydicom,
the localizer and the duplicate file left out as a careful user would, sorted by GDCM. ITK's
direction cosines (LPS, as DICOM) give the flips and transposes to the radiological view
through :mod:`nibabel.orientations`, not through the packer's ``canonical_view``. Then
:func:`xdtrain.shards.dicom.read_planes` must return the same slices, in the same order,
with the same HU. The generator's ground truth (:func:`xdtrain.synth.dicom.series_hu`) is
checked the same way, and so are the PNGs ``xd-shard`` writes, against an independent
rendering of the reference HU.

Two places where the reference is not GDCM alone:

* MONOCHROME1: GDCM inverts the stored values (``~stored``, before the rescale) where DICOM
  PS3.3 C.7.6.3.1.2 says MONOCHROME1 only changes the display; the packer rightly does not.
  Its reference is pydicom's ``apply_modality_lut`` on GDCM's file order, and the test
  asserts that GDCM differs from it by exactly that inversion.
* The Enhanced CT multi-frame file: SimpleITK reads its pixels (rescaled, frames in stored
  order) but neither its per-frame positions nor its spacing (a 4-D image with a unit
  direction), so the frames' positions and orientation are read here with pydicom from the
  per-frame and shared functional groups and the frames sorted along the normal.
"""

from __future__ import annotations

import csv
import os
import tarfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from nibabel.orientations import apply_orientation, io_orientation, ornt_transform
from pydicom.pixels import apply_modality_lut

from xdtrain.shards import PACKERS
from xdtrain.shards import dicom as packer
from xdtrain.shards.cli import main as shard_main
from xdtrain.shards.cli import pack_parser
from xdtrain.synth import dicom as synth
from xdtrain.synth import generate

sitk = pytest.importorskip("SimpleITK")

COUNT = 12  # patients: every quirk of synth.QUIRKS exists at this count
SEED = 0
SIZE = "small"
AIR = -1024.0
# The quirk series the brief names; each must be among the series compared.
NAMED = {
    "big_endian",
    "rle",
    "jpeg2000",
    "enhanced",
    "oblique",
    "feet_first",
    "descending_numbers",
    "slope",
    "monochrome1",
    "missing_slice",
    "localizer",
    "duplicate",
}


# --------------------------------------------------------------------------- reference view


def canonical(volume: np.ndarray, direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` [slice, row, column] with ITK's ``direction`` (3x3, columns: the LPS
    directions in which the column, row and slice index increase) in the radiological view
    of its plane: columns along the lower-numbered LPS axis of the plane, increasing; rows
    along the other, increasing for L and P, decreasing for S (superior at the top); slices
    along the normal's axis, increasing (slice 0 at the negative end: axial, most inferior).

    Returns the turned volume and the original index of each of its slices. The LPS axes are
    used as such (nibabel's orientation code only finds the nearest axis and its sign; its
    R/A/S letters are not used, so no LPS/RAS conversion enters).
    """
    affine = np.eye(4)
    affine[:3, :3] = direction
    start = io_orientation(affine)  # per index (column, row, slice): (LPS axis, sign)
    slice_axis = int(start[2, 0])
    column_axis, row_axis = sorted({0, 1, 2} - {slice_axis})
    end = np.array([[column_axis, 1], [row_axis, -1 if row_axis == 2 else 1], [slice_axis, 1]])
    transform = ornt_transform(start, end)
    assert transform[2, 0] == 2, "a slice index must stay the slice index"
    turned = apply_orientation(np.transpose(volume, (2, 1, 0)), transform)
    index = apply_orientation(np.arange(volume.shape[0])[None, None, :], transform).ravel()
    return np.ascontiguousarray(np.transpose(turned, (2, 1, 0))), index


def direction_of(orientation) -> np.ndarray:
    """ImageOrientationPatient -> 3x3 direction (columns: row, column and normal directions)."""
    o = np.asarray([float(v) for v in orientation])
    return np.stack([o[:3], o[3:], np.cross(o[:3], o[3:])], axis=1)


def runs_of(where: np.ndarray) -> list[slice]:
    """Evenly spaced runs of ascending positions (a step more than 1 % off the median breaks)."""
    steps = np.diff(where)
    assert (steps > 0).all(), where
    median = float(np.median(steps))
    breaks = np.flatnonzero(np.abs(steps - median) > 0.01 * median)
    edges = [0, *(int(b) + 1 for b in breaks), len(where)]
    return [slice(a, b) for a, b in zip(edges, edges[1:], strict=False)]


# --------------------------------------------------------------------------- fixtures


@dataclass
class Reference:
    quirk: str | None
    patient: int
    study: int
    label: str
    hu: np.ndarray  # [slice, row, column], canonical view, HU
    where: np.ndarray  # each slice's position along the normal's LPS axis (mm), ascending
    photometric: str
    intercept: float
    slope: float
    orientation: tuple[float, ...]  # ImageOrientationPatient of the files (pydicom)
    gdcm: np.ndarray | None = None  # GDCM's own values in the same view (MONOCHROME1 only)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return generate("dicom", tmp_path_factory.mktemp("dicom"), size=SIZE, seed=SEED, count=COUNT)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("key") / "pseudonym.key"  # outside --src and --out


@pytest.fixture(scope="module")
def series_index(export) -> dict[str, tuple[int, int, str]]:
    """SeriesInstanceUID -> (patient, study, label), from labels.csv (patient, study order)."""
    with open(export / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    order = [(p, s) for p in range(COUNT) for s in range(synth.studies_of(p))]
    assert len(rows) == len(order)
    return {r["SeriesInstanceUID"]: (*ps, r["label"]) for r, ps in zip(rows, order, strict=True)}


@pytest.fixture(scope="module")
def references(export, series_index, tmp_path_factory) -> dict[str, Reference]:
    """SeriesInstanceUID -> the independent reading of that CT series."""
    groups: dict[str, dict[Path, pydicom.Dataset]] = defaultdict(dict)
    for path in sorted(export.rglob("*")):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue  # README.txt, labels.csv, the generator's marker
        if ds.get("Modality") == "CT" and "SeriesInstanceUID" in ds:
            groups[str(ds.SeriesInstanceUID)][path] = ds
    assert set(groups) == set(series_index)
    links = tmp_path_factory.mktemp("series")
    out = {}
    for n, (uid, files) in enumerate(sorted(groups.items())):
        patient, study, label = series_index[uid]
        kept, seen = [], set()
        for path, ds in files.items():  # what a careful user leaves out
            if "LOCALIZER" in [str(v).upper() for v in ds.get("ImageType", [])]:
                continue
            if ds.SOPInstanceUID in seen:  # the same image under a second name
                continue
            seen.add(ds.SOPInstanceUID)
            kept.append(path)
        first = pydicom.dcmread(kept[0], stop_before_pixels=True)
        if len(kept) == 1 and "PerFrameFunctionalGroupsSequence" in first:
            out[uid] = _enhanced(kept[0], first, patient, study, label)
            continue
        folder = links / str(n)
        folder.mkdir()
        for path in kept:
            os.symlink(path, folder / path.name)
        names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        assert len(names) == len(kept)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(names)
        reader.MetaDataDictionaryArrayUpdateOn()
        image = reader.Execute()
        values = sitk.GetArrayFromImage(image).astype(np.float64)  # [slice, row, column]
        direction = np.asarray(image.GetDirection()).reshape(3, 3)
        positions = np.array(
            [
                [float(v) for v in reader.GetMetaData(k, "0020|0032").split("\\")]
                for k in range(len(names))
            ]
        )
        along = positions @ direction[:, 2]
        assert (np.diff(along) > 0).all(), "ITK's slices must ascend along its third direction"
        assert np.allclose(positions[0], image.GetOrigin(), atol=1e-3)
        photometric = str(first.PhotometricInterpretation)
        gdcm = None
        if photometric == "MONOCHROME1":  # GDCM inverts it; the modality LUT does not
            gdcm = values
            values = np.stack(
                [
                    apply_modality_lut(pydicom.dcmread(f).pixel_array, pydicom.dcmread(f))
                    for f in names
                ]
            ).astype(np.float64)
        hu, index = canonical(values, direction)
        axis = int(np.argmax(np.abs(direction[:, 2])))
        out[uid] = Reference(
            quirk=synth.quirk_of(COUNT, patient, study),
            patient=patient,
            study=study,
            label=label,
            hu=hu,
            where=positions[index, axis],
            photometric=photometric,
            intercept=float(first.RescaleIntercept),
            slope=float(first.RescaleSlope),
            orientation=tuple(float(v) for v in first.ImageOrientationPatient),
            gdcm=None if gdcm is None else canonical(gdcm, direction)[0],
        )
    return out


def _enhanced(path: Path, ds, patient: int, study: int, label: str) -> Reference:
    """An Enhanced CT file: pixels (rescaled) by GDCM in stored frame order; each frame's
    position and the orientation from its functional groups, read here with pydicom."""
    image = sitk.ReadImage(str(path))
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    values = values.reshape(-1, *values.shape[-2:])  # SimpleITK may give [1, frames, r, c]
    shared = ds.SharedFunctionalGroupsSequence[0]
    direction = direction_of(shared.PlaneOrientationSequence[0].ImageOrientationPatient)
    positions = np.array(
        [
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
            for frame in ds.PerFrameFunctionalGroupsSequence
        ]
    )
    assert len(positions) == len(values) == int(ds.NumberOfFrames)
    ranked = np.argsort(positions @ direction[:, 2])
    transform = shared.PixelValueTransformationSequence[0]
    hu, index = canonical(values[ranked], direction)
    axis = int(np.argmax(np.abs(direction[:, 2])))
    return Reference(
        quirk=synth.quirk_of(COUNT, patient, study),
        patient=patient,
        study=study,
        label=label,
        hu=hu,
        where=positions[ranked][index, axis],
        photometric=str(ds.PhotometricInterpretation),
        intercept=float(transform.RescaleIntercept),
        slope=float(transform.RescaleSlope),
        orientation=tuple(
            float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient
        ),
    )


def _argv(export: Path, key_file: Path, out: Path, *extra: str) -> list[str]:
    """``xd-shard`` arguments packing the export with its labels and the test's key."""
    return ["--dataset", "dicom", "--src", str(export), "--out", str(out)] + [
        *("--labels", str(export / "labels.csv"), "--key-file", str(key_file), *extra)
    ]


def _options(export: Path, key_file: Path, out: Path, *extra: str) -> dict:
    args = pack_parser().parse_args(_argv(export, key_file, out, *extra))
    return PACKERS["dicom"].options(args)


@pytest.fixture(scope="module")
def scanned(export, key_file, tmp_path_factory):
    options = _options(export, key_file, tmp_path_factory.mktemp("unused-out"))
    return packer.scan(export, options)


@pytest.fixture(scope="module")
def parts(scanned) -> dict[str, list[tuple[str, object]]]:
    """SeriesInstanceUID -> [(source key, source)] in key order (parts of a split series)."""
    out: dict[str, list] = defaultdict(list)
    for source in scanned.sources:
        path = source.params["slices"][0][0]
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
        out[uid].append((source.key, source))
    return {uid: sorted(found, key=lambda item: item[0]) for uid, found in out.items()}


def _expected_parts(ref: Reference) -> list[np.ndarray]:
    """The reference split into its evenly spaced runs (one unless a slice is missing)."""
    return [ref.hu[run] for run in runs_of(ref.where)]


# --------------------------------------------------------------------------- tests


def test_every_quirk_is_present_and_every_ct_series_is_kept(references, parts, scanned):
    quirks = {synth.quirk_of(COUNT, p, s) for p in range(COUNT) for s in range(2)}
    assert quirks >= NAMED
    assert set(parts) == set(references)  # every labelled CT series, none added
    assert scanned.skipped == []
    for uid, found in parts.items():
        ref = references[uid]
        expected = 2 if ref.quirk == "missing_slice" else 1
        assert len(found) == expected, (ref.quirk, [k for k, _ in found])
        for _, source in found:  # no selection options: every slice kept
            assert source.params["indices"] == list(range(source.params["depth"]))


@pytest.mark.parametrize("quirk", sorted(NAMED - {"localizer", "duplicate"}))
def test_the_named_quirk_series_are_compared(references, quirk):
    # the localizer and the duplicate live in ordinary axial series, compared like all others
    assert [r.quirk for r in references.values()].count(quirk) == 1


def test_slices_order_and_hu_equal_itk_gdcm(references, parts):
    """Every kept series, each part of a split one: same slices, same order, same HU."""
    compared = set()
    for uid, found in sorted(parts.items()):
        ref = references[uid]
        expected = _expected_parts(ref)
        assert len(expected) == len(found), ref.quirk
        for (key, source), want in zip(found, expected, strict=True):
            got = np.stack(packer.read_planes(source))
            assert got.dtype == np.float32
            assert got.shape == want.shape, (ref.quirk, key)
            if ref.slope == 1.0:
                np.testing.assert_array_equal(got, want, err_msg=f"{ref.quirk} {key}")
            else:  # slope 0.5: half-integers, float32 exact too; allow its rounding
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-3, err_msg=str(key))
        compared.add(ref.quirk)
    assert NAMED - {"localizer", "duplicate"} <= compared


def test_gdcm_inverts_monochrome1_and_the_packer_does_not(references, parts):
    (ref,) = [r for r in references.values() if r.photometric == "MONOCHROME1"]
    # GDCM's value: slope * ~stored + intercept, with ~stored = -stored - 1 and
    # stored = (HU - intercept) / slope: i.e. 2 * intercept - HU - slope
    np.testing.assert_array_equal(ref.gdcm, 2 * ref.intercept - ref.hu - ref.slope)
    (uid,) = [u for u, r in references.items() if r is ref]
    ((_, source),) = parts[uid]
    got = np.stack(packer.read_planes(source))
    np.testing.assert_array_equal(got, ref.hu)
    assert not np.array_equal(got, ref.gdcm)
    assert got.min() == AIR  # air stays dark in HU: nothing was inverted


def test_the_reference_equals_the_generators_ground_truth(references):
    """The generator's HU (slices ascending along row x column, rows and columns as stored),
    turned to the canonical view by the orientation the files record, equal the reference;
    the missing slice is missing."""
    for ref in references.values():
        hu, label = synth.series_hu(SIZE, SEED, ref.patient, ref.study)
        assert label == ref.label
        orientation = ref.orientation
        if ref.quirk == "feet_first":  # as the generator documents it
            assert [float(v) for v in orientation] == [-1, 0, 0, 0, 1, 0]
        original = np.arange(len(hu))
        if ref.quirk == "missing_slice":
            gone = synth.missing_index(len(hu))
            hu, original = np.delete(hu, gone, axis=0), np.delete(original, gone)
        truth, index = canonical(hu, direction_of(orientation))
        np.testing.assert_allclose(truth, ref.hu, rtol=0, atol=1e-3, err_msg=str(ref.quirk))
        if ref.quirk == "missing_slice":
            # the reference's runs break exactly where the generator left a slice out
            runs = runs_of(ref.where)
            breaks = np.flatnonzero(np.abs(np.diff(original[index])) != 1) + 1
            assert [r.start for r in runs[1:]] == breaks.tolist() and len(runs) == 2


def test_the_views_are_the_documented_ones(references):
    """The convention checked on the anatomy the generator draws, whatever the geometry
    (feet-first, oblique): slice 0 most inferior; the spine (posterior) at the bottom; the
    liver (the patient's right) on the image's left."""
    n = 64

    def box(r: float, c: float) -> tuple[slice, slice]:  # 6x6 pixels around (r, c) * n
        return slice(int(r * n) - 3, int(r * n) + 3), slice(int(c * n) - 3, int(c * n) + 3)

    checked = set()
    for ref in references.values():
        assert (np.diff(ref.where) > 0).all()  # ascending z: inferior to superior
        if ref.label == "head":
            continue
        mean = ref.hu.mean(axis=0)
        spine, mirrored = mean[box(0.70, 0.5)].mean(), mean[box(0.34, 0.5)].mean()
        assert spine > 200 > mirrored + 100, (ref.quirk, spine, mirrored)
        if ref.label == "abdomen":
            liver, other = mean[box(0.47, 0.33)].mean(), mean[box(0.47, 0.67)].mean()
            assert liver > other + 8, (ref.quirk, liver, other)
        checked.add(ref.quirk)
    assert {"feet_first", "oblique"} <= checked


# --------------------------------------------------------------------------- end to end


def render(hu: np.ndarray, windows: list[tuple[float, float]], size: int, bits: int):
    """An independent rendering: pad square with air, area-average down by an integer
    factor (block means: exactly what area interpolation computes then), window, quantise."""
    rows, cols = hu.shape
    side = max(rows, cols)
    square = np.full((side, side), AIR)
    top, left = (side - rows) // 2, (side - cols) // 2
    square[top : top + rows, left : left + cols] = hu
    assert side % size == 0, "only integer downscaling factors are rendered here"
    f = side // size
    plane = square.reshape(size, f, size, f).mean(axis=(1, 3))
    top_value = (1 << bits) - 1
    channels = [
        np.rint(np.clip((plane - low) / (high - low), 0, 1) * top_value) for low, high in windows
    ]
    return channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    found: dict[str, dict[str, bytes]] = defaultdict(dict)
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                found[key][ext] = tar.extractfile(member).read()
    return found


@pytest.mark.parametrize(
    ("size", "windows", "bits", "names"),
    [
        # the series' native size: no resampling, so only rounding at exact .5 ties
        # (float32 in the packer, float64 here) can differ, by one grey level
        (64, "soft", 8, [(-160.0, 240.0)]),
        # half size: area averaging of 2x2 blocks (exact in either precision), three
        # windows in RGB order, 16 bit: again only ties can differ, by one level in 65535
        (32, "soft/lung/bone", 16, [(-160.0, 240.0), (-1350.0, 150.0), (-500.0, 1300.0)]),
    ],
)
def test_packed_pngs_equal_a_rendering_of_the_reference(
    export, key_file, references, parts, tmp_path, size, windows, bits, names
):
    out = tmp_path / "shards"
    extra = ["--size", str(size), "--windows", windows, "--bits", str(bits)]
    assert shard_main(_argv(export, key_file, out, *extra, "--workers", "1", "--quiet")) == 0
    by_key = {key: references[uid] for uid, found in parts.items() for key, _ in found}
    part_of = {key: index for found in parts.values() for index, (key, _) in enumerate(found)}
    samples = _samples(out)
    assert len(samples) == sum(len(r.hu) for r in references.values())
    seen_series, differing, total = set(), 0, 0
    for name, sample in sorted(samples.items()):
        series, _, slice_text = name.rpartition("_")
        ref = by_key[series]
        plane = _expected_parts(ref)[part_of[series]][int(slice_text)]
        image = cv2.imdecode(np.frombuffer(sample["img.png"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert image.dtype == (np.uint8 if bits == 8 else np.uint16)
        if image.ndim == 3:
            image = image[..., ::-1]  # OpenCV decodes BGR; the shard stores RGB
        want = render(plane, names, size, bits)
        assert image.shape == want.shape, name
        diff = np.abs(image.astype(np.int64) - want.astype(np.int64))
        assert diff.max() <= 1, (name, ref.quirk, int(diff.max()))
        differing += int((diff > 0).sum())
        total += diff.size
        seen_series.add(series)
    assert seen_series == set(by_key)  # every series and part was packed and checked
    assert differing <= 0.01 * total, (differing, total)  # ties are rare
