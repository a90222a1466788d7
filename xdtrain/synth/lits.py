"""Synthetic LiTS 2017 in both of its release layouts, from the same synthetic scans.

NIfTI release (``lits-nifti``)::

    volume-<N>.nii          CT in Hounsfield units, int16, 512x512xZ
    segmentation-<N>.nii    0 background, 1 liver, 2 tumour; uint8

Kaggle PNG release (``lits``, "lits-png"), one file per axial slice ``K`` (0-based), all in
one flat folder ``dataset_6/dataset_6/``::

    volume-<N>_<K>.png                    8-bit greyscale CT in an abdominal window
    segmentation-<N>_livermask_<K>.png    1 where the liver (tumours included) is, else 0
    segmentation-<N>_lesionmask_<K>.png   1 where a tumour is, else 0

Its slices are 256x256 (``--size full``; the NIfTI release's 512x512 resampled). The
release's CSV index files are not written: their empty-mask flags are unreliable, so readers
should look at the masks themselves.

Scans are abdominal cross-sections: air, fat, soft tissue, spine, kidneys, gas pockets and a
contrast-enhanced liver (about 110 HU) holding hypodense tumours (about 45 HU). The liver
spans only part of the slices, so many slices hold none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from xdtrain.rng import rng_for
from xdtrain.synth.common import Job, Plan, ellipse, ellipsoid, nifti_bytes, png_bytes
from xdtrain.synth.common import smooth_noise as noise

SIZE = {"small": ((64, 64), (24, 40), 6), "full": ((512, 512), (75, 200), 10)}
HU = {
    "air": -1000,
    "fat": -100,
    "soft": 45,
    "liver": 110,
    "tumour": 45,
    "bone": 700,
    "kidney": 180,
    "gas": -800,
}
# The window the PNG release's CT slices are stored in (level 40, width 400).
PNG_WINDOW = (-160, 240)
PNG_DIR = "dataset_6/dataset_6"
PNG_SIDE = {"small": 64, "full": 256}


def scan_shape(size: str, seed: int, index: int) -> tuple[int, int, int]:
    (x, y), (zlo, zhi), _ = SIZE[size]
    return x, y, int(rng_for(seed, "lits", "slices", index).integers(zlo, zhi + 1))


def scan(size: str, seed: int, index: int):
    """Volume ``index``: (HU int16, labels uint8, affine), identical in both releases."""
    shape = scan_shape(size, seed, index)
    x, y, z = shape
    rng = rng_for(seed, "lits", "scan", index)
    spacing_xy = rng.uniform(0.6, 0.9) * 512 / x
    spacing_z = float(rng.choice([1.0, 2.5, 5.0])) * (150 / z if size == "small" else 1.0)
    body2d = ellipse((x, y), (x / 2, y * 0.52), (x * 0.44, y * 0.34))
    inner2d = ellipse((x, y), (x / 2, y * 0.52), (x * 0.40, y * 0.30))
    hu = np.full(shape, HU["air"], np.float32)
    hu[body2d] = HU["fat"]
    hu[inner2d] = HU["soft"]
    spine = ellipse((x, y), (x / 2, y * 0.74), (x * 0.06, y * 0.06))
    hu[spine] = HU["bone"]
    unit = np.array([x, y, z], np.float32)
    liver_center = unit * [rng.uniform(0.3, 0.36), rng.uniform(0.42, 0.5), rng.uniform(0.4, 0.6)]
    liver_radii = unit * [rng.uniform(0.16, 0.2), rng.uniform(0.15, 0.19), rng.uniform(0.2, 0.3)]
    liver = ellipsoid(shape, liver_center, liver_radii, noise(rng, shape, 4) * 0.6)
    liver &= inner2d[..., None]
    labels = np.zeros(shape, np.uint8)
    labels[liver] = 1
    hu[liver] = HU["liver"]
    for _ in range(int(rng.integers(1, 4))):
        c = liver_center + liver_radii * rng.uniform(-0.5, 0.5, 3)
        tumour = ellipsoid(shape, c, liver_radii * rng.uniform(0.15, 0.3)) & liver
        labels[tumour] = 2
        hu[tumour] = HU["tumour"]
    for side in (-1, 1):
        kidney = ellipsoid(shape, unit * [0.5 + 0.2 * side, 0.66, 0.3], unit * [0.06, 0.08, 0.12])
        hu[kidney & ~liver] = HU["kidney"]
    gas = (noise(rng, shape, 9) > 0.7) & inner2d[..., None] & ~liver & (hu == HU["soft"])
    hu[gas] = HU["gas"]
    hu += 12 * rng.standard_normal(shape, dtype=np.float32)
    affine = np.diag([-spacing_xy, -spacing_xy, spacing_z, 1.0])
    affine[:3, 3] = [spacing_xy * x / 2, spacing_xy * y / 2, -spacing_z * z]
    return np.clip(hu, -1024, 3071).round().astype(np.int16), labels, affine


def window_to_uint8(hu: np.ndarray, window: tuple[int, int] = PNG_WINDOW) -> np.ndarray:
    lo, hi = window
    return (
        ((np.clip(hu.astype(np.float32), lo, hi) - lo) / (hi - lo) * 255).round().astype(np.uint8)
    )


@dataclass(frozen=True)
class Release:
    """One of LiTS's two release layouts, as a generator."""

    name: str
    count_help: str = "volumes"

    def plan(self, size: str, seed: int, count: int | None) -> Plan:
        n = count if count is not None else SIZE[size][2]
        jobs = []
        for index in range(n):
            if self.name == "lits-nifti":
                files = (f"volume-{index}.nii", f"segmentation-{index}.nii")
            else:
                z = scan_shape(size, seed, index)[2]
                files = tuple(
                    f"{PNG_DIR}/{name}"
                    for k in range(z)
                    for name in (
                        f"volume-{index}_{k}.png",
                        f"segmentation-{index}_livermask_{k}.png",
                        f"segmentation-{index}_lesionmask_{k}.png",
                    )
                )
            jobs.append(Job(f"volume-{index}", files, {"index": index}))
        return Plan(jobs, {})

    def render(self, job: Job, size: str, seed: int) -> dict[str, bytes]:
        index = job.params["index"]
        hu, labels, affine = scan(size, seed, index)
        if self.name == "lits-nifti":
            return {
                job.files[0]: nifti_bytes(hu, affine, np.int16, compress=False),
                job.files[1]: nifti_bytes(labels, affine, np.uint8, compress=False),
            }
        out = {}
        image = window_to_uint8(hu)
        side = PNG_SIDE[size]
        for k in range(hu.shape[2]):
            ct_path, liver_path, lesion_path = job.files[3 * k : 3 * k + 3]
            # Slices as a viewer shows them: rows are y, columns are x.
            out[ct_path] = png_bytes(_resize(image[:, :, k].T, side, Image.BILINEAR))
            liver = (labels[:, :, k] >= 1).astype(np.uint8).T
            lesion = (labels[:, :, k] == 2).astype(np.uint8).T
            out[liver_path] = png_bytes(_resize(liver, side, Image.NEAREST))
            out[lesion_path] = png_bytes(_resize(lesion, side, Image.NEAREST))
        return out


def _resize(plane: np.ndarray, side: int, resample) -> np.ndarray:
    if plane.shape == (side, side):
        return plane
    return np.asarray(Image.fromarray(plane).resize((side, side), resample))


png_release = Release("lits")
nifti_release = Release("lits-nifti")
