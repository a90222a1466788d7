"""A folder of NIfTI volumes (``--dataset nifti``): the usual research export of CT or MR.

Every ``*.nii`` and ``*.nii.gz`` below ``--src`` is one volume (a series). Its patient is the
first folder below ``--src`` (``SRC/<patient>/…/<file>.nii.gz``, the layout dcm2niix and most
exports write), or the file itself with ``--patient-from file`` (a flat folder of one
volume per patient). Volumes are brought to the canonical LPS orientation from their own
affine (:mod:`xdtrain.shards.orientation`: flips and transposes, never resampling) and cut
into axial slices, slice 0 the most inferior, rows anterior to posterior and columns from
the patient's right to left: the view of the DICOM packer and of BraTS and LiTS. Values are
the stored voxels scaled by the header's ``scl_slope``/``scl_inter`` (HU for CT written by
dcm2niix). Everything after that (selection, labels, windows, pseudonyms) is
:mod:`xdtrain.shards.slices`.

Folder and file names often hold a patient's name, ID or dates, and nothing in a NIfTI file
tells them from other text: patients and volumes are named by keyed-hash pseudonyms, and
messages and the manifest name a volume ``<patient pseudonym>/<volume pseudonym>.nii.gz``
(``xd-shard locate`` finds the file again, with the key). The labels CSV matches ``file``
(path below ``--src``) and ``PatientID`` (the patient folder's name, or with ``--patient-from
file`` the file's path below ``--src`` without ``.nii``/``.nii.gz``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from xdtrain.errors import UserError
from xdtrain.shards import orientation, slices
from xdtrain.shards.base import Scan, SkipItem, Source, rel, walk
from xdtrain.shards.slices import Volume

name = "nifti"
volumetric = True
groups_are_keys = False
components = slices.components
split_ratios = slices.split_ratios
layout_of = slices.layout_of
NIFTI = re.compile(r".+\.nii(\.gz)?", re.IGNORECASE)
SLAB = 32  # slices read at a time


def add_arguments(group) -> None:
    group.add_argument(
        "--patient-from",
        choices=["folder", "file"],
        default="folder",
        help="nifti: a volume's patient is the first folder below --src (default), or the "
        "file itself (file); the split is by patient",
    )


def options(args) -> dict:
    out = slices.options(args)
    if out["modalities"] == ["CT", "MR"]:
        raise UserError("--modalities: NIfTI files do not say their modality; pass CT or MR")
    out["patient_from"] = args.patient_from
    return out


def cpu_bound(options: dict) -> bool:
    return True


def _stem(name: str) -> str:
    return re.sub(r"\.nii(\.gz)?$", "", name, flags=re.IGNORECASE)


def _patient(relative: Path, how: str) -> str:
    """The patient's identifier: the first folder, or (``file``, or a file directly in
    --src) the file's path without its extension, unique per file."""
    if how == "file" or len(relative.parts) == 1:
        return _stem(relative.as_posix())
    return relative.parts[0]


def shown_name(relative: str, patient_id: str, names) -> str:
    """How a volume is named in messages and the manifest: ``<patient>/<volume>.nii.gz`` by
    their pseudonyms. NIfTI has no header to tell a name from other text, and exports name
    files after patients (dcm2niix's ``%n``) as often as folders; ``xd-shard locate`` gives
    the file of a pseudonym back to whoever holds the key."""
    extension = ".nii.gz" if relative.lower().endswith(".gz") else ".nii"
    return f"{names.patient(patient_id)}/{names.series(relative)}{extension}"


def locate(src: Path, options: dict, wanted: list[str]) -> dict[str, list[str]]:
    """The files below ``src`` whose volume or patient pseudonym (under the key of
    ``options``) is one of ``wanted``: ``{pseudonym: [paths below src]}``."""
    context = slices.Context.open(src, options)
    found: dict[str, list[str]] = {name: [] for name in wanted}
    for path in walk(src, NIFTI.fullmatch):
        relative = rel(path, src)
        patient = context.names.patient(_patient(Path(relative), options["patient_from"]))
        for name in (context.names.series(relative), patient):
            if name in found:
                found[name].append(relative)
    return found


def _identifying(relative: Path, how: str) -> str:
    """The part of a path that names the patient, scrubbed from what is written: the
    patient folder, or the file's name."""
    if how == "file" or len(relative.parts) == 1:
        return _stem(relative.name)
    return relative.parts[0]


def scan(src: Path, options: dict) -> Scan:
    context = slices.Context.open(src, options)
    files = walk(src, NIFTI.fullmatch)
    if not files:
        raise UserError(f"{src}: no .nii or .nii.gz files found; pass --src with the NIfTI folder")
    modality = options["modalities"][0]
    flat = sum(1 for p in files if len(Path(rel(p, src)).parts) == 1)
    for path in files:
        context.scrub.add(_identifying(Path(rel(path, src)), options["patient_from"]))
    skipped, notes, volumes, unlabelled = [], [], [], 0
    reoriented = 0
    original = {}
    for path in files:
        relative = rel(path, src)
        patient_id = _patient(Path(relative), options["patient_from"])
        shown = shown_name(relative, patient_id, context.names)
        try:
            case = orientation.read_case({"volume": path}, "check")
        except SkipItem as exc:
            skipped.append({"input": shown, "reason": _scrubbed(exc, path, shown, context)})
            continue
        geometry = case.image
        key = context.names.series(relative)
        depth = geometry.canonical_shape[2]
        notes += [{"input": shown, "note": context.scrub(n)} for n in case.notes]
        labels = None
        if context.table is None:
            labels = ()
        else:
            labels = context.table.lookup({"file": relative, "PatientID": patient_id})
        if labels is None:
            unlabelled += 1
            continue
        original[key] = geometry.codes
        reoriented += int(case.reoriented)
        volumes.append(
            Volume(
                key=key,
                patient=context.names.patient(patient_id),
                where=shown,
                modality=modality,
                spacing=slices.rounded(geometry.spacing[[1, 0, 2]]),
                slices=list(range(depth)),
                labels=[labels] * depth,
                extra={"path": str(path), "transform": geometry.transform.tolist()},
            )
        )
    if not volumes and not skipped:
        raise UserError(f"{src}: no NIfTI volume has a row in --labels; check the CSV's keys")
    kept, selection = slices.select(volumes, options)
    sources = slices.sources(kept, context)
    info = slices.info(context, selection, kept)
    info["orientation"] = orientation.orientation_record(original, reoriented)
    decisions = [
        {
            "decision": "patients from " + options["patient_from"],
            "count": len({v.patient for v in volumes}),
            "detail": f"{flat} file(s) directly in --src are each their own patient"
            if options["patient_from"] == "folder"
            else "each file is one patient",
        }
    ]
    info["decisions"] = decisions + slices.label_decisions(context, unlabelled, "volumes")
    return Scan(sources, context.classes, skipped, notes, info, scrub=context.scrub)


def _scrubbed(exc: Exception, path: Path, shown: str, context) -> str:
    """A reason from :mod:`xdtrain.shards.orientation` with the file named by its
    pseudonymous name."""
    return context.scrub(str(exc).replace(path.name, shown))


def read_planes(source: Source) -> list[np.ndarray]:
    """The kept axial slices of one volume, in order: float32 values (scaled by the header),
    rows anterior to posterior, columns patient right to left. Raises :class:`SkipItem`
    naming the file by its scrubbed path when its voxels cannot be read."""
    return list(iter_planes(source))


def iter_planes(source: Source) -> Iterator[np.ndarray]:
    """:func:`read_planes` slab by slab (the kept slices ascend, as the slabs do), so memory
    holds one slab, not the volume."""
    params = source.params
    keep = set(params["slices"])
    unreadable = SkipItem(f"{params['input']}: unreadable NIfTI voxel data")
    try:
        image = orientation.open_image(params["path"], "volume")
        slabs = orientation.canonical_slabs(image, params["transform"], SLAB, "volume")
    except SkipItem:
        raise unreadable from None
    while True:
        try:
            k0, slab = next(slabs)
        except StopIteration:
            return
        except SkipItem:
            raise unreadable from None
        for i in range(slab.shape[2]):
            if k0 + i in keep:
                plane = np.asarray(slab[:, :, i].T, np.float32)
                slices.finite(plane, params["input"])
                yield plane


def encode(source: Source, options: dict) -> list:
    return slices.samples(source, iter_planes(source), options)
