from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from xdtrain.synth import brats

CASES = 3  # conftest.COUNTS["brats"]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def case_files(raw, number: int) -> dict[str, np.ndarray]:
    folder = raw / "brats" / brats.ROOT / brats.case_id(number)
    found = {}
    for path in folder.iterdir():
        image = nib.load(path)
        kind = "seg" if "seg" in path.name.lower() else path.name.split("_")[-1].split(".")[0]
        found[kind] = image
    return found


def test_case_folders_and_file_names(raw):
    root = raw / "brats" / brats.ROOT
    cases = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert cases == [f"BraTS20_Training_{i:03d}" for i in range(1, CASES + 1)]
    for number, case in enumerate(cases, 1):
        names = sorted(p.name for p in (root / case).iterdir())
        expected_seg = brats.MISNAMED_SEG if number == CASES else f"{case}_seg.nii.gz"
        expected = sorted([f"{case}_{m}.nii.gz" for m in brats.MODALITIES] + [expected_seg])
        assert names == expected
    with open(root / "name_mapping.csv", newline="") as fh:
        mapping = list(csv.DictReader(fh))
    assert [r["BraTS_2020_subject_ID"] for r in mapping] == cases
    assert {r["Grade"] for r in mapping} <= {"HGG", "LGG"}


def test_misnamed_seg_is_case_355_with_enough_cases():
    plan = brats.plan("small", 0, 355)
    assert plan.jobs[354].files[-1].endswith("/" + brats.MISNAMED_SEG)
    assert plan.jobs[353].files[-1].endswith("BraTS20_Training_354_seg.nii.gz")


@pytest.mark.parametrize("number", range(1, CASES + 1))
def test_shape_dtype_affine_and_labels(raw, number):
    images = case_files(raw, number)
    assert set(images) == {*brats.MODALITIES, "seg"}
    shape = brats.SIZE["small"][0]
    for kind, image in images.items():
        assert image.shape == shape
        assert image.get_data_dtype() == (np.uint8 if kind == "seg" else np.int16)
        np.testing.assert_allclose(image.affine, brats.affine_for(shape), atol=1e-5)
    seg = np.asarray(images["seg"].dataobj)
    assert set(np.unique(seg).tolist()) == {0, 1, 2, 4}


def test_full_size_affine_is_the_release_affine():
    np.testing.assert_array_equal(brats.affine_for((240, 240, 155)), brats.AFFINE)


@pytest.mark.parametrize("number", range(1, CASES + 1))
def test_regions_are_nested_like_real_tumours(raw, number):
    images = case_files(raw, number)
    seg = np.asarray(images["seg"].dataobj)
    brain = np.asarray(images["flair"].dataobj) > 0
    necrosis, core, whole = seg == 1, np.isin(seg, (1, 4)), seg > 0
    # The necrotic core sits inside the enhancing rim, the rim inside the edema.
    assert not (ndimage.binary_dilation(necrosis) & ~core).any()
    assert not (ndimage.binary_dilation(core) & brain & ~whole).any()
    assert (seg == 2).sum() > (seg == 4).sum() > 0
    assert not (whole & ~brain).any()


@pytest.mark.parametrize("number", range(1, CASES + 1))
def test_no_brain_in_the_lowest_and_highest_slices(raw, number):
    images = case_files(raw, number)
    for modality in brats.MODALITIES:
        data = np.asarray(images[modality].dataobj)
        assert data.min() == 0
        assert not data[:, :, 0].any() and not data[:, :, -1].any()
        assert data[:, :, data.shape[2] // 2].any()


@pytest.mark.parametrize("number", range(1, CASES + 1))
def test_thresholds_recover_the_tumour(raw, number):
    """No learning: T1ce above its brain median finds ET, FLAIR finds the whole tumour."""
    images = case_files(raw, number)
    seg = np.asarray(images["seg"].dataobj)
    flair = np.asarray(images["flair"].dataobj).astype(np.float32)
    t1ce = np.asarray(images["t1ce"].dataobj).astype(np.float32)
    brain = flair > 0
    enhancing = t1ce > 1.45 * np.median(t1ce[brain])
    whole = flair > 1.6 * np.median(flair[brain])
    assert dice(enhancing, seg == 4) > 0.9
    assert dice(whole, seg > 0) > 0.9
