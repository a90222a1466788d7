"""Packing raw data sets into WebDataset shards: one module per data set, listed once here."""

from __future__ import annotations

from xdtrain.shards import brats, chestxray8, dicom, imagenet, lits, nifti
from xdtrain.shards.base import Packer

PACKERS: dict[str, Packer] = {
    "imagenet": imagenet,
    "chestxray8": chestxray8,
    "brats": brats,
    "lits": lits,
    "dicom": dicom,
    "nifti": nifti,
}
