"""Synthetic BraTS 2020 training data in the release layout.

::

    MICCAI_BraTS2020_TrainingData/
        name_mapping.csv
        survival_info.csv
        BraTS20_Training_001/BraTS20_Training_001_{flair,t1,t1ce,t2,seg}.nii.gz
        ...

Volumes are 240x240x155 (``--size full``), 1 mm isotropic, skull-stripped (0 outside the
brain), modalities ``int16`` and the segmentation ``uint8`` with the release's affine. The
brain (white and grey matter, ventricles) has no voxels in the lowest and highest slices. A
tumour is three nested regions that carry the BraTS labels and look as they do on MRI:

* 2 edema: bright on FLAIR and T2, the outer shell;
* 4 enhancing tumour: a rim that is bright on T1ce (contrast uptake);
* 1 necrotic / non-enhancing core: inside the rim, dark on T1ce, bright on T2.

As in the real release, one case's segmentation file is misnamed (case 355's is
``W39_1998.09.19_Segm.nii``); with fewer cases, the last case carries that name.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from xdtrain.rng import rng_for
from xdtrain.synth.common import (
    Job,
    Plan,
    csv_bytes,
    ellipsoid,
    nifti_bytes,
    smooth_noise,
)

name = "brats"
count_help = "cases"

ROOT = "MICCAI_BraTS2020_TrainingData"
MODALITIES = ("flair", "t1", "t1ce", "t2")
SIZE = {"small": ((64, 64, 40), 6), "full": ((240, 240, 155), 20)}
MISNAMED_CASE = 355
MISNAMED_SEG = "W39_1998.09.19_Segm.nii"
# The affine of the release's volumes: x and y flipped, the y origin at the far edge.
AFFINE = np.array(
    [[-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 239.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)
LABELS = (0, 1, 2, 4)

# Relative signal of each tissue per modality: wm, gm, csf, edema, enhancing, necrosis.
TISSUES = ("wm", "gm", "csf", "edema", "enhancing", "necrosis")
SIGNAL = {
    "flair": (0.55, 0.70, 0.15, 1.50, 1.35, 1.25),
    "t1": (0.85, 0.65, 0.25, 0.55, 0.60, 0.35),
    "t1ce": (0.85, 0.65, 0.25, 0.55, 1.60, 0.30),
    "t2": (0.45, 0.65, 1.50, 1.15, 0.90, 1.35),
}
SCALE = {"flair": 300.0, "t1": 500.0, "t1ce": 600.0, "t2": 800.0}


def case_id(number: int) -> str:
    return f"BraTS20_Training_{number:03d}"


def affine_for(shape: tuple[int, int, int]) -> np.ndarray:
    """The release's affine, with voxel sizes stretched when ``shape`` is smaller."""
    full = SIZE["full"][0]
    affine = AFFINE.copy()
    for axis in range(3):
        affine[:3, axis] *= full[axis] / shape[axis]
    return affine


def plan(size: str, seed: int, count: int | None) -> Plan:
    n = count if count is not None else SIZE[size][1]
    rng = rng_for(seed, name, "plan")
    misnamed = MISNAMED_CASE if n >= MISNAMED_CASE else n
    jobs, mapping, survival = [], [], []
    for number in range(1, n + 1):
        cid = case_id(number)
        files = [f"{ROOT}/{cid}/{cid}_{m}.nii.gz" for m in MODALITIES]
        seg = MISNAMED_SEG if number == misnamed else f"{cid}_seg.nii.gz"
        files.append(f"{ROOT}/{cid}/{seg}")
        grade = "HGG" if rng.random() < 0.75 else "LGG"
        jobs.append(Job(cid, tuple(files), {"grade": grade}))
        mapping.append([grade, "NA", "NA", "NA", "NA", cid])
        if grade == "HGG":
            age, days = f"{rng.uniform(30, 85):.3f}", int(rng.integers(5, 1800))
            if rng.random() < 0.1:  # as in the release: alive at last contact, as text
                days = f"ALIVE ({days} days later)"
            survival.append([cid, age, days, str(rng.choice(["GTR", "STR", "NA"]))])
    extra = {
        f"{ROOT}/name_mapping.csv": csv_bytes(
            [
                "Grade",
                "BraTS_2017_subject_ID",
                "BraTS_2018_subject_ID",
                "TCGA_TCIA_subject_ID",
                "BraTS_2019_subject_ID",
                "BraTS_2020_subject_ID",
            ],
            mapping,
        ),
        f"{ROOT}/survival_info.csv": csv_bytes(
            ["Brats20ID", "Age", "Survival_days", "Extent_of_Resection"], survival
        ),
    }
    return Plan(jobs, extra)


def phantom(shape: tuple[int, int, int], rng: np.random.Generator):
    """Brain mask, tissue map (indices into :data:`TISSUES`) and the BraTS label volume."""
    x, y, z = shape
    # Voxel extent of one "full-size millimetre" per axis, so shapes keep their proportions.
    unit = np.array([x / 240, y / 240, z / 155]) * 240
    center = np.array([x / 2, y / 2 * 1.02, z / 2])
    brain = ellipsoid(
        shape,
        center,
        unit * [0.34, 0.42, 0.26] * rng.uniform(0.92, 1.05, 3),
        smooth_noise(rng, shape, 4) * 0.3,
    )
    tissue = np.zeros(shape, np.uint8)  # wm
    tissue[smooth_noise(rng, shape, 7) > 0.15] = 1  # gm islands
    for side in (-1, 1):
        vent = ellipsoid(shape, center + unit * [0.05 * side, 0.0, 0.02], unit * [0.03, 0.1, 0.05])
        tissue[vent] = 2
    labels = np.zeros(shape, np.uint8)
    # A tumour somewhere in the hemisphere, inside the brain.
    offset = unit * rng.uniform([-0.16, -0.2, -0.08], [0.16, 0.2, 0.08])
    tumour_center = center + offset
    r_wt = unit * rng.uniform(0.09, 0.14)
    wobble = smooth_noise(rng, shape, 5)
    whole = ellipsoid(shape, tumour_center, r_wt, wobble) & brain
    core = ellipsoid(shape, tumour_center, r_wt * rng.uniform(0.5, 0.65), wobble) & whole
    necrosis = ellipsoid(shape, tumour_center, r_wt * rng.uniform(0.25, 0.35)) & core
    labels[whole] = 2
    labels[core] = 4
    labels[necrosis] = 1
    tissue[labels == 2] = 3
    tissue[labels == 4] = 4
    tissue[labels == 1] = 5
    return brain, tissue, labels


def render(job: Job, size: str, seed: int) -> dict[str, bytes]:
    shape = SIZE[size][0]
    rng = rng_for(seed, name, job.key)
    brain, tissue, labels = phantom(shape, rng)
    affine = affine_for(shape)
    out = {}
    for modality, path in zip(MODALITIES, job.files, strict=False):
        signal = np.asarray(SIGNAL[modality], np.float32)[tissue]
        bias = 1.0 + 0.08 * smooth_noise(rng, shape, 3)
        # A little partial-volume blur, so region borders are not perfectly sharp.
        volume = ndimage.gaussian_filter(signal * bias, 0.5) + rng.normal(0, 0.04, shape)
        volume *= SCALE[modality] * rng.uniform(0.8, 1.2)
        volume = np.where(brain, np.clip(volume, 1, None), 0)
        out[path] = nifti_bytes(volume.round(), affine, np.int16, compress=True)
    seg_path = job.files[-1]
    out[seg_path] = nifti_bytes(labels, affine, np.uint8, compress=seg_path.endswith(".gz"))
    return out
