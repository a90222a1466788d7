"""Synthetic hospital PACS export of CT scans, with the quirks real exports have.

Everything lies below ``OUT/dicom/``::

    DICOMDIR                    Media Storage Directory (PATIENT/STUDY/SERIES/IMAGE records)
    README.txt                  a non-DICOM file, as exports carry
    labels.csv                  PatientID,StudyInstanceUID,SeriesInstanceUID,label
    7F/                         nested folders of random names, 1-3 levels deep
        3A9C/0F1E2D3C4B5A6978   DICOM files: 16 random hex digits, no extension
        ...

Files of one series are spread over several folders and folders hold files of several
series; InstanceNumbers are shuffled relative to the slice positions. Every file has the
128-byte preamble, ``DICM`` and File Meta. ``labels.csv`` has one row per CT series (quirk
series included, the localizer has none of its own), ordered by patient then study.

Patients and labels
-------------------
Each patient (``--count``) has one body region, the label, one of :data:`CLASSES`, drawn
seeded and balanced within each block of three patients; it has 2 studies, except patients
3, 7, 11, ... (``patient % 4 == 3``) who have one; each study holds one CT series of that
region:

* ``head``: skull, a bright bone ring (~+700 HU, 4-6 px thick at 64 px), around brain
  (~+35 HU) with two small ventricles, air (-1000 HU) outside;
* ``chest``: body ellipse of soft tissue (~+40 HU) with a fat rim (~-100 HU), two large lungs
  (~-850 HU) left and right, the heart between them and a spine (~+600 HU) posterior;
* ``abdomen``: body ellipse and fat rim, a large liver (~+60 HU) on the patient's right,
  spleen, kidneys and a spine; no lungs and no gas.

Sizes vary slowly along the slices, so every slice shows its region, and Gaussian noise
(sd 10 HU) is added; HU are integers clipped to [-1024, 3071]. :func:`series_hu` returns
exactly the HU the files encode (stored value x RescaleSlope + RescaleIntercept).

Geometry: ``small`` 64x64 pixels, 16-24 slices 2.5 mm apart, pixel spacing ~5.6 mm;
``full`` 512x512, 280-320 slices 1 mm apart, pixel spacing ~0.7 mm. Pixels are int16
(PixelRepresentation 1, RescaleIntercept 0) or uint16 (PixelRepresentation 0, intercept
-1024), BitsStored 12 or 16, chosen per series.

Quirks
------
Fixed by (patient, study) index; a patient index >= ``--count`` does not exist, so with
fewer than 7 patients only the quirks that fit are written (:func:`quirk_of`):

======= ===== ====================== ================================================
patient study quirk                  what it is
======= ===== ====================== ================================================
0       0     ``localizer``          one extra coronal image (ImageType
                                     ORIGINAL\\PRIMARY\\LOCALIZER, orientation
                                     [1,0,0,0,0,-1], other size) in the CT series
0       1     ``big_endian``         Explicit VR Big Endian (1.2.840.10008.1.2.2)
1       0     ``rle``                RLE Lossless
1       1     ``jpeg2000``           JPEG 2000 Lossless
2       0     ``monochrome1``        PhotometricInterpretation MONOCHROME1 (see below)
2       1     ``missing_slice``      slice :func:`missing_index` (the middle one) is not
                                     written: one gap of twice the spacing
3       0     ``enhanced``           one Enhanced CT multi-frame file, frames shuffled
4       0     ``duplicate``          slice 1 written twice under two names (same bytes)
4       1     ``oblique``            orientation rotated ~10 degrees about the x axis
5       0     ``feet_first``         PatientPosition FFS, orientation [-1,0,0,0,1,0]:
                                     z decreases as InstanceNumber increases
5       1     ``descending_numbers`` InstanceNumber descends while position ascends
6       0     ``slope``              RescaleSlope 0.5, stored values twice the HU offset
======= ===== ====================== ================================================

Other series are Explicit or Implicit VR Little Endian. MONOCHROME1 only means "display
inverted": as the standard says, the modality LUT (rescale) gives HU whatever the
photometric interpretation, so the stored values of the MONOCHROME1 series are encoded
exactly like any other series' and rescale to the true HU. The ``feet_first`` series' images
are mirrored left-right (its row direction is -x), so the liver stays on the patient's right.

Non-image objects, each in a series of its own in the patient's first study and carrying
the patient's identifiers: a Basic Text SR on patient 0, a Grayscale Softcopy Presentation
State on patient 1 and an RT Structure Set on patient 2 (patient ``index % count`` when there
are fewer patients).

Identifiers (names, IDs, birth date, address, accession numbers, institution, physicians,
station, dates, times, descriptions containing the surname, UIDs) are random per patient and
seeded, so the same seed gives the same bytes and a search for them in derived data is
meaningful. UIDs are ``2.25.<128-bit integer>`` from the seeded stream.
"""

from __future__ import annotations

import datetime as dt
import io
import string
from collections import defaultdict

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MediaStorageDirectoryStorage,
    RLELossless,
    RTStructureSetStorage,
)

from xdtrain.rng import rng_for
from xdtrain.synth.common import Job, Plan, csv_bytes

name = "dicom"
count_help = "patients"

CLASSES = ["abdomen", "chest", "head"]
SIZE = {
    "small": {"side": 64, "slices": (16, 24), "step": 2.5, "spacing": 0.7 * 512 / 64, "count": 12},
    "full": {"side": 512, "slices": (280, 320), "step": 1.0, "spacing": 0.7, "count": 4},
}
QUIRKS: dict[tuple[int, int], str] = {
    (0, 0): "localizer",
    (0, 1): "big_endian",
    (1, 0): "rle",
    (1, 1): "jpeg2000",
    (2, 0): "monochrome1",
    (2, 1): "missing_slice",
    (3, 0): "enhanced",
    (4, 0): "duplicate",
    (4, 1): "oblique",
    (5, 0): "feet_first",
    (5, 1): "descending_numbers",
    (6, 0): "slope",
}
# Patient (modulo the patient count) whose first study holds each non-image object.
NON_IMAGE = {"sr": 0, "pr": 1, "rtstruct": 2}
LABELS_HEADER = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "label"]
NOISE_SD = 10.0
WINDOWS = {"head": (40, 80), "chest": (-600, 1500), "abdomen": (40, 400)}
DUPLICATE_INDEX = 1
RTSTRUCT_STUDY_CLASS = "1.2.840.10008.3.1.2.3.1"
README = (
    b"PACS export\r\n"
    b"This medium holds DICOM files exported from the picture archive.\r\n"
    b"Open DICOMDIR with a DICOM viewer. Files have no extension.\r\n"
)
_TRANSFER = {"big_endian": ExplicitVRBigEndian, "rle": RLELossless, "jpeg2000": JPEG2000Lossless}


def studies_of(patient: int) -> int:
    """Number of studies (one CT series each) of ``patient``."""
    return 1 if patient % 4 == 3 else 2


def quirk_of(count: int, patient: int, study: int) -> str | None:
    """The quirk of (patient, study) in a data set of ``count`` patients, or None."""
    if patient >= count or study >= studies_of(patient):
        return None
    return QUIRKS.get((patient, study))


def missing_index(slices: int) -> int:
    """Index (in :func:`series_hu` order) of the slice the ``missing_slice`` series lacks."""
    return slices // 2


def region_of(seed: int, patient: int) -> str:
    """The patient's body region (its label): balanced within each block of 3 patients."""
    order = rng_for(seed, name, "regions", patient // 3).permutation(len(CLASSES))
    return CLASSES[int(order[patient % 3])]


def _geometry(size: str, seed: int, patient: int, study: int) -> dict:
    cfg = SIZE[size]
    rng = rng_for(seed, name, "geometry", patient, study)
    lo, hi = cfg["slices"]
    return {
        "side": cfg["side"],
        "slices": int(rng.integers(lo, hi + 1)),
        "spacing": round(cfg["spacing"] * float(rng.uniform(0.9, 1.1)), 4),
        "step": cfg["step"],
        "z0": round(float(rng.uniform(-400, -100)), 2),
        "table": round(float(rng.uniform(-30, 30)), 2),
    }


# --------------------------------------------------------------------------- anatomy


def _ell(yy, xx, center, radii) -> np.ndarray:
    return ((yy - center[0]) / radii[0]) ** 2 + ((xx - center[1]) / radii[1]) ** 2 <= 1.0


def _anatomy(region: str, rng: np.random.Generator, n: int) -> dict:
    u = rng.uniform
    a = {"phase": u(-0.1, 0.1)}
    if region == "head":
        a["c"] = np.array([0.5 + u(-0.03, 0.03), 0.5 + u(-0.03, 0.03)]) * n
        a["r"] = np.array([0.40, 0.33]) * u(0.93, 1.05, 2) * n
        a["thick"] = u(4, 6) * n / 64
        a["bone"], a["brain"], a["csf"] = u(650, 750), u(30, 40), u(4, 12)
    else:
        a["c"] = np.array([0.52 + u(-0.02, 0.02), 0.5 + u(-0.02, 0.02)]) * n
        a["r"] = np.array([0.34, 0.45]) * u(0.94, 1.04, 2) * n
        a["rim"] = u(2, 3.5) * n / 64 if region == "chest" else u(3, 5) * n / 64
        a["soft"], a["fat"], a["bone"] = u(35, 45), u(-110, -90), u(550, 650)
        a["organ_r"] = u(0.9, 1.1, 2)
        a["organ"] = u(-870, -830) if region == "chest" else u(55, 65)
    return a


def _slice(region: str, a: dict, t: float, yy, xx, n: int) -> np.ndarray:
    """One axial slice in HU (no noise); ``t`` in [0, 1] is the position in the series."""
    wave = float(np.sin(np.pi * (t + a["phase"])))
    img = np.full((n, n), -1000.0, np.float32)
    c = a["c"]
    if region == "head":
        r = a["r"] * (0.85 + 0.15 * wave)
        img[_ell(yy, xx, c, r)] = a["bone"]
        img[_ell(yy, xx, c, r - a["thick"])] = a["brain"]
        for side in (-1, 1):
            vent = _ell(yy, xx, c + np.array([-0.02, 0.07 * side]) * n, r * [0.25, 0.1])
            img[vent] = a["csf"]
        return img
    r = a["r"] * (0.95 + 0.05 * wave)
    inner = _ell(yy, xx, c, r - a["rim"])
    img[_ell(yy, xx, c, r)] = a["fat"]
    img[inner] = a["soft"]
    scale = 0.8 + 0.2 * wave
    if region == "chest":
        for side in (-1, 1):
            lung_c = c + np.array([-0.06, 0.2 * side]) * n
            lung = _ell(yy, xx, lung_c, np.array([0.18, 0.13]) * a["organ_r"] * scale * n)
            img[lung & inner] = a["organ"]
        img[_ell(yy, xx, c + np.array([-0.04, 0.03]) * n, np.array([0.1, 0.09]) * n)] = (
            a["soft"] + 5
        )
    else:
        liver = _ell(
            yy, xx, c + np.array([-0.05, -0.17]) * n, np.array([0.17, 0.16]) * a["organ_r"] * n
        )
        img[liver & inner] = a["organ"]
        spleen = _ell(yy, xx, c + np.array([-0.02, 0.22]) * n, np.array([0.07, 0.05]) * scale * n)
        img[spleen & inner] = a["soft"] + 5
        for side in (-1, 1):
            kidney = _ell(yy, xx, c + np.array([0.13, 0.15 * side]) * n, np.array([0.06, 0.04]) * n)
            img[kidney & inner] = 30.0
    img[_ell(yy, xx, c + np.array([0.18, 0.0]) * n, np.array([0.05, 0.05]) * n)] = a["bone"]
    return img


def series_hu(size: str, seed: int, patient: int, study: int) -> tuple[np.ndarray, str]:
    """HU (float32 [slices, rows, cols], integers) and label of a CT series.

    Slices are ordered by increasing position along the slice normal (row x column
    direction); rows and columns as stored. This is the whole series: the
    ``missing_slice`` series lacks slice :func:`missing_index` of it in its files.
    """
    geo = _geometry(size, seed, patient, study)
    label = region_of(seed, patient)
    rng = rng_for(seed, name, "anatomy", patient, study)
    n, slices = geo["side"], geo["slices"]
    yy, xx = np.ogrid[0:n, 0:n]
    yy, xx = yy.astype(np.float32), xx.astype(np.float32)
    a = _anatomy(label, rng, n)
    hu = np.empty((slices, n, n), np.float32)
    for k in range(slices):
        hu[k] = _slice(label, a, k / max(slices - 1, 1), yy, xx, n)
        hu[k] += NOISE_SD * rng.standard_normal((n, n), dtype=np.float32)
    hu = np.clip(np.round(hu), -1024, 3071)
    if QUIRKS.get((patient, study)) == "feet_first":
        hu = np.ascontiguousarray(hu[:, :, ::-1])
    return hu, label


# --------------------------------------------------------------------------- identifiers


def _letters(rng, lo: int, hi: int) -> str:
    k = int(rng.integers(lo, hi + 1))
    return "".join(string.ascii_lowercase[i] for i in rng.integers(0, 26, k)).capitalize()


def _chars(rng, alphabet: str, k: int) -> str:
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), k))


def _hex(rng, k: int) -> str:
    return _chars(rng, "0123456789ABCDEF", k)


def _uid(rng) -> str:
    return "2.25." + str(int.from_bytes(rng.bytes(16), "big"))


def _date(rng, first_year: int, last_year: int) -> dt.date:
    lo, hi = dt.date(first_year, 1, 1).toordinal(), dt.date(last_year, 12, 31).toordinal()
    return dt.date.fromordinal(int(rng.integers(lo, hi + 1)))


def _time(rng) -> str:
    s = int(rng.integers(7 * 3600, 22 * 3600))
    return f"{s // 3600:02d}{s // 60 % 60:02d}{s % 60:02d}"


def _person(rng) -> str:
    return f"{_letters(rng, 6, 10)}^{_letters(rng, 6, 10)}"


def _address(rng) -> str:
    return f"{int(rng.integers(1, 400))} {_letters(rng, 6, 9)} Street, {_letters(rng, 6, 9)}ville"


def _folders(seed: int, count: int) -> list[str]:
    """Folder names shared by all patients: 1-3 levels of random hex names."""
    rng = rng_for(seed, name, "folders", count)
    pool: list[str] = []
    while len(pool) < max(3, count):
        depth = int(rng.integers(1, 4))
        parents = [f for f in pool if f.count("/") == depth - 2]
        if depth == 1 or not parents:
            folder = _hex(rng, 2)
        else:
            folder = parents[int(rng.integers(len(parents)))] + "/" + _hex(rng, 4)
        if folder not in pool:
            pool.append(folder)
    return pool


def _patient(size: str, seed: int, count: int, p: int) -> dict:
    """Everything about patient ``p`` except pixels: identifiers, studies, series, files."""
    rng = rng_for(seed, name, "patient", p)
    family, given = _letters(rng, 6, 10), _letters(rng, 6, 10)
    birth = _date(rng, 1935, 2000)
    pat = {
        "index": p,
        "region": region_of(seed, p),
        "family": family,
        "given": given,
        "birth": birth,
        "PatientName": f"{family}^{given}",
        "PatientID": "PID" + _chars(rng, string.digits, 9),
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "PatientSex": str(rng.choice(["F", "M", "O"])),
        "OtherPatientIDs": "MRN" + _chars(rng, string.digits, 8),
        "PatientAddress": _address(rng),
        "InstitutionName": f"{_letters(rng, 6, 9)} General Hospital",
        "InstitutionAddress": _address(rng),
        "ReferringPhysicianName": _person(rng),
        "OperatorsName": _person(rng),
        "PerformingPhysicianName": _person(rng),
        "StationName": "CT" + _chars(rng, string.ascii_uppercase, 6),
        "studies": [],
    }
    pool = _folders(seed, count)
    for s in range(studies_of(p)):
        date = _date(rng, 2005, 2023)
        age = date.year - birth.year - ((date.month, date.day) < (birth.month, birth.day))
        study = {
            "index": s,
            "date": date.strftime("%Y%m%d"),
            "time": _time(rng),
            "age": f"{age:03d}Y",
            "uid": _uid(rng),
            "StudyID": _chars(rng, string.digits, 8),
            "AccessionNumber": _chars(rng, string.ascii_uppercase + string.digits, 10),
            "StudyDescription": f"{family} CT {pat['region'].upper()}",
        }
        study["series"] = [_series(size, seed, count, pat, study, rng, pool)]
        study["objects"] = [
            _object(kind, pat, study, rng, pool)
            for kind, owner in NON_IMAGE.items()
            if s == 0 and owner % count == p
        ]
        pat["studies"].append(study)
    return pat


def _path(rng, folders: list[str]) -> str:
    return f"{folders[int(rng.integers(len(folders)))]}/{_hex(rng, 16)}"


def _series(size, seed, count, pat, study, rng, pool) -> dict:
    p, s = pat["index"], study["index"]
    quirk = quirk_of(count, p, s)
    geo = _geometry(size, seed, p, s)
    n, slices, spacing, step = geo["side"], geo["slices"], geo["spacing"], geo["step"]
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    if quirk == "oblique":
        angle = np.deg2rad(float(rng.choice([-1, 1]) * rng.uniform(8, 12)))
        col = np.round(np.array([0.0, np.cos(angle), np.sin(angle)]), 6)
    if quirk == "feet_first":
        row = np.array([-1.0, 0.0, 0.0])
    normal = np.cross(row, col)
    origin = -(row + col) * spacing * n / 2 + np.array([0.0, geo["table"], geo["z0"]])
    positions = np.round(origin + np.arange(slices)[:, None] * step * normal, 4)
    signed = bool(rng.random() < 0.5)
    ts = _TRANSFER.get(quirk) or str(
        rng.choice([ExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    )
    plane = "tilted" if quirk == "oblique" else "axial"
    series = {
        "quirk": quirk,
        "uid": _uid(rng),
        "frame_uid": _uid(rng),
        "number": int(rng.integers(2, 9)),
        "time": study["time"],
        "description": f"{pat['family']} {pat['region']} {plane} {step:g}mm",
        "side": n,
        "slices": slices,
        "spacing": spacing,
        "step": step,
        "row": row,
        "col": col,
        "normal": normal,
        "positions": positions,
        "signed": signed,
        "intercept": 0 if signed else -1024,
        "slope": 0.5 if quirk == "slope" else 1.0,
        "bits": 16 if quirk == "slope" else int(rng.choice([12, 16])),
        "ts": ExplicitVRLittleEndian if quirk == "enhanced" else ts,
        "photometric": "MONOCHROME1" if quirk == "monochrome1" else "MONOCHROME2",
        "window": WINDOWS[pat["region"]],
        "files": [],
    }
    folders = [
        pool[i] for i in rng.choice(len(pool), min(len(pool), int(rng.integers(2, 5))), False)
    ]
    if quirk == "enhanced":
        order = rng.permutation(slices)
        while (order == np.arange(slices)).all():
            order = rng.permutation(slices)
        series["order"] = order
        series["files"].append(
            {
                "kind": "enhanced",
                "k": None,
                "number": 1,
                "uid": _uid(rng),
                "path": _path(rng, folders),
            }
        )
        return series
    if quirk == "descending_numbers":
        numbers = slices - np.arange(slices)
    elif quirk == "feet_first":
        numbers = np.arange(1, slices + 1)  # ascending along the normal, which points to -z
    else:
        numbers = rng.permutation(slices) + 1
        while (np.diff(numbers) > 0).all() or (np.diff(numbers) < 0).all():
            numbers = rng.permutation(slices) + 1
    for k in range(slices):
        entry = {"kind": "slice", "k": k, "number": int(numbers[k]), "uid": _uid(rng)}
        entry["path"] = _path(rng, folders)
        if quirk == "missing_slice" and k == missing_index(slices):
            continue
        series["files"].append(entry)
        if quirk == "duplicate" and k == DUPLICATE_INDEX:
            series["files"].append({**entry, "kind": "duplicate", "path": _path(rng, folders)})
    if quirk == "localizer":
        series["files"].append(
            {
                "kind": "localizer",
                "k": None,
                "number": slices + 1,
                "uid": _uid(rng),
                "path": _path(rng, folders),
            }
        )
    return series


def _object(kind: str, pat: dict, study: dict, rng, pool) -> dict:
    sop_class, modality = {
        "sr": (BasicTextSRStorage, "SR"),
        "pr": (GrayscaleSoftcopyPresentationStateStorage, "PR"),
        "rtstruct": (RTStructureSetStorage, "RTSTRUCT"),
    }[kind]
    return {
        "kind": kind,
        "sop_class": sop_class,
        "modality": modality,
        "series_uid": _uid(rng),
        "uid": _uid(rng),
        "number": 900 + list(NON_IMAGE).index(kind),
        "path": _path(rng, pool),
        "description": f"{pat['family']} {kind.upper()}",
    }


def _all_files(pat: dict) -> list[str]:
    files = []
    for study in pat["studies"]:
        for series in study["series"]:
            files += [f["path"] for f in series["files"]]
        files += [obj["path"] for obj in study["objects"]]
    return files


# --------------------------------------------------------------------------- plan / render


def plan(size: str, seed: int, count: int | None) -> Plan:
    n = count if count is not None else SIZE[size]["count"]
    patients = [_patient(size, seed, n, p) for p in range(n)]
    jobs = [
        Job(f"patient-{p}", tuple(_all_files(pat)), {"patient": p, "count": n})
        for p, pat in enumerate(patients)
    ]
    rows = [
        [pat["PatientID"], study["uid"], series["uid"], pat["region"]]
        for pat in patients
        for study in pat["studies"]
        for series in study["series"]
    ]
    extra = {
        "labels.csv": csv_bytes(LABELS_HEADER, rows),
        "README.txt": README,
        "DICOMDIR": _dicomdir(seed, patients),
    }
    return Plan(jobs, extra)


def render(job: Job, size: str, seed: int) -> dict[str, bytes]:
    p = job.params["patient"]
    pat = _patient(size, seed, job.params["count"], p)
    out: dict[str, bytes] = {}
    for study in pat["studies"]:
        for series in study["series"]:
            hu, _ = series_hu(size, seed, p, study["index"])
            out.update(_render_series(pat, study, series, hu))
        for obj in study["objects"]:
            out[obj["path"]] = _render_object(pat, study, obj)
    return out


def _to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _ct_header(pat, study, series, entry, sop_class) -> Dataset:
    """The header of one file of a CT series (classic or enhanced)."""
    ds = _header(
        pat,
        study,
        sop_class=sop_class,
        sop_uid=entry["uid"],
        ts=series["ts"],
        modality="CT",
        series_uid=series["uid"],
        number=series["number"],
        description=series["description"],
    )
    ds.FrameOfReferenceUID = series["frame_uid"]
    return ds


def _header(pat, study, *, sop_class, sop_uid, ts, modality, series_uid, number, description):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ts
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study["date"]
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study["time"]
    ds.AccessionNumber = study["AccessionNumber"]
    ds.Modality = modality
    ds.Manufacturer = "Synthetic Medical Systems"
    ds.ManufacturerModelName = "XD-SYNTH CT"
    for key in (
        "InstitutionName",
        "InstitutionAddress",
        "ReferringPhysicianName",
        "StationName",
        "PerformingPhysicianName",
        "OperatorsName",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "OtherPatientIDs",
        "PatientAddress",
    ):
        setattr(ds, key, pat[key])
    ds.StudyDescription = study["StudyDescription"]
    ds.SeriesDescription = description
    ds.PatientAge = study["age"]
    ds.StudyInstanceUID = study["uid"]
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study["StudyID"]
    ds.SeriesNumber = number
    return ds


def _stored(hu: np.ndarray, series: dict) -> np.ndarray:
    """Stored values that rescale exactly to ``hu``; checked to fit BitsStored."""
    values = np.round((hu.astype(np.float64) - series["intercept"]) / series["slope"])
    bits = series["bits"]
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if series["signed"] else (0, 2**bits - 1)
    assert lo <= values.min() and values.max() <= hi, "HU do not fit BitsStored"
    return values.astype(np.int16 if series["signed"] else np.uint16)


def _pixel_module(ds: Dataset, series: dict, rows: int, cols: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = series["photometric"]
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = series["bits"]
    ds.HighBit = series["bits"] - 1
    ds.PixelRepresentation = int(series["signed"])


def _set_pixels(ds: Dataset, stored: np.ndarray, ts: str) -> None:
    if ts in (RLELossless, JPEG2000Lossless):
        ds.compress(ts, stored, generate_instance_uid=False)
        return
    if ts == ExplicitVRBigEndian:
        stored = stored.astype(stored.dtype.newbyteorder(">"))
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"


def _render_series(pat: dict, study: dict, series: dict, hu: np.ndarray) -> dict[str, bytes]:
    stored = _stored(hu, series)
    out = {}
    for entry in series["files"]:
        kind = entry["kind"]
        if kind == "duplicate":
            continue
        if kind == "enhanced":
            out[entry["path"]] = _enhanced(pat, study, series, stored, entry)
            continue
        ds = _ct_header(pat, study, series, entry, CTImageStorage)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER" if kind == "localizer" else "AXIAL"]
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "FFS" if series["quirk"] == "feet_first" else "HFS"
        ds.BodyPartExamined = pat["region"].upper()
        ds.KVP = 120
        ds.InstanceNumber = entry["number"]
        ds.AcquisitionNumber = 1
        sp = series["spacing"]
        if kind == "localizer":
            plane, position, spacing = _localizer(series, hu, stored)
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
            ds.SliceThickness = series["step"]
        else:
            k = entry["k"]
            plane, position, spacing = stored[k], series["positions"][k], [sp, sp]
            ds.ImageOrientationPatient = [float(v) for v in (*series["row"], *series["col"])]
            ds.SliceThickness = ds.SpacingBetweenSlices = series["step"]
            ds.SliceLocation = round(float(position[2]), 4)
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.PixelSpacing = spacing
        _pixel_module(ds, series, *plane.shape)
        ds.RescaleIntercept = series["intercept"]
        ds.RescaleSlope = series["slope"]
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = series["window"]
        _set_pixels(ds, np.ascontiguousarray(plane), series["ts"])
        out[entry["path"]] = _to_bytes(ds)
    for entry in series["files"]:
        if entry["kind"] == "duplicate":
            original = next(
                f for f in series["files"] if f["uid"] == entry["uid"] and f["kind"] == "slice"
            )
            out[entry["path"]] = out[original["path"]]
    return out


def _localizer(series: dict, hu: np.ndarray, stored: np.ndarray):
    """A coronal image through the middle row: rows run head to feet, other size than axial."""
    slices, n = hu.shape[0], series["side"]
    rows = max(8, round(n * 0.75))
    pick = np.minimum((np.arange(rows) * slices / rows).astype(int), slices - 1)
    plane = stored[::-1, n // 2, :][pick]
    height = slices * series["step"]
    top = series["positions"][-1] + series["col"] * series["spacing"] * n / 2
    return plane, top, [round(height / rows, 4), series["spacing"]]


def _enhanced(pat, study, series, stored, entry) -> bytes:
    ds = _ct_header(pat, study, series, entry, EnhancedCTImageStorage)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.InstanceNumber = entry["number"]
    ds.ContentQualification = "PRODUCT"
    ds.BurnedInAnnotation = "NO"
    ds.AcquisitionDateTime = study["date"] + study["time"]
    ds.PresentationLUTShape = "IDENTITY"
    ds.NumberOfFrames = series["slices"]
    _pixel_module(ds, series, series["side"], series["side"])
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = [float(v) for v in (*series["row"], *series["col"])]
    shared.PlaneOrientationSequence = [orientation]
    measures = Dataset()
    measures.PixelSpacing = [series["spacing"], series["spacing"]]
    measures.SliceThickness = measures.SpacingBetweenSlices = series["step"]
    shared.PixelMeasuresSequence = [measures]
    transform = Dataset()
    transform.RescaleIntercept = series["intercept"]
    transform.RescaleSlope = series["slope"]
    transform.RescaleType = "HU"
    shared.PixelValueTransformationSequence = [transform]
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = series["window"]
    shared.FrameVOILUTSequence = [voi]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in series["order"]:
        frame = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [float(v) for v in series["positions"][k]]
        frame.PlanePositionSequence = [position]
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = int(k) + 1
        frame.FrameContentSequence = [content]
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = frames
    _set_pixels(ds, np.ascontiguousarray(stored[series["order"]]), series["ts"])
    return _to_bytes(ds)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def _image_refs(series: dict) -> list[Dataset]:
    refs = []
    for entry in series["files"]:
        if entry["kind"] in ("slice", "enhanced"):
            ref = Dataset()
            ref.ReferencedSOPClassUID = (
                EnhancedCTImageStorage if entry["kind"] == "enhanced" else CTImageStorage
            )
            ref.ReferencedSOPInstanceUID = entry["uid"]
            refs.append(ref)
    return refs


def _render_object(pat: dict, study: dict, obj: dict) -> bytes:
    ds = _header(
        pat,
        study,
        sop_class=obj["sop_class"],
        sop_uid=obj["uid"],
        ts=ExplicitVRLittleEndian,
        modality=obj["modality"],
        series_uid=obj["series_uid"],
        number=obj["number"],
        description=obj["description"],
    )
    ds.InstanceNumber = 1
    series = study["series"][0]
    refs = _image_refs(series)
    if obj["kind"] == "sr":
        ds.ValueType = "CONTAINER"
        ds.ContinuityOfContent = "SEPARATE"
        ds.CompletionFlag = "COMPLETE"
        ds.VerificationFlag = "UNVERIFIED"
        ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic Imaging Report")]
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "TEXT"
        item.ConceptNameCodeSequence = [_code("121071", "DCM", "Finding")]
        item.TextValue = (
            f"CT {pat['region']} of {pat['given']} {pat['family']} ({pat['PatientID']}): "
            "no acute findings."
        )
        ds.ContentSequence = [item]
    elif obj["kind"] == "pr":
        ds.ContentLabel = "WINDOW"
        ds.ContentDescription = f"Window for {pat['family']}"
        ds.PresentationCreationDate = study["date"]
        ds.PresentationCreationTime = study["time"]
        ds.ContentCreatorName = pat["ReferringPhysicianName"]
        ref_series = Dataset()
        ref_series.SeriesInstanceUID = series["uid"]
        ref_series.ReferencedImageSequence = refs[:1]
        ds.ReferencedSeriesSequence = [ref_series]
        voi = Dataset()
        voi.ReferencedImageSequence = refs[:1]
        voi.WindowCenter, voi.WindowWidth = series["window"]
        ds.SoftcopyVOILUTSequence = [voi]
        ds.PresentationLUTShape = "IDENTITY"
    else:
        ds.StructureSetLabel = "BODY"
        ds.StructureSetName = f"{pat['family']} contours"
        ds.StructureSetDate, ds.StructureSetTime = study["date"], study["time"]
        frame_ref = Dataset()
        frame_ref.FrameOfReferenceUID = series["frame_uid"]
        ref_study = Dataset()
        ref_study.ReferencedSOPClassUID = RTSTRUCT_STUDY_CLASS
        ref_study.ReferencedSOPInstanceUID = study["uid"]
        ref_series = Dataset()
        ref_series.SeriesInstanceUID = series["uid"]
        ref_series.ContourImageSequence = refs
        ref_study.RTReferencedSeriesSequence = [ref_series]
        frame_ref.RTReferencedStudySequence = [ref_study]
        ds.ReferencedFrameOfReferenceSequence = [frame_ref]
        roi = Dataset()
        roi.ROINumber = 1
        roi.ReferencedFrameOfReferenceUID = series["frame_uid"]
        roi.ROIName = "BODY"
        roi.ROIGenerationAlgorithm = "MANUAL"
        ds.StructureSetROISequence = [roi]
        k = series["slices"] // 2
        n, sp = series["side"], series["spacing"]
        center = (
            series["positions"][k] + (series["row"] + series["col"]) * sp * n / 2
        )  # middle of the middle slice
        angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        points = (
            center
            + np.cos(angles)[:, None] * series["row"] * sp * n * 0.4
            + np.sin(angles)[:, None] * series["col"] * sp * n * 0.3
        )
        contour = Dataset()
        contour.ContourGeometricType = "CLOSED_PLANAR"
        contour.NumberOfContourPoints = len(points)
        contour.ContourData = [round(float(v), 3) for v in points.ravel()]
        contour.ContourImageSequence = refs[k : k + 1] or refs[:1]
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = 1
        roi_contour.ROIDisplayColor = [255, 0, 0]
        roi_contour.ContourSequence = [contour]
        ds.ROIContourSequence = [roi_contour]
        observation = Dataset()
        observation.ObservationNumber = 1
        observation.ReferencedROINumber = 1
        observation.RTROIInterpretedType = "EXTERNAL"
        observation.ROIInterpreter = pat["PerformingPhysicianName"]
        ds.RTROIObservationsSequence = [observation]
    return _to_bytes(ds)


# --------------------------------------------------------------------------- DICOMDIR


def _record(kind: str, **attrs) -> Dataset:
    record = Dataset()
    record.OffsetOfTheNextDirectoryRecord = 0
    record.RecordInUseFlag = 0xFFFF
    record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    record.DirectoryRecordType = kind
    for key, value in attrs.items():
        setattr(record, key, value)
    return record


def _dicomdir(seed: int, patients: list[dict]) -> bytes:
    """A Media Storage Directory listing every DICOM file (not the duplicate's second name).

    Records are written depth first; their offsets are found by writing once, reading the
    item positions back and writing again (offsets are fixed-size, so nothing moves).
    """
    records: list[tuple[Dataset, int | None]] = []

    def add(parent: int | None, kind: str, **attrs) -> int:
        records.append((_record(kind, **attrs), parent))
        return len(records) - 1

    def image(parent, entry, sop_class, ts, kind="IMAGE", **attrs):
        add(
            parent,
            kind,
            ReferencedFileID=entry["path"].split("/"),
            ReferencedSOPClassUIDInFile=sop_class,
            ReferencedSOPInstanceUIDInFile=entry["uid"],
            ReferencedTransferSyntaxUIDInFile=ts,
            **attrs,
        )

    for pat in patients:
        p_rec = add(None, "PATIENT", PatientID=pat["PatientID"], PatientName=pat["PatientName"])
        for study in pat["studies"]:
            st_rec = add(
                p_rec,
                "STUDY",
                StudyDate=study["date"],
                StudyTime=study["time"],
                StudyDescription=study["StudyDescription"],
                StudyInstanceUID=study["uid"],
                StudyID=study["StudyID"],
                AccessionNumber=study["AccessionNumber"],
            )
            for series in study["series"]:
                se_rec = add(
                    st_rec,
                    "SERIES",
                    Modality="CT",
                    SeriesInstanceUID=series["uid"],
                    SeriesNumber=series["number"],
                )
                for entry in series["files"]:
                    if entry["kind"] == "duplicate":
                        continue
                    sop = EnhancedCTImageStorage if entry["kind"] == "enhanced" else CTImageStorage
                    image(se_rec, entry, sop, series["ts"], InstanceNumber=entry["number"])
            for obj in study["objects"]:
                se_rec = add(
                    st_rec,
                    "SERIES",
                    Modality=obj["modality"],
                    SeriesInstanceUID=obj["series_uid"],
                    SeriesNumber=obj["number"],
                )
                ts = ExplicitVRLittleEndian
                if obj["kind"] == "sr":
                    image(
                        se_rec,
                        obj,
                        obj["sop_class"],
                        ts,
                        "SR DOCUMENT",
                        CompletionFlag="COMPLETE",
                        VerificationFlag="UNVERIFIED",
                        ContentDate=study["date"],
                        ContentTime=study["time"],
                        ConceptNameCodeSequence=[
                            _code("18748-4", "LN", "Diagnostic Imaging Report")
                        ],
                    )
                elif obj["kind"] == "pr":
                    image(
                        se_rec,
                        obj,
                        obj["sop_class"],
                        ts,
                        "PRESENTATION",
                        PresentationCreationDate=study["date"],
                        PresentationCreationTime=study["time"],
                        ContentLabel="WINDOW",
                        InstanceNumber=1,
                    )
                else:
                    image(
                        se_rec,
                        obj,
                        obj["sop_class"],
                        ts,
                        "RT STRUCTURE SET",
                        InstanceNumber=1,
                        StructureSetLabel="BODY",
                        StructureSetDate=study["date"],
                        StructureSetTime=study["time"],
                    )

    rng = rng_for(seed, name, "dicomdir")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    ds.file_meta.MediaStorageSOPInstanceUID = _uid(rng)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.FileSetID = "PACS_EXPORT"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    ds.DirectoryRecordSequence = Sequence([record for record, _ in records])
    first = _to_bytes(ds)
    read = pydicom.dcmread(io.BytesIO(first))
    tells = [item.seq_item_tell for item in read.DirectoryRecordSequence]
    children: dict[int | None, list[int]] = defaultdict(list)
    for index, (_, parent) in enumerate(records):
        children[parent].append(index)
    for parent, kids in children.items():
        for a, b in zip(kids, kids[1:], strict=False):
            records[a][0].OffsetOfTheNextDirectoryRecord = tells[b]
        if parent is None:
            ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = tells[kids[0]]
            ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = tells[kids[-1]]
        else:
            records[parent][0].OffsetOfReferencedLowerLevelDirectoryEntity = tells[kids[0]]
    second = _to_bytes(ds)
    assert len(second) == len(first)
    return second
