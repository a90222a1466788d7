"""BraTS 2020: each case's four MRI modalities into axial-slice samples, split by case.

Sample ``BraTS20_Training_001_075`` (case, slice index)::

    img.png    4 channels, in this order: flair, t1, t1ce, t2 (8- or 16-bit)
    mask.png   1 channel: 0 background, 1 necrotic/non-enhancing core, 2 edema,
               3 enhancing tumour (label 4 of the release stored as 3)
    pos.i32    int32 [case index in the manifest's ``cases``, slice index, slices in case]
    json       {"case", "slice", "slices", "grade"}

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
    return {"slices": slices, "bits": args.bits or 8, "clip": [lo, hi]}


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
    folders = sorted(walk(src, CASE.fullmatch, dirs=True), key=lambda p: p.name)
    if not folders:
        raise UserError(
            f"{src}: no BraTS20_Training_* case folders found; pass --src with "
            "the folder holding MICCAI_BraTS2020_TrainingData"
        )
    grades = _grades(src)
    sources, skipped, notes = [], [], []
    for folder in folders:
        case = folder.name
        files = {p.name: p for p in folder.iterdir() if p.name.endswith((".nii", ".nii.gz"))}
        paths, missing = {}, []
        for modality in (*MODALITIES, "seg"):
            found = [
                files[n]
                for n in (f"{case}_{modality}.nii.gz", f"{case}_{modality}.nii")
                if n in files
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
            reason = f"missing {', '.join(missing)} NIfTI file(s)"
            skipped.append({"input": rel(folder, src), "reason": reason})
            continue
        if renamed is not None:
            note = f"segmentation of {case} under a non-standard name; used"
            notes.append({"input": rel(renamed, src), "note": note})
        sources.append(
            Source(
                key=case,
                group=case,
                stratum=grades.get(case, ""),
                params={
                    "input": rel(folder, src),
                    "paths": {k: str(v) for k, v in paths.items()},
                    "grade": grades.get(case, ""),
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
        "slice_axis": "axial (NIfTI axis 2); PNG rows are NIfTI axis 1, columns axis 0",
    }
    return Scan(sources, CLASSES, skipped, notes, info)


def _load(path: str, what: str) -> np.ndarray:
    import nibabel as nib  # imported on use: packing ImageNet does not need it

    try:
        return np.asanyarray(nib.load(path).dataobj)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise SkipItem(f"unreadable {what} NIfTI {Path(path).name} ({_why(exc, path)})") from None


def _why(exc: Exception, path: str) -> str:
    """An exception as a short reason, without the (already named) file's full path."""
    return f"{type(exc).__name__}: {str(exc).replace(path, Path(path).name)[:80]}"


def encode(source: Source, options: dict) -> list[Sample]:
    paths = source.params["paths"]
    volumes = {m: _load(paths[m], m) for m in MODALITIES}
    seg = _load(paths["seg"], "seg")
    shapes = {m: v.shape for m, v in volumes.items()} | {"seg": seg.shape}
    if len(set(shapes.values())) != 1 or len(seg.shape) != 3:
        listed = ", ".join(f"{m} {s}" for m, s in shapes.items())
        raise SkipItem(f"volumes of different shapes ({listed})")
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
