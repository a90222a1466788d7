"""The pieces of the own-CT packers, each against a formula or an independent operation:
windows, the canonical view, evenly spaced runs, slice selection, labels CSV, pseudonyms."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from PIL import Image

from xdtrain.errors import UserError
from xdtrain.shards import dicom, labels, pseudonyms, slices, windows

# --------------------------------------------------------------------------- windows


def test_window_presets_and_explicit_windows():
    assert windows.parse_windows("soft") == [(-160.0, 240.0)]
    assert windows.parse_windows("-1000,400") == [(-1000.0, 400.0)]
    stack = windows.parse_windows("soft/lung/bone")
    # centre/width presets: L40 W400, L-600 W1500, L400 W1800
    assert [((lo + hi) / 2, hi - lo) for lo, hi in stack] == [(40, 400), (-600, 1500), (400, 1800)]
    for bad, match in [
        ("soft/lung", "one window"),
        ("240,-160", "below"),
        ("tissue", "preset"),
        ("1,2,3", "preset"),
    ]:
        with pytest.raises(UserError, match=match):
            windows.parse_windows(bad)


def test_render_equals_block_average_then_window():
    """Halving by area averaging is the mean of 2x2 blocks; then (v - low) / (high - low)
    clipped and rounded to 0..255 (or 0..65535)."""
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1100, 1500, (64, 64)).astype(np.float32)
    blocks = hu.reshape(32, 2, 32, 2).mean(axis=(1, 3))
    for bits, top in ((8, 255), (16, 65535)):
        lo, hi = -160.0, 240.0
        out = windows.render(hu, [(lo, hi)], 32, bits, -1024.0)
        expected = np.rint(np.clip((blocks - lo) / (hi - lo), 0, 1) * top)
        assert out.dtype == (np.uint8 if bits == 8 else np.uint16)
        np.testing.assert_allclose(out, expected, atol=1)  # float32 rounding at .5
        assert np.mean(out != expected) < 0.01
    stack = windows.render(hu, windows.parse_windows("soft/lung/bone"), 32, 8, -1024.0)
    assert stack.shape == (32, 32, 3)
    lo, hi = windows.PRESETS["lung"]
    np.testing.assert_allclose(
        stack[..., 1], np.rint(np.clip((blocks - lo) / (hi - lo), 0, 1) * 255), atol=1
    )


def test_render_enlarges_like_pil_bilinear_and_pads_with_air():
    hu = np.linspace(-500, 500, 16 * 16, dtype=np.float32).reshape(16, 16)
    out = windows.render(hu, [(-1000.0, 1000.0)], 32, 16, -1024.0).astype(np.float64)
    reference = np.asarray(Image.fromarray(hu, mode="F").resize((32, 32), Image.BILINEAR))
    expected = np.clip((reference + 1000) / 2000, 0, 1) * 65535
    assert np.abs(out - expected).max() < 0.02 * 65535  # OpenCV and Pillow sample alike
    tall = np.full((20, 10), 100.0, np.float32)
    square = windows.square(tall, -1024.0)
    assert square.shape == (20, 20)
    assert (square[:, :5] == -1024).all() and (square[:, 5:15] == 100).all()
    assert (square[:, 15:] == -1024).all()


# --------------------------------------------------------------------------- canonical view

# (ImageOrientationPatient, what it is); LPS: +x patient left, +y posterior, +z superior
ORIENTATIONS = [
    ((1, 0, 0, 0, 1, 0), "axial, head first supine"),
    ((-1, 0, 0, 0, 1, 0), "axial, feet first supine"),
    ((-1, 0, 0, 0, -1, 0), "axial, head first prone"),
    ((0, 1, 0, 1, 0, 0), "axial, rows and columns swapped"),
    ((1, 0, 0, 0, 0, -1), "coronal"),
    ((0, 1, 0, 0, 0, -1), "sagittal"),
    ((0, -1, 0, 0, 0, 1), "sagittal, upside down"),
    ((1, 0, 0, 0, np.cos(0.15), np.sin(0.15)), "axial, oblique"),
]


@pytest.mark.parametrize("iop,what", ORIENTATIONS, ids=[w for _, w in ORIENTATIONS])
def test_canonical_view_is_the_radiological_view(iop, what):
    """Each pixel holds its own world position (from the orientation alone); after the view
    transform, columns must run along the plane's lower LPS axis towards +, rows along the
    other towards + (x, y) or towards - (z: superior at the top)."""
    along_row, along_col = np.array(iop[:3], float), np.array(iop[3:], float)
    r, c = np.meshgrid(np.arange(5), np.arange(7), indexing="ij")  # 5 rows, 7 columns
    world = r[..., None] * along_col + c[..., None] * along_row  # [5, 7, 3]
    view = np.stack(
        [dicom.to_view(world[..., a], dicom.canonical_view(iop)) for a in range(3)], axis=-1
    )
    axes = sorted({int(np.argmax(np.abs(along_row))), int(np.argmax(np.abs(along_col)))})
    first, second = axes
    assert (np.diff(view[:, :, first], axis=1) > 0).all(), what  # columns: + along first axis
    steps = np.diff(view[:, :, second], axis=0)
    assert ((steps < 0) if second == 2 else (steps > 0)).all(), what


def test_order_puts_the_most_inferior_slice_first_whatever_the_file_order():
    def frame(z, iop=(1, 0, 0, 0, 1, 0)):
        return dicom.Frame(
            path="", relative="", shown="", frame=None, sop=str(z), series="s", study="t",
            patient="p", modality="CT", position=np.array([0.0, 0.0, z]), orientation=iop,
            shape=(4, 4), spacing=(1.0, 1.0), slope=1.0, intercept=0.0, acquisition="",
            syntax="",
        )  # fmt: skip

    frames = [frame(z) for z in (5.0, -5.0, 0.0, 2.5, -2.5)]
    ordered, where = dicom.order(frames)
    assert [f.position[2] for f in ordered] == [-5.0, -2.5, 0.0, 2.5, 5.0]
    # feet first: the normal points down (-z); slice 0 is still the most inferior
    flipped = [frame(z, (-1, 0, 0, 0, 1, 0)) for z in (5.0, -5.0, 0.0)]
    assert [f.position[2] for f in dicom.order(flipped)[0]] == [-5.0, 0.0, 5.0]


def test_runs_split_at_gaps_and_uneven_steps():
    even = np.arange(10) * 2.5
    assert dicom.runs(even) == ([slice(0, 10)], 2.5)
    missing = np.delete(even, 4)  # one slice missing: a step of 5 mm
    found, spacing = dicom.runs(missing)
    assert spacing == 2.5 and found == [slice(0, 4), slice(4, 9)]
    uneven = np.array([0, 2.5, 5, 7.5, 9.0, 11.5, 14.0])  # one step of 1.5 mm
    assert dicom.runs(uneven)[0] == [slice(0, 4), slice(4, 7)]
    jitter = even + np.random.default_rng(0).uniform(-0.004, 0.004, 10)  # rounding in headers
    assert dicom.runs(jitter)[0] == [slice(0, 10)]
    assert dicom.runs(np.array([3.0]))[0] == [slice(0, 1)]


# --------------------------------------------------------------------------- selection


def _volumes(sizes: dict[str, list[int]]) -> list[slices.Volume]:
    out = []
    for patient, depths in sizes.items():
        for i, depth in enumerate(depths):
            out.append(
                slices.Volume(
                    key=f"S{patient}{i}",
                    patient=patient,
                    where="",
                    modality="CT",
                    spacing=[1, 1, 1],
                    slices=list(range(depth)),
                    labels=[()] * depth,
                    extra={},
                )  # fmt: skip
            )
    return out


def _options(**changes):
    base = {"slice_stride": 1, "slices_per_series": None, "max_samples": None, "seed": 0}
    return base | changes


def test_stride_and_slices_per_series():
    kept, record = slices.select(_volumes({"a": [10]}), _options(slice_stride=3))
    assert kept[0].extra["keep"] == [0, 3, 6, 9]
    kept, _ = slices.select(_volumes({"a": [10]}), _options(slices_per_series=4))
    assert kept[0].extra["keep"] == [0, 3, 6, 9]  # evenly spaced, both ends
    kept, _ = slices.select(_volumes({"a": [10]}), _options(slices_per_series=1))
    assert kept[0].extra["keep"] == [5]
    assert record["slices_found"] == 10 and record["slices_kept"] == 4


def test_max_samples_is_shared_equally_between_patients_and_seeded():
    sizes = {"a": [100, 50], "b": [7], "c": [40], "d": [30, 30, 30]}
    kept, record = slices.select(_volumes(sizes), _options(max_samples=62))
    per_patient = {}
    for volume in kept:
        per_patient[volume.patient] = per_patient.get(volume.patient, 0) + len(volume.extra["keep"])
    assert sum(per_patient.values()) == record["slices_kept"] == 62
    assert per_patient["b"] == 7  # all it has
    others = [per_patient[p] for p in "acd"]
    assert sorted(others) == [18, 18, 19]  # the other 55 shared equally, one more for one
    # within a patient, shared between its series
    d = [len(v.extra["keep"]) for v in kept if v.patient == "d"]
    assert max(d) - min(d) <= 1
    again, _ = slices.select(_volumes(sizes), _options(max_samples=62))
    assert [v.extra["keep"] for v in again] == [v.extra["keep"] for v in kept]
    picks = {
        tuple(
            tuple(v.extra["keep"])
            for v in slices.select(_volumes(sizes), _options(max_samples=62, seed=s))[0]
        )
        for s in range(6)
    }
    assert len(picks) > 1  # the remainder follows the seed
    everything, _ = slices.select(_volumes(sizes), _options(max_samples=10_000))
    assert sum(len(v.extra["keep"]) for v in everything) == 100 + 50 + 7 + 40 + 90


def test_unlabelled_slices_are_never_selected():
    volume = _volumes({"a": [6]})[0]
    volume.labels = [("x",), None, ("x",), None, ("y",), None]
    kept, _ = slices.select([volume], _options())
    assert kept[0].extra["keep"] == [0, 2, 4]


# --------------------------------------------------------------------------- labels CSV


def _csv(tmp_path, text: str):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def test_labels_single_and_multi_and_the_most_specific_row_wins(tmp_path):
    table = labels.read(
        _csv(tmp_path, "PatientID,SeriesInstanceUID,label\nP1,,chest\n,1.2.3,head\nP2,,abdomen\n")
    )
    assert not table.multilabel and table.classes == ["abdomen", "chest", "head"]
    keys = {"SeriesInstanceUID": "1.2.3", "StudyInstanceUID": "9", "PatientID": "P1"}
    assert table.lookup(keys) == ("head",)  # the series row beats the patient row
    assert table.lookup(keys | {"SeriesInstanceUID": "4.5"}) == ("chest",)
    assert table.lookup({"PatientID": "P9"}) is None
    assert table.vector(("head",)) == [2]
    record = table.record()
    assert record["rows"] == 3 and record["rows_used"] == 2 and record["rows_matching_nothing"] == 1
    assert "P1" not in str(record) and "1.2.3" not in str(record)

    multi = labels.read(_csv(tmp_path, "file,labels\na/b.nii.gz,nodule|effusion\nc.nii,none\n"))
    assert multi.multilabel and multi.classes == ["effusion", "nodule", "none"]
    assert multi.vector(("effusion", "nodule")) == [1, 1, 0]


def test_labels_errors_name_the_line_and_never_the_key(tmp_path):
    for text, match in [
        ("PatientID,label\nSECRET1,a\nSECRET1,b\n", r"labels.csv:3: .*another label"),
        ("PatientID,label\nSECRET1,a|b\n", "--label-kind single"),
        ("PatientID,diagnosis\nSECRET1,a\n", "needs a label column"),
        ("PatientID,label\nSECRET1,\n", "labels.csv:2: empty"),
        ("PatientID,label\nSECRET1,a\nSECRET2,a\n", "two classes"),
    ]:
        with pytest.raises(UserError, match=match) as caught:
            labels.read(_csv(tmp_path, text), "single")
        assert "SECRET" not in str(caught.value)


# --------------------------------------------------------------------------- pseudonyms


def test_pseudonyms_are_keyed_stable_and_distinct(tmp_path):
    key = pseudonyms.load_key(tmp_path / "k" / "pseudonym.key")
    assert stat.S_IMODE(os.stat(tmp_path / "k" / "pseudonym.key").st_mode) == 0o600
    assert pseudonyms.load_key(tmp_path / "k" / "pseudonym.key") == key  # read, not remade
    a, b = pseudonyms.Pseudonyms(key), pseudonyms.Pseudonyms(key)
    assert a.patient("PID123456789") == b.patient("PID123456789")
    assert a.patient("PID123456789") != a.patient("PID123456788")
    assert a.patient("X") != a.series("X")  # kinds are separate
    other = pseudonyms.Pseudonyms(bytes(32))
    assert other.patient("PID123456789") != a.patient("PID123456789")
    assert "123456789" not in a.patient("PID123456789")
    assert len(a.key_id) == 16 and a.key_id != other.key_id


def test_key_file_placement_and_content(tmp_path):
    out, src = tmp_path / "out", tmp_path / "src"
    with pytest.raises(UserError, match="inside --out"):
        pseudonyms.check_key_place(out / "key", out, src)
    with pytest.raises(UserError, match="inside --src"):
        pseudonyms.check_key_place(src / "a" / "key", out, src)
    pseudonyms.check_key_place(tmp_path / "key", out, src)
    (tmp_path / "bad.key").write_text("not a key")
    with pytest.raises(UserError, match="not a pseudonym key"):
        pseudonyms.load_key(tmp_path / "bad.key")


def test_scrubber_removes_values_uids_and_dates():
    scrub = pseudonyms.Scrubber()
    scrub.add("Doe^Johnathan", name=True)
    for value in ("PID987654", None, "", ["ALIAS1", "ALIAS2"], "CT HEAD with contrast"):
        scrub.add(value)
    text = "export/DOE_JOHNATHAN/PID987654/1.2.840.113619.2.55.3/IM_20190312_alias2.dcm"
    cleaned = scrub(text)
    for secret in ("DOE", "JOHNATHAN", "PID987654", "1.2.840", "20190312", "alias2"):
        assert secret.lower() not in cleaned.lower()
    assert cleaned.startswith("export/") and cleaned.endswith(".dcm")
    assert scrub("series 3 of 12, 2.5 mm") == "series 3 of 12, 2.5 mm"  # numbers stay
    assert scrub("head/with/contrast") == "head/with/contrast"  # free text: whole value only
    scrub.add("Li^Bo", name=True)
    scrub.add("77")
    scrub.add("Red^Jim", name=True)
    for text, expected in [
        ("2021_03_04/Li_Bo_77/IM", "[redacted]/[redacted]_[redacted]_[redacted]/IM"),
        ("04.03.2021/x/04-03-2021_y", "[redacted]/x/[redacted]_y"),
        ("Lima/Bob/x77y", "Lima/Bob/x77y"),  # short values: whole tokens only
        ("Red_Jim", "[redacted]_[redacted]"),
    ]:
        assert scrub(text) == expected
        assert scrub(scrub(text)) == expected  # "red" in "[redacted]" stays
    scrub.add("20230115", date=True)  # a StudyDate: its other spellings go too
    for text in (
        "scan_20230115123045_2.nii.gz",  # a DICOM date-time, as dcm2niix names files
        "x/2023-01-15T10:11:12/y",
        "a/230115/b",
        "15Jan2023_ct",
        "15012023",
    ):
        assert not any(c in scrub(text) for c in ("2023", "230115", "15Jan")), scrub(text)
