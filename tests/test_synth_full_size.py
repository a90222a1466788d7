"""``--size full`` writes the real dimensions (one item of each data set; about 20 s)."""

from __future__ import annotations

import io

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from xdtrain.synth import brats, generate, lits


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    for name in ("imagenet", "chestxray8", "brats", "lits", "lits-nifti"):
        generate(name, root, size="full", count=1, workers=2)
    return root


def test_brats_full_volumes(full):
    case = full / "brats" / brats.ROOT / "BraTS20_Training_001"
    for path in case.iterdir():
        image = nib.load(path)
        assert image.shape == (240, 240, 155)
        np.testing.assert_array_equal(image.affine, brats.AFFINE)
        np.testing.assert_array_equal(image.header.get_zooms(), (1.0, 1.0, 1.0))


def test_chestxray8_full_images(full):
    sizes = {Image.open(p).size for p in (full / "chestxray8").glob("images_*/images/*.png")}
    assert sizes == {(1024, 1024)}


def _q90_tables() -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="JPEG", quality=90)
    return Image.open(buf).quantization


def test_imagenet_full_images_are_about_400x350_at_quality_90(full):
    paths = list((full / "imagenet/ILSVRC/Data/CLS-LOC").rglob("*.JPEG"))
    reference = _q90_tables()
    for path in paths:
        image = Image.open(path)
        assert 340 <= image.size[0] <= 500 and 280 <= image.size[1] <= 400
        if image.format == "JPEG" and image.mode == "RGB":
            assert image.quantization == reference


def test_lits_full_sizes(full):
    volume = nib.load(full / "lits-nifti/volume-0.nii")
    x, y, z = volume.shape
    assert (x, y) == (512, 512) and z >= 75
    spacing = volume.header.get_zooms()
    assert 0.5 < spacing[0] < 1.0 and spacing[2] in (1.0, 2.5, 5.0)
    png = Image.open(full / "lits" / lits.PNG_DIR / "volume-0_0.png")
    assert png.size == (256, 256) and png.mode == "L"
    slices = list((full / "lits" / lits.PNG_DIR).glob("volume-0_*.png"))
    assert len(slices) == z
