from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from xdtrain.synth import lits

VOLUMES = 3  # conftest.COUNTS["lits"]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def load(raw, index: int):
    volume = nib.load(raw / "lits-nifti" / f"volume-{index}.nii")
    seg = nib.load(raw / "lits-nifti" / f"segmentation-{index}.nii")
    return volume, seg


def test_nifti_release_files(raw):
    names = sorted(p.name for p in (raw / "lits-nifti").iterdir() if not p.name.startswith("."))
    expected = [f"{k}-{i}.nii" for i in range(VOLUMES) for k in ("segmentation", "volume")]
    assert names == sorted(expected)


@pytest.mark.parametrize("index", range(VOLUMES))
def test_nifti_hounsfield_units_and_labels(raw, index):
    volume, seg = load(raw, index)
    x, y, z = volume.shape
    assert (x, y) == (64, 64) and seg.shape == volume.shape
    assert volume.get_data_dtype() == np.int16 and seg.get_data_dtype() == np.uint8
    hu = np.asarray(volume.dataobj)
    assert hu.min() < -900 and hu.max() > 300  # air and bone
    labels = np.asarray(seg.dataobj)
    assert set(np.unique(labels).tolist()) == {0, 1, 2}
    spacing = np.abs(np.diag(volume.affine)[:3])
    assert (spacing > 0).all()
    np.testing.assert_allclose(volume.affine, seg.affine)
    has_liver = (labels > 0).any(axis=(0, 1))
    assert has_liver.any() and not has_liver.all()  # slices without liver exist


@pytest.mark.parametrize("index", range(VOLUMES))
def test_threshold_recovers_the_liver(raw, index):
    """No learning: contrast-enhanced liver parenchyma is the band 80-145 HU."""
    volume, seg = load(raw, index)
    hu = np.asarray(volume.dataobj)
    labels = np.asarray(seg.dataobj)
    assert dice((hu > 80) & (hu < 145), labels == 1) > 0.9
    tumour = labels == 2
    assert np.median(hu[tumour]) < np.median(hu[labels == 1]) - 30  # hypodense


def test_png_release_names(raw):
    root = raw / "lits" / lits.PNG_DIR
    pattern = re.compile(
        r"(volume-(\d+)_(\d+)|segmentation-(\d+)_(livermask|lesionmask)_(\d+))\.png"
    )
    files = [p.name for p in root.iterdir() if not p.name.startswith(".")]
    assert files and all(pattern.fullmatch(f) for f in files)
    for index in range(VOLUMES):
        z = load(raw, index)[0].shape[2]
        for k in range(z):
            for name in (
                f"volume-{index}_{k}.png",
                f"segmentation-{index}_livermask_{k}.png",
                f"segmentation-{index}_lesionmask_{k}.png",
            ):
                assert (root / name).is_file(), name
        assert not (root / f"volume-{index}_{z}.png").exists()


def test_png_release_matches_nifti_release(raw):
    root = raw / "lits" / lits.PNG_DIR
    volume, seg = load(raw, 0)
    hu, labels = np.asarray(volume.dataobj), np.asarray(seg.dataobj)
    k = int(np.argmax((labels == 2).sum(axis=(0, 1))))
    ct = Image.open(root / f"volume-0_{k}.png")
    liver = np.asarray(Image.open(root / f"segmentation-0_livermask_{k}.png"))
    lesion = np.asarray(Image.open(root / f"segmentation-0_lesionmask_{k}.png"))
    assert ct.mode == "L" and ct.size == (64, 64)
    np.testing.assert_array_equal(np.asarray(ct), lits.window_to_uint8(hu[:, :, k]).T)
    assert set(np.unique(liver).tolist()) == {0, 1}  # the release stores masks as 0/1
    assert set(np.unique(lesion).tolist()) == {0, 1}
    assert not (lesion > liver).any()  # the liver mask includes its tumours
    np.testing.assert_array_equal(liver > 0, (labels[:, :, k] > 0).T)
    np.testing.assert_array_equal(lesion > 0, (labels[:, :, k] == 2).T)


def test_threshold_recovers_the_liver_in_png_slices(raw):
    root = raw / "lits" / lits.PNG_DIR
    lo, hi = (80 - lits.PNG_WINDOW[0]) * 255 / 400, (145 - lits.PNG_WINDOW[0]) * 255 / 400
    found, truth = [], []
    for k in range(load(raw, 1)[0].shape[2]):
        ct = np.asarray(Image.open(root / f"volume-1_{k}.png")).astype(np.float32)
        liver = np.asarray(Image.open(root / f"segmentation-1_livermask_{k}.png")) > 0
        lesion = np.asarray(Image.open(root / f"segmentation-1_lesionmask_{k}.png")) > 0
        found.append((ct > lo) & (ct < hi))
        truth.append(liver & ~lesion)
    assert dice(np.stack(found), np.stack(truth)) > 0.9
