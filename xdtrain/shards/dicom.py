"""A hospital's DICOM export (``--dataset dicom``): CT (and MR) series as 2-D slices.

The scan reads every file's header (pydicom, without pixel data), whatever the nesting, the
file names or their lack of an extension, and keeps the CT and MR image objects:

* DICOMDIR files, non-image objects (SR, PR, RTSTRUCT, secondary captures, which often carry
  burned-in text), other modalities, non-DICOM files and localizer/scout images (ImageType
  ``LOCALIZER``) are left out and counted in the manifest's ``decisions``; unreadable files
  are listed in ``skipped`` with the reason;
* slices are grouped into series by SeriesInstanceUID and ordered by their position along the
  slice normal (ImagePositionPatient · (row × column direction of ImageOrientationPatient)),
  never by file name or InstanceNumber; a multi-frame (Enhanced CT/MR) file gives one slice
  per frame, placed by its per-frame functional groups;
* a second file with a SOPInstanceUID already seen is left out (counted); a series whose
  slices have several orientations or sizes is split into one part per orientation and size,
  and one with a gap or uneven spacing into its evenly spaced runs, each with a note; two
  slices at one position (two acquisitions in a series) split it by AcquisitionNumber, or
  skip it when that does not separate them;
* pixel data are decoded by pydicom's handlers (uncompressed in either byte order, RLE,
  JPEG lossless and baseline, JPEG-LS and JPEG 2000 through the pylibjpeg plugins); a series
  in a transfer syntax that no installed handler decodes is skipped with the syntax named;
* values are the modality LUT's output (RescaleSlope, RescaleIntercept; per frame for
  enhanced objects): Hounsfield units for CT. MONOCHROME1 says how to *display* those values
  and changes none of them (DICOM PS3.3 C.7.6.3.1.2), so it is not inverted.

Every slice is then turned to the canonical view (:func:`canonical_view`), windowed and
written by :mod:`xdtrain.shards.slices`. Patients and series are named by keyed-hash
pseudonyms; no header value is written, and paths in messages are scrubbed of identifiers.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xdtrain.errors import UserError
from xdtrain.shards import slices
from xdtrain.shards.base import Scan, SkipItem, Source, rel, walk
from xdtrain.shards.slices import Volume

name = "dicom"
volumetric = True
groups_are_keys = False
components = slices.components
split_ratios = slices.split_ratios
layout_of = slices.layout_of

CT_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}
MR_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
}
IMAGE_CLASSES = CT_CLASSES | MR_CLASSES
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
# Identifying elements whose values are scrubbed from any text written (PS3.15 Annex E,
# basic profile: names, IDs, dates, institutions, free text); UIDs and dates are scrubbed by
# their shape whatever element they came from.
IDENTIFYING = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "AccessionNumber",
    "StudyID",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "StationName",
    "DeviceSerialNumber",
    "StudyDescription",
    "SeriesDescription",
    "RequestingPhysician",
    *(
        f"{what}{kind}"
        for what in ("Study", "Series", "Acquisition", "Content")
        for kind in ("Date", "Time")
    ),
    "PatientBirthDate",
    "AcquisitionDateTime",
)
DATES = {"StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "PatientBirthDate"}
PERSON_NAMES = {  # of IDENTIFYING: person names, whose components are scrubbed too
    "PatientName",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingPhysician",
}
POSITION_TOLERANCE = 0.01  # mm: positions closer than this are one position
SPACING_RTOL = 0.02  # a step more than 2 % off the series' spacing breaks it


def add_arguments(group) -> None:
    slices.add_arguments(group)


def options(args) -> dict:
    return slices.options(args)


def cpu_bound(options: dict) -> bool:
    return True


# --------------------------------------------------------------------------- headers


@dataclass(slots=True)
class Frame:
    """One slice as the headers place it (identifiers kept in memory only, never written)."""

    path: str
    relative: str  # path below --src (matched against the labels CSV's file column)
    shown: str  # path below --src, scrubbed once the scan has read every header
    frame: int | None  # frame index in a multi-frame file
    sop: str
    series: str
    study: str
    patient: str
    modality: str
    position: np.ndarray  # ImagePositionPatient, mm
    orientation: tuple[float, ...]  # ImageOrientationPatient (6 direction cosines)
    shape: tuple[int, int]
    spacing: tuple[float, float]  # PixelSpacing: between rows, between columns (mm)
    slope: float
    intercept: float
    acquisition: str
    syntax: str


class _Ignored(Exception):
    """A file that is no image to pack (counted by kind, not listed)."""


# The first tag of a DICOM data set written without the Part 10 preamble (older PACS
# exports): group 0x0002 (file meta) or 0x0008 (identification), little endian.
_RAW_STARTS = (b"\x02\x00", b"\x08\x00")


@contextmanager
def _quietly():
    """Silence pydicom while it reads: it warns (and logs) about damaged files with their
    full path, and about invalid values with the value itself, and neither may reach the
    terminal; what matters reaches the manifest, scrubbed."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _read_header(path: Path):
    """The header of a DICOM file, with the Part 10 preamble (``DICM`` at byte 128) or, as
    older exports write them, without it. Raises :class:`_Ignored` for other files."""
    import pydicom

    with open(path, "rb") as fh:
        head = fh.read(132)
    if len(head) == 132 and head[128:132] == b"DICM":
        return pydicom.dcmread(path, stop_before_pixels=True)
    if head[:2] not in _RAW_STARTS:
        raise _Ignored("non-DICOM files")
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # not DICOM after all: bytes that only began like a tag
        raise _Ignored("non-DICOM files") from None
    if "SOPClassUID" not in ds:
        raise _Ignored("non-DICOM files")
    return ds


def _read_whole(path: str):
    """A DICOM file with its pixel data; a file without the Part 10 header (no file meta)
    is given the transfer syntax it was found to be encoded in, so its pixels decode."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ds = pydicom.dcmread(path, force=True)
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        ds.file_meta = meta if meta is not None else FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit
            else ExplicitVRLittleEndian
            if little
            else ExplicitVRBigEndian
        )
    return ds


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _item(ds, sequence: str):
    value = getattr(ds, sequence, None)
    return value[0] if value else None


def _functional(ds, index: int, group: str):
    """The item ``group`` of frame ``index``: per-frame first, then shared."""
    for top in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        items = getattr(ds, top, None)
        if not items:
            continue
        item = items[index] if top.startswith("PerFrame") and index < len(items) else items[0]
        found = _item(item, group)
        if found is not None:
            return found
    return None


_SHARED: dict = {}


def _shared(value):
    """One object for equal values (strings, tuples) across the slices of a scan."""
    return _SHARED.setdefault(value, value)


def _frames(ds, path: Path, relative: str, shown: str) -> list[Frame]:
    """The slices of one image file: one, or one per frame of a multi-frame object."""
    syntax = str(getattr(ds.file_meta, "TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    common = {
        "path": str(path),
        "relative": relative,
        "shown": shown,
        "sop": str(getattr(ds, "SOPInstanceUID", "")),
        # values shared by the slices of a series are stored once (a scan holds a record
        # per slice: millions of them for a large export)
        "series": _shared(str(getattr(ds, "SeriesInstanceUID", ""))),
        "study": _shared(str(getattr(ds, "StudyInstanceUID", ""))),
        "patient": _shared(str(getattr(ds, "PatientID", "") or "").strip()),
        "modality": _shared(str(getattr(ds, "Modality", "")).upper()),
        "shape": _shared((int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0))),
        "acquisition": _shared(str(getattr(ds, "AcquisitionNumber", "") or "")),
        "syntax": _shared(syntax),
    }
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    out = []
    for index in range(frames):
        if enhanced:
            plane = _functional(ds, index, "PlanePositionSequence")
            orient = _functional(ds, index, "PlaneOrientationSequence")
            measures = _functional(ds, index, "PixelMeasuresSequence")
            rescale = _functional(ds, index, "PixelValueTransformationSequence")
            position = getattr(plane, "ImagePositionPatient", None) if plane else None
            orientation = getattr(orient, "ImageOrientationPatient", None) if orient else None
            spacing = getattr(measures, "PixelSpacing", None) if measures else None
            source = rescale if rescale is not None else ds
        else:
            position = getattr(ds, "ImagePositionPatient", None)
            orientation = getattr(ds, "ImageOrientationPatient", None)
            spacing = getattr(ds, "PixelSpacing", None)
            source = ds
        position, orientation = _floats(position, 3), _floats(orientation, 6)
        if position is None or orientation is None:
            raise SkipItem(
                "no usable ImagePositionPatient/ImageOrientationPatient: its slices cannot be "
                "placed"
            )
        spacing = _floats(spacing, 2) if spacing is not None else None
        out.append(
            Frame(
                frame=index if frames > 1 or enhanced else None,
                position=np.array(position, np.float64),
                orientation=_shared(orientation),
                spacing=_shared(spacing or (0.0, 0.0)),
                slope=_shared(float(getattr(source, "RescaleSlope", 1) or 1)),
                intercept=_shared(float(getattr(source, "RescaleIntercept", 0) or 0)),
                **common,
            )
        )
    return out


def _kind(ds) -> str | None:
    """Why a readable DICOM object is not an image to pack (its kind, counted), or None."""
    meta_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    sop_class = str(getattr(ds, "SOPClassUID", "") or meta_class)
    if meta_class == DICOMDIR_CLASS or sop_class == DICOMDIR_CLASS:
        return "DICOMDIR files"
    if sop_class not in IMAGE_CLASSES:
        modality = str(getattr(ds, "Modality", "") or "no modality")
        return f"non-image or other objects ({modality})"
    image_type = [str(v).upper() for v in (getattr(ds, "ImageType", None) or [])]
    if "LOCALIZER" in image_type:
        return "localizer (scout) images"
    return None


def _decodable(syntax: str) -> str | None:
    """Why pixel data in ``syntax`` cannot be decoded here, or None."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    uid = UID(syntax)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"transfer syntax {uid.name} ({syntax}) has no pixel data decoder in pydicom"
    if not decoder.is_available:
        return (
            f"transfer syntax {uid.name} ({syntax}): no installed plugin decodes it (install "
            "the pylibjpeg plugins or python-gdcm)"
        )
    return None


# --------------------------------------------------------------------------- geometry


def canonical_view(orientation: tuple[float, ...]) -> tuple[bool, bool, bool]:
    """``(transpose, flip_rows, flip_columns)`` that bring a slice stored with
    ``orientation`` (ImageOrientationPatient) to the radiological view of its plane.

    Columns then run along the lower-numbered LPS axis of the plane in its positive
    direction (axial and coronal: to the patient's left; sagittal: posterior), rows along the
    other, positive for L and P and negative for S (axial: anterior at the top; coronal and
    sagittal: superior at the top). An oblique plane takes the closest of these (the largest
    direction cosine), without resampling.
    """
    along_row = np.asarray(orientation[:3])  # where the column index increases
    along_col = np.asarray(orientation[3:])  # where the row index increases
    transpose = int(np.argmax(np.abs(along_row))) > int(np.argmax(np.abs(along_col)))
    if transpose:
        along_row, along_col = along_col, along_row
    col_axis = int(np.argmax(np.abs(along_col)))
    flip_columns = along_row[int(np.argmax(np.abs(along_row)))] < 0
    flip_rows = along_col[col_axis] > 0 if col_axis == 2 else along_col[col_axis] < 0
    return transpose, bool(flip_rows), bool(flip_columns)


def to_view(plane: np.ndarray, view: tuple[bool, bool, bool]) -> np.ndarray:
    transpose, flip_rows, flip_columns = view
    if transpose:
        plane = plane.T
    if flip_rows:
        plane = plane[::-1, :]
    if flip_columns:
        plane = plane[:, ::-1]
    return np.ascontiguousarray(plane)


def _normal(orientation: tuple[float, ...]) -> np.ndarray:
    return np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))


def order(frames: list[Frame]) -> tuple[list[Frame], np.ndarray]:
    """Frames of one orientation sorted along the slice normal, slice 0 at the negative end of
    the normal's dominant LPS axis (axial: most inferior); and their positions (mm)."""
    normal = _normal(frames[0].orientation)
    where = np.array([f.position @ normal for f in frames])
    if normal[int(np.argmax(np.abs(normal)))] < 0:
        where = -where
    ranked = np.argsort(where, kind="stable")
    return [frames[i] for i in ranked], where[ranked]


def runs(where: np.ndarray) -> tuple[list[slice], float]:
    """Evenly spaced runs of sorted positions: ``(runs, spacing)``; the spacing is the median
    step, and a step more than :data:`SPACING_RTOL` off it starts a new run."""
    if len(where) < 2:
        return [slice(0, len(where))], 0.0
    steps = np.diff(where)
    spacing = float(np.median(steps))
    breaks = np.flatnonzero(
        np.abs(steps - spacing) > max(POSITION_TOLERANCE, SPACING_RTOL * spacing)
    )
    edges = [0, *(int(b) + 1 for b in breaks), len(where)]
    return [slice(a, b) for a, b in zip(edges, edges[1:], strict=False)], spacing


# --------------------------------------------------------------------------- scan


def scan(src: Path, options: dict) -> Scan:
    context = slices.Context.open(src, options)
    _SHARED.clear()
    skipped: list[dict] = []
    notes: list[dict] = []
    counts: Counter = Counter()
    series: dict[str, list[Frame]] = defaultdict(list)
    seen_sop: set[str] = set()
    files = walk(src, lambda name: True)
    if not files:
        raise UserError(f"{src}: no files found; pass --src with the DICOM export")
    with _quietly():
        for path in files:
            _read_file(path, src, options, context, series, seen_sop, counts, skipped)
    # paths are scrubbed once every header is read, with all their identifiers: a file read
    # before its patient's headers is scrubbed too, and the pattern is compiled once
    for entry in skipped:  # (reasons name no file)
        entry["input"] = context.scrub(entry["input"])
    for frames in series.values():
        for frame in frames:
            frame.shown = context.scrub(frame.shown)
    volumes = []
    unlabelled = 0
    for uid in sorted(series, key=lambda u: context.names.series(u)):
        for volume, note in _assemble(series[uid], context, skipped):
            if note:
                notes.append({"input": volume.where, "note": note})
            if all(label is None for label in volume.labels):
                unlabelled += 1
                continue
            volumes.append(volume)
    if not volumes and unlabelled:
        raise UserError(
            f"{options['labels']}: none of the {unlabelled} series found has a row in --labels; "
            "check the CSV's key columns (PatientID, StudyInstanceUID, SeriesInstanceUID, file)"
        )
    if not volumes and not skipped:
        raise UserError(
            f"{src}: no {'/'.join(options['modalities'])} image series found among "
            f"{len(files)} file(s); check --src and --modalities"
        )
    _SHARED.clear()
    kept, selection = slices.select(volumes, options)
    sources = slices.sources(kept, context)
    info = slices.info(context, selection, kept)
    info["decisions"] = _decisions(counts, notes, unlabelled, context)
    return Scan(sources, context.classes, skipped, notes, info, scrub=context.scrub)


def _read_file(path, src, options, context, series, seen_sop, counts, skipped) -> None:
    """Read one file's header into ``series``, or count or list why not."""
    shown = rel(path, src)  # scrubbed once every header is read (see scan)
    try:
        ds = _read_header(path)
    except _Ignored as exc:
        counts[str(exc)] += 1
        return
    except Exception as exc:  # pydicom raises many kinds for a damaged header
        skipped.append(
            {"input": shown, "reason": f"unreadable DICOM header ({type(exc).__name__})"}
        )
        return
    for keyword in IDENTIFYING:
        value = getattr(ds, keyword, None)
        context.scrub.add(value, name=keyword in PERSON_NAMES, date=keyword in DATES)
    meta = getattr(ds, "file_meta", None)
    meta_class = str(getattr(meta, "MediaStorageSOPClassUID", "") or "")
    if meta_class != DICOMDIR_CLASS and not getattr(ds, "SOPClassUID", None):
        # a file meta (or none) over bytes that parse into no DICOM object: cut short, damaged
        skipped.append(
            {"input": shown, "reason": "unreadable DICOM header (no SOPClassUID: cut short?)"}
        )
        return
    sop_class = str(getattr(ds, "SOPClassUID", "") or "")
    if meta_class and meta_class != DICOMDIR_CLASS and sop_class != meta_class:
        skipped.append(
            {
                "input": shown,
                "reason": "damaged DICOM header (its SOPClassUID is not its file meta's: cut "
                "short?)",
            }
        )
        return
    kind = _kind(ds)
    if kind is not None:
        counts[kind] += 1
        return
    lacking = [k for k in ("Modality", "Rows", "Columns") if k not in ds]
    if lacking:
        skipped.append(
            {
                "input": shown,
                "reason": f"incomplete image header (no {', '.join(lacking)}: cut short?)",
            }
        )
        return
    modality = str(getattr(ds, "Modality", "")).upper()
    if modality not in options["modalities"]:
        counts[f"{modality or 'no-modality'} images (not in --modalities)"] += 1
        return
    if int(getattr(ds, "SamplesPerPixel", 1) or 1) != 1:
        skipped.append({"input": shown, "reason": "colour pixel data (SamplesPerPixel > 1)"})
        return
    try:
        frames = _frames(ds, path, rel(path, src), shown)
    except SkipItem as exc:
        skipped.append({"input": shown, "reason": str(exc)})
        return
    if not frames[0].patient:
        skipped.append({"input": shown, "reason": "no PatientID: the split by patient needs it"})
        return
    if not frames[0].series:
        skipped.append({"input": shown, "reason": "no SeriesInstanceUID"})
        return
    sop = frames[0].sop
    if sop and sop in seen_sop:
        counts["files repeating a SOPInstanceUID already read"] += 1
        return
    seen_sop.add(sop)
    series[frames[0].series].extend(frames)


def _assemble(frames: list[Frame], context: slices.Context, skipped: list[dict]):
    """Yield ``(volume, note)`` for the parts of one series (see the module's docstring)."""
    names = context.names
    first = frames[0]
    key = names.series(first.series)
    patient = names.patient(first.patient)
    if len({f.patient for f in frames}) > 1:  # a UID reused by another patient's series
        skipped.append(
            {
                "input": first.shown,
                "reason": f"series {key}: its SeriesInstanceUID is shared by "
                f"{len({f.patient for f in frames})} PatientIDs, so its slices cannot be "
                "told apart by patient; export it again with unique UIDs",
            }
        )
        return
    for syntax in sorted({f.syntax for f in frames if f.syntax}):  # files may differ
        problem = _decodable(syntax)
        if problem is not None:
            shown = next(f.shown for f in frames if f.syntax == syntax)
            skipped.append({"input": shown, "reason": f"series {key}: {problem}"})
            return
    groups: dict[tuple, list[Frame]] = defaultdict(list)
    for frame in frames:
        rounded = tuple(round(v, 3) for v in frame.orientation)
        groups[(rounded, frame.shape, tuple(round(v, 4) for v in frame.spacing))].append(frame)
    parts: list[tuple[list[Frame], np.ndarray, float, str | None]] = []
    for group in groups.values():
        ordered, where = order(group)
        steps = np.diff(where)
        if (steps < POSITION_TOLERANCE).any():
            acquisitions = defaultdict(list)
            for frame in group:
                acquisitions[frame.acquisition].append(frame)
            if len(acquisitions) == 1:
                skipped.append(
                    {
                        "input": first.shown,
                        "reason": f"series {key}: two slices at one position (and one "
                        "AcquisitionNumber): which belongs where is unknown",
                    }
                )
                continue
            pieces = [order(acq) for _, acq in sorted(acquisitions.items())]
            split_note = f"split by AcquisitionNumber ({len(pieces)} acquisitions)"
        else:
            pieces, split_note = [(ordered, where)], None
        for ordered, where in pieces:
            if (np.diff(where) < POSITION_TOLERANCE).any():
                skipped.append(
                    {"input": first.shown, "reason": f"series {key}: two slices at one position"}
                )
                continue
            found, spacing = runs(where)
            gap = (
                f"split at {len(found) - 1} step(s) off its {spacing:.3g} mm spacing (a missing "
                "slice or uneven spacing)"
                if len(found) > 1
                else None
            )
            for run in found:
                parts.append(
                    (
                        ordered[run],
                        where[run],
                        spacing,
                        "; ".join(filter(None, [split_note, gap])) or None,
                    )
                )
    if len(groups) > 1:
        shapes = f"{len(groups)} orientations or image sizes"
        parts = [
            (f, w, s, f"split by its {shapes}" + (f"; {n}" if n else "")) for f, w, s, n in parts
        ]
    for index, (ordered, where, spacing, _) in enumerate(parts):
        part_key = key if len(parts) == 1 else f"{key}-{index}"
        head = ordered[0]
        step = float(np.median(np.diff(where))) if len(where) > 1 else 0.0
        labels = [_labels(frame, context) for frame in ordered]
        volume = Volume(
            key=part_key,
            patient=patient,
            where=head.shown,
            modality=head.modality,
            spacing=slices.rounded([head.spacing[0], head.spacing[1], step or spacing]),
            slices=[(f.path, f.frame, f.slope, f.intercept, f.shown) for f in ordered],
            labels=labels,
            extra={
                "view": list(canonical_view(head.orientation)),
                "shape": list(head.shape),
            },
        )
        # one note per series, on its first part: how it was split into len(parts)
        said = sorted({n for *_, n in parts if n})
        yield volume, (f"series {key}: {'; '.join(said)}" if said and index == 0 else None)


def _labels(frame: Frame, context: slices.Context) -> tuple[str, ...] | None:
    if context.table is None:
        return ()
    return context.table.lookup(
        {
            "file": frame.relative,
            "SeriesInstanceUID": frame.series,
            "StudyInstanceUID": frame.study,
            "PatientID": frame.patient,
        }
    )


def _decisions(counts: Counter, notes: list[dict], unlabelled: int, context) -> list[dict]:
    out = [
        {"decision": f"left out: {kind}", "count": n, "detail": "counted, not listed"}
        for kind, n in sorted(counts.items())
    ]
    out.append(
        {
            "decision": "series split",
            "count": sum(1 for n in notes if "split" in n["note"]),
            "detail": "by orientation, size, acquisition, gaps or uneven spacing; see notes",
        }
    )
    return out + slices.label_decisions(context, unlabelled, "series")


# --------------------------------------------------------------------------- encoding


def read_planes(source: Source) -> list[np.ndarray]:
    """The kept slices of one volume, in order: float32 values after the modality LUT (HU for
    CT), each in the canonical view. Raises :class:`SkipItem` naming the file (scrubbed) for
    pixel data that does not decode or does not match its header."""
    return list(iter_planes(source))


def iter_planes(source: Source) -> Iterator[np.ndarray]:
    """:func:`read_planes` one slice at a time: a CT series is windowed slice by slice, so
    memory holds one decoded file (or one multi-frame object), not the whole series."""
    from pydicom.pixels import apply_modality_lut

    view = tuple(source.params["view"])
    shape = tuple(source.params["shape"])
    loaded: str | None = None
    for path, frame, slope, intercept, shown in source.params["slices"]:
        if loaded != path:  # the frames of a multi-frame file are decoded once
            ds = array = None
            try:
                with _quietly():
                    ds = _read_whole(path)
                    array = ds.pixel_array
            except Exception as exc:  # pydicom's handlers raise many kinds for damaged data
                syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
                how = f" in {syntax.name}" if syntax is not None else ""
                raise SkipItem(
                    f"{shown}: pixel data{how} cannot be read or decoded ({type(exc).__name__}); "
                    "the series is skipped"
                ) from None
            loaded = path
        plane = array[frame] if frame is not None and array.ndim == 3 else array
        if plane.shape != shape:
            raise SkipItem(
                f"{shown}: pixel data of shape {plane.shape}, not the {shape} of its header"
            )
        if "ModalityLUTSequence" in ds and frame is None:
            values = np.asarray(apply_modality_lut(plane, ds), np.float32)
        else:
            values = plane.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        slices.finite(values, shown)
        yield to_view(values, view)


def encode(source: Source, options: dict) -> list:
    return slices.samples(source, iter_planes(source), options)
