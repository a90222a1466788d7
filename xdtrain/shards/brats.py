"""BraTS 2020: each case's four MRI modalities into axial-slice samples, split by case.

Sample ``BraTS20_Training_001_075`` (case, slice index)::

    img.png    4 channels, in this order: flair, t1, t1ce, t2 (8- or 16-bit)
    mask.png   1 channel: 0 background, 1 necrotic/non-enhancing core, 2 edema,
               3 enhancing tumour (label 4 of the release stored as 3)
    pos.i32    int32 [case index in the manifest's ``cases``, slice index, slices in case]
    json       {"case", "slice", "slices", "grade"}

Every file is brought to the LPS voxel orientation from its affine, and a case is packed
only when its five files agree in world space (or, with ``--geometry image``, every file
takes the flair's affine); see :mod:`xdtrain.shards.orientation`. Slices are stored at the
file's own voxel grid (never resampled); the manifest's ``preprocessing.case_spacing_mm``
holds each case's voxel size in mm, in the order of ``cases`` and of a rebuilt volume's axes
(slice, PNG row, PNG column: LPS axes 2, 1, 0), from the flair's affine, for HD95 in mm.

Intensities are clipped per volume and modality to robust percentiles of the brain voxels
(0.5–99.5 by default) and scaled to the full 8- or 16-bit range; outside the brain stays 0.
Training slices are kept when they hold brain (default), tumour, or always (``--slices``);
validation and test cases keep every slice, so per-case scores are over whole volumes.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from xdtrain.errors import UserError
from xdtrain.shards import orientation
from xdtrain.shards.base import (
    SLICE_SELECTION,
    Layout,
    Sample,
    Scan,
    SkipItem,
    Source,
    float_pair,
    quantise,
    rel,
    slice_sample,
    slices_option,
    thins,
    walk,
)

name = "brats"
volumetric = True
groups_are_keys = False
MODALITIES = ("flair", "t1", "t1ce", "t2")
CLASSES = ["background", "necrotic/non-enhancing core", "edema", "enhancing tumour"]
LABEL_MAP = {0: 0, 1: 1, 2: 2, 4: 3}
components = {
    "img.png": "flair, t1, t1ce, t2 as a 4-channel PNG (8 or 16 bit)",
    "mask.png": "uint8 labels 0 background, 1 NCR/NET, 2 edema, 3 enhancing (release label 4)",
    "pos.i32": "int32 [case index, slice index, slices in case]",
    "json": "case id, slice index, slices in case, grade",
}
layout = Layout("segmentation", "img.png", 4, "pos.i32", "int32", 3, mask="mask.png")
CASE = re.compile(r"BraTS20_Training_\d+")


def add_arguments(group) -> None:
    group.add_argument(
        "--clip",
        default="0.5,99.5",
        help="BraTS: percentiles of brain voxels each modality is clipped to",
    )


def options(args) -> dict:
    lo, hi = float_pair(args.clip, "--clip", "0.5,99.5")
    if not 0 <= lo < hi <= 100:
        raise UserError(f"--clip {args.clip}: percentiles lie between 0 and 100")
    slices = slices_option(args, "BraTS", ("brain", "tumor", "all"))
    return {
        "slices": slices,
        "bits": args.bits or 8,
        "clip": [lo, hi],
        "geometry": args.geometry,
    }


def split_ratios(ratios: dict[str, float], options: dict) -> dict[str, float]:
    return ratios


def _grades(src: Path) -> dict[str, str]:
    grades = {}
    for path in walk(src, lambda name: name == "name_mapping.csv"):
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                case = row.get("BraTS_2020_subject_ID", "")
                if case:
                    grades[case] = row.get("Grade", "")
    return grades


def scan(src: Path, options: dict) -> Scan:
    """Find the case folders, read and check every file's header (not its voxels)."""
    folders = sorted(walk(src, CASE.fullmatch, dirs=True), key=lambda p: p.name)
    if not folders:
        raise UserError(
            f"{src}: no BraTS20_Training_* case folders found; pass --src with "
            "the folder holding MICCAI_BraTS2020_TrainingData"
        )
    grades = _grades(src)
    sources, skipped, notes, original = [], [], [], {}
    for folder in folders:
        case, where = folder.name, rel(folder, src)
        try:
            paths, renamed = _case_files(folder)
            headers = orientation.read_case(paths, options["geometry"])
        except SkipItem as exc:
            skipped.append({"input": where, "reason": str(exc)})
            continue
        if renamed is not None:
            note = f"segmentation of {case} under a non-standard name; used"
            notes.append({"input": rel(renamed, src), "note": note})
        notes += [{"input": where, "note": note} for note in headers.notes]
        original[case] = headers.image.codes
        spacing = headers.image.spacing  # mm along LPS axes 0, 1, 2
        sources.append(
            Source(
                key=case,
                group=case,
                stratum=grades.get(case, ""),
                params={
                    "input": where,
                    "paths": {k: str(v) for k, v in paths.items()},
                    "transforms": headers.transforms(),
                    "reoriented": headers.reoriented,
                    "grade": grades.get(case, ""),
                    "spacing_mm": _volume_spacing(spacing),
                },
            )
        )
    for index, source in enumerate(sources):
        source.params["case_index"] = index
    info = {
        "channels": list(MODALITIES),
        "clip_percentiles": options["clip"],
        "bits": options["bits"],
        "slices": options["slices"],
        "slice_selection": SLICE_SELECTION,
        "label_map": {str(k): v for k, v in LABEL_MAP.items()},
        "cases": [s.key for s in sources],
        "case_spacing_mm": [s.params["spacing_mm"] for s in sources],
        "geometry": orientation.GEOMETRY[options["geometry"]],
        "orientation": orientation.orientation_record(
            original, sum(s.params["reoriented"] for s in sources)
        ),
        "slice_axis": "axial: LPS axis 2 (slice 0 most inferior); PNG rows are LPS axis 1 "
        "(anterior at the top), columns LPS axis 0 (the patient's right on the left)",
    }
    return Scan(sources, CLASSES, skipped, notes, info)


def _volume_spacing(spacing) -> list[float]:
    """Voxel size in mm along the axes of a volume rebuilt from the stored slices (slice,
    PNG row, PNG column) from ``spacing``, the (3,) size along LPS axes 0, 1, 2
    (:attr:`xdtrain.shards.orientation.Geometry.spacing`): a PNG is ``volume[:, :, k].T``, so
    its rows run along LPS axis 1 and its columns along axis 0. Rounded to 1e-6 mm."""
    return [round(float(spacing[axis]), 6) for axis in (2, 1, 0)]


def _case_files(folder: Path) -> tuple[dict[str, Path], Path | None]:
    """``{modality or "seg": path}`` of one case folder (flair first), and the misnamed
    segmentation if that is what was found. Raises :class:`SkipItem` if a file is missing."""
    case = folder.name
    files = {p.name: p for p in folder.iterdir() if p.name.endswith((".nii", ".nii.gz"))}
    paths, missing = {}, []
    for modality in (*MODALITIES, "seg"):
        found = [
            files[n] for n in (f"{case}_{modality}.nii.gz", f"{case}_{modality}.nii") if n in files
        ]
        if found:
            paths[modality] = found[0]
        else:
            missing.append(modality)
    leftovers = sorted(set(files.values()) - set(paths.values()))
    renamed = None
    if "seg" in missing and len(leftovers) == 1:
        # The release misnames one case's segmentation (W39_1998.09.19_Segm.nii).
        paths["seg"] = renamed = leftovers[0]
        missing.remove("seg")
    if missing:
        raise SkipItem(f"missing {', '.join(missing)} NIfTI file(s)")
    return paths, renamed


def encode(source: Source, options: dict) -> list[Sample]:
    """One sample per kept axial slice of the case, in the LPS orientation."""
    paths, transforms = source.params["paths"], source.params["transforms"]
    volumes = {m: orientation.load_canonical(paths[m], transforms[m], m) for m in MODALITIES}
    seg = orientation.load_canonical(paths["seg"], transforms["seg"], "seg")
    values = set(np.unique(seg).tolist())
    if not values <= set(LABEL_MAP):
        raise SkipItem(
            f"segmentation holds labels {sorted(values - set(LABEL_MAP))} outside 0/1/2/4"
        )
    brain = np.zeros(seg.shape, bool)
    for volume in volumes.values():
        brain |= volume > 0
    if not brain.any():
        raise SkipItem("all modalities are empty")
    lo_p, hi_p = options["clip"]
    channels = []
    for modality in MODALITIES:
        volume = volumes[modality]
        lo, hi = np.percentile(volume[brain], [lo_p, hi_p])
        scaled = (volume.astype(np.float32) - lo) / max(float(hi - lo), 1e-6)
        channels.append(quantise(np.where(brain, scaled, 0.0), options["bits"]))
    mask = np.zeros(seg.shape, np.uint8)
    for label, stored in LABEL_MAP.items():
        mask[seg == label] = stored
    depth = seg.shape[2]
    keep = {
        "brain": brain.any(axis=(0, 1)),
        "tumor": (mask > 0).any(axis=(0, 1)),
        "all": np.ones(depth, bool),
    }[options["slices"] if thins(source) else "all"]
    samples = []
    for z in np.flatnonzero(keep).tolist():
        image = np.stack([c[:, :, z].T for c in channels], axis=-1)
        meta = {"grade": source.params["grade"]}
        samples.append(slice_sample(source, z, depth, image, mask[:, :, z].T, meta))
    return samples


def cpu_bound(options: dict) -> bool:
    return True
