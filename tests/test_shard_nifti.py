"""NIfTI geometry and shapes (BraTS, LiTS): one orientation, checked headers, squeezed axes.

The same hand-made anatomy, known voxel by voxel in LPS (axis 0 to the patient's left, 1 to
posterior, 2 to superior), is saved in other orientations by flipping and reordering its
axes, with an affine worked out here by hand; nibabel's ``as_closest_canonical`` confirms
each saved file holds that anatomy. Every variant must pack to the same PNGs as the LPS
file, and those PNGs must be the anatomy's slices ``[:, :, k].T``.
"""

from __future__ import annotations

import tarfile

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from xdtrain.errors import UserError
from xdtrain.shards import manifest as manifest_mod
from xdtrain.shards.base import decode_png
from xdtrain.shards.cli import main
from xdtrain.shards.lits import SLAB

SHAPE = (24, 20, 12)  # LPS voxels
DEEP = (24, 20, SLAB + 8)  # deeper than a slab: read in two
SPACING = (0.8, 0.7, 2.5)  # mm
MODALITIES = ("flair", "t1", "t1ce", "t2")
BRATS_ROOT = "MICCAI_BraTS2020_TrainingData"


# --------------------------------------------------------------------------- building inputs


def lps_affine(shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Voxel (i, j, k) at world (RAS+) mm: x = 90 - 0.8 i, y = 60 - 0.7 j, z = -40 + 2.5 k."""
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = np.array([90.0, 60.0, -40.0]) + shift
    return affine


def stored(data, affine, flips=(), order=(0, 1, 2)):
    """``data`` with its ``flips`` axes reversed, then reordered (stored axis j is axis
    ``order[j]``), and the affine that keeps every voxel where it was in the world."""
    affine = affine.copy()
    for axis in flips:
        data = np.flip(data, axis)
        affine[:3, 3] += affine[:3, axis] * (data.shape[axis] - 1)  # index i is now n-1-i
        affine[:3, axis] *= -1
    affine[:3, :3] = affine[:3, list(order)]
    return np.ascontiguousarray(data.transpose(order)), affine


# name -> (flips, order, axis codes of the stored file)
ORIENTATIONS = {
    "LPS": ((), (0, 1, 2), "LPS"),
    "RAS": ((0, 1), (0, 1, 2), "RAS"),
    "swapped": ((), (1, 0, 2), "PLS"),
    "LPI": ((2,), (0, 1, 2), "LPI"),
    "IAR": ((0, 1, 2), (2, 1, 0), "IAR"),  # slice axis stored first, and flipped
}


def save(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), path)


def save_as(path, data, orientation, affine=None, extra_axis=False):
    """Save LPS ``data`` as the file ``orientation`` of :data:`ORIENTATIONS` describes."""
    flips, order, _ = ORIENTATIONS[orientation]
    data, affine = stored(data, lps_affine() if affine is None else affine, flips, order)
    save(path, data[..., None] if extra_axis else data, affine)


def ct_anatomy(shape=SHAPE):
    """(HU int16, labels uint8) in LPS: a texture of -200..0 HU; a liver (label 1, 110 HU)
    towards the patient's right and front, holding a tumour (label 2, 60 HU)."""
    hu = np.random.default_rng(1).integers(-200, 1, shape).astype(np.int16)
    labels = np.zeros(shape, np.uint8)
    labels[2:10, 3:11, 2:-3] = 1
    labels[4:7, 5:8, 4:7] = 2
    hu[labels == 1], hu[labels == 2] = 110, 60
    return hu, labels


def mr_anatomy():
    """({modality: int16}, seg uint8) in LPS: textured brain, a tumour with labels 1, 2, 4."""
    rng = np.random.default_rng(2)
    brain = np.zeros(SHAPE, bool)
    brain[3:21, 2:18, 1:-1] = True
    seg = np.zeros(SHAPE, np.uint8)
    seg[5:12, 4:10, 3:8] = 2
    seg[6:10, 5:8, 4:7] = 4
    seg[7:9, 6:7, 5] = 1
    volumes = {
        m: np.where(brain, rng.integers(50, 900, SHAPE) + 100 * i, 0).astype(np.int16)
        for i, m in enumerate(MODALITIES)
    }
    return volumes, seg


def pack(dataset, src, out, *extra):
    argv = ["--dataset", dataset, "--src", str(src), "--out", str(out), "--quiet"]
    assert main([*argv, "--workers", "1", "--slices", "all", "--no-fsync", *extra]) == 0
    return manifest_mod.load(out)


def samples(out) -> dict[str, dict[str, bytes]]:
    """Every sample of a shard folder: key -> {extension: bytes}."""
    found: dict[str, dict[str, bytes]] = {}
    for entry in manifest_mod.load(out)["splits"].values():
        for shard in entry["shards"]:
            with tarfile.open(out / shard["name"]) as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    found.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return found


def slices_of(found, case) -> list[dict[str, bytes]]:
    """The image and mask PNGs of ``case``'s samples, in slice order."""
    keys = sorted(k for k in found if k.rsplit("_", 1)[0] == case)
    return [{ext: found[k][ext] for ext in ("img.png", "mask.png")} for k in keys]


def skip_reasons(manifest) -> dict[str, str]:
    return {s["input"]: s["reason"] for s in manifest["skipped"]}


def notes_on(manifest, input_) -> list[str]:
    return [n["note"] for n in manifest["notes"] if n["input"] == input_]


# --------------------------------------------------------------------------- LiTS inputs

LITS = {  # volume number -> what its pair of files is
    0: "LPS volume and mask (the reference)",
    1: "RAS",
    2: "axes 0 and 1 swapped (PLS)",
    3: "IAR: slice axis stored first, flipped",
    4: "volume LPS, mask stored mirrored (RAS) with an affine that says so",
    5: "both saved XxYxZx1, gzipped",
    6: "mask saved XxYxZx1",
    7: "mask's affine 12.5 mm off, voxels aligned",
    8: "mask's affine 0.3 mm off: inside half a voxel",
    9: "oblique: affine turned 10 degrees about z",
    10: "a 4-D volume of two time points",
    11: "a 2-D mask",
}


@pytest.fixture(scope="module")
def lits_src(tmp_path_factory):
    src = tmp_path_factory.mktemp("lits")
    hu, labels = ct_anatomy()
    for n, orientation in [(0, "LPS"), (1, "RAS"), (2, "swapped"), (3, "IAR")]:
        save_as(src / f"volume-{n}.nii", hu, orientation)
        save_as(src / f"segmentation-{n}.nii", labels, orientation)
    save_as(src / "volume-4.nii", hu, "LPS")
    save_as(src / "segmentation-4.nii", labels, "RAS")
    save_as(src / "volume-5.nii.gz", hu, "LPS", extra_axis=True)
    save_as(src / "segmentation-5.nii.gz", labels, "LPS", extra_axis=True)
    save_as(src / "volume-6.nii", hu, "LPS")
    save_as(src / "segmentation-6.nii", labels, "LPS", extra_axis=True)
    for n, shift in [(7, (0.0, 0.0, 12.5)), (8, (0.3, 0.0, 0.0))]:
        save_as(src / f"volume-{n}.nii", hu, "LPS")
        save_as(src / f"segmentation-{n}.nii", labels, "LPS", lps_affine(shift))
    turn = np.eye(4)
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    turn[:2, :2] = [[c, -s], [s, c]]
    save(src / "volume-9.nii", hu, turn @ lps_affine())
    save(src / "segmentation-9.nii", labels, turn @ lps_affine())
    save(src / "volume-10.nii", np.stack([hu, hu], axis=-1), lps_affine())
    save(src / "segmentation-10.nii", labels, lps_affine())
    save(src / "volume-11.nii", hu, lps_affine())
    save(src / "segmentation-11.nii", labels[:, :, 0], lps_affine())
    return src


@pytest.fixture(scope="module")
def lits_packed(lits_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("lits-out")
    return pack("lits", lits_src, out), samples(out)


def test_saved_variants_hold_the_anatomy(lits_src):
    """The inputs are what they claim, by nibabel alone: as_closest_canonical (RAS) of each
    file, mirrored to LPS, is the anatomy; the stored axis codes are the intended ones."""
    hu, labels = ct_anatomy()
    for n, orientation in [(0, "LPS"), (1, "RAS"), (2, "swapped"), (3, "IAR")]:
        for name, expected in ((f"volume-{n}.nii", hu), (f"segmentation-{n}.nii", labels)):
            image = nib.load(lits_src / name)
            assert "".join(nib.aff2axcodes(image.affine)) == ORIENTATIONS[orientation][2]
            ras = np.asanyarray(nib.as_closest_canonical(image).dataobj)
            assert np.array_equal(ras[::-1, ::-1, :], expected), name
    mirrored = nib.load(lits_src / "segmentation-4.nii")
    assert not np.array_equal(np.asanyarray(mirrored.dataobj), labels)


def test_lits_reference_slices_are_the_anatomy(lits_packed):
    """The LPS reference packs to the anatomy's slices ``[:, :, k].T``, windowed, with the
    mask on the liver (as before reorientation existed: LPS packs unchanged)."""
    _, found = lits_packed
    hu, labels = ct_anatomy()
    reference = slices_of(found, "volume-0")
    assert len(reference) == SHAPE[2]
    for k, parts in enumerate(reference):
        image, mask = decode_png(parts["img.png"]), decode_png(parts["mask.png"])
        assert np.array_equal(mask, labels[:, :, k].T)
        expected = np.rint(np.clip((hu[:, :, k].T + 200.0) / 450.0, 0, 1) * 255)
        assert np.abs(image - expected).max() <= 1
        assert np.array_equal(mask > 0, image > 120)  # the mask lies on the liver


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 8, 9], ids=lambda n: LITS[n])
def test_lits_variant_packs_like_the_reference(lits_packed, n):
    """Another orientation, a mirrored mask whose affine says so, X×Y×Z×1 files, a mask
    within half a voxel, an oblique affine: the same image and mask PNGs as the reference."""
    _, found = lits_packed
    assert slices_of(found, f"volume-{n}") == slices_of(found, "volume-0")


def test_lits_manifest_records_orientations(lits_packed):
    manifest, _ = lits_packed
    orientation = manifest["preprocessing"]["orientation"]
    assert orientation["canonical"] == "LPS"
    assert orientation["original"] == {
        "volume-0": "LPS",
        "volume-1": "RAS",
        "volume-2": "PLS",
        "volume-3": "IAR",
        "volume-4": "LPS",
        "volume-5": "LPS",
        "volume-6": "LPS",
        "volume-8": "LPS",
        "volume-9": "LPS",
    }
    assert orientation["reoriented"] == 4  # volumes 1-4
    assert manifest["options"]["geometry"] == "check"
    (mixed,) = notes_on(manifest, "volume-4.nii")
    assert "segmentation-4.nii RAS" in mixed and "volume-4.nii LPS" in mixed
    (oblique,) = notes_on(manifest, "volume-9.nii")
    assert oblique.startswith("oblique axes (10.0°")
    assert len(manifest["notes"]) == 2


def test_lits_skips_name_the_files_and_the_problem(lits_packed):
    manifest, found = lits_packed
    reasons = skip_reasons(manifest)
    assert reasons["volume-7.nii"] == (
        "segmentation-7.nii and volume-7.nii disagree in world space: origin differs by "
        "12.5 mm (if their voxels are known to align, pass --geometry image)"
    )
    assert reasons["volume-10.nii"] == (
        "volume-10.nii is 4-D (24, 20, 12, 2): one 3-D volume per file expected"
    )
    assert reasons["volume-11.nii"] == (
        "segmentation-11.nii is 2-D (24, 20): one 3-D volume per file expected"
    )
    assert len(reasons) == 3
    assert not any(k.startswith(("volume-7_", "volume-10_", "volume-11_")) for k in found)
    # slice indices are canonical: slice 0 of a reoriented volume is its most inferior
    positions = [np.frombuffer(found[f"volume-3_{k:03d}"]["pos.i32"], "<i4") for k in range(12)]
    assert [int(p[1]) for p in positions] == list(range(12))


def test_lits_geometry_image_takes_the_volumes_affine(lits_src, tmp_path):
    """--geometry image packs the pair whose mask header is 12.5 mm off (voxels aligned), and
    records the choice; a mask whose own header said it was stored mirrored is then taken
    as stored, and that is noted too."""
    manifest = pack("lits", lits_src, tmp_path / "out", "--geometry", "image")
    found = samples(tmp_path / "out")
    assert manifest["options"]["geometry"] == "image"
    assert "--geometry image" in manifest["preprocessing"]["geometry"]
    assert "volume-7.nii" not in skip_reasons(manifest)
    _, labels = ct_anatomy()
    for k, parts in enumerate(slices_of(found, "volume-7")):
        assert np.array_equal(decode_png(parts["mask.png"]), labels[:, :, k].T)
    (shifted,) = notes_on(manifest, "volume-7.nii")
    assert "segmentation-7.nii" in shifted and "origin differs by 12.5 mm" in shifted
    (mirrored,) = notes_on(manifest, "volume-4.nii")
    assert "stored RAS, not LPS" in mirrored and "--geometry image" in mirrored


def test_lits_slabs_along_a_flipped_slice_axis(tmp_path):
    """A volume deeper than a slab, its slice axis stored flipped (LPI) or flipped and first
    (IAR), gives the anatomy's slices in order, slice 0 the most inferior."""
    hu, labels = ct_anatomy(DEEP)
    src = tmp_path / "src"
    src.mkdir()
    for n, orientation in enumerate(["LPS", "LPI", "IAR"]):
        save_as(src / f"volume-{n}.nii", hu, orientation)
        save_as(src / f"segmentation-{n}.nii", labels, orientation)
    pack("lits", src, tmp_path / "out")
    found = samples(tmp_path / "out")
    for n in range(3):
        packed = slices_of(found, f"volume-{n}")
        assert len(packed) == DEEP[2]
        for k, parts in enumerate(packed):
            assert np.array_equal(decode_png(parts["mask.png"]), labels[:, :, k].T), (n, k)
            expected = np.rint(np.clip((hu[:, :, k].T + 200.0) / 450.0, 0, 1) * 255)
            assert np.abs(decode_png(parts["img.png"]) - expected).max() <= 1, (n, k)
        assert packed == slices_of(found, "volume-0")


# --------------------------------------------------------------------------- BraTS

BRATS = {  # case number -> what its five files are
    1: "LPS, the release's orientation (the reference)",
    2: "RAS",
    3: "axes 0 and 1 swapped (PLS)",
    4: "modalities LPS, seg stored mirrored (RAS) with an affine that says so",
    5: "every file XxYxZx1, gzipped",
    6: "seg saved with an identity affine (a header known to be wrong), voxels aligned",
    7: "a 4-D flair",
}


def case_id(n: int) -> str:
    return f"BraTS20_Training_{n:03d}"


@pytest.fixture(scope="module")
def brats_src(tmp_path_factory):
    src = tmp_path_factory.mktemp("brats")
    volumes, seg = mr_anatomy()
    for n in BRATS:
        folder = src / BRATS_ROOT / case_id(n)
        folder.mkdir(parents=True)
        orientation = {2: "RAS", 3: "swapped"}.get(n, "LPS")
        ext = ".nii.gz" if n == 5 else ".nii"
        for m, volume in volumes.items():
            path = folder / f"{case_id(n)}_{m}{ext}"
            if n == 7 and m == "flair":
                save(path, np.stack([volume, volume], axis=-1), lps_affine())
            else:
                save_as(path, volume, orientation, extra_axis=n == 5)
        path = folder / f"{case_id(n)}_seg{ext}"
        if n == 6:
            save(path, seg, np.eye(4))
        else:
            save_as(path, seg, "RAS" if n == 4 else orientation, extra_axis=n == 5)
    return src


@pytest.fixture(scope="module")
def brats_packed(brats_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("brats-out")
    return pack("brats", brats_src, out), samples(out)


def test_brats_reference_slices_are_the_anatomy(brats_packed):
    _, found = brats_packed
    volumes, seg = mr_anatomy()
    reference = slices_of(found, case_id(1))
    assert len(reference) == SHAPE[2]
    stored_labels = np.select([seg == 4, seg == 2, seg == 1], [3, 2, 1], 0)
    for k, parts in enumerate(reference):
        image, mask = decode_png(parts["img.png"]), decode_png(parts["mask.png"])
        assert np.array_equal(mask, stored_labels[:, :, k].T)
        for channel, modality in enumerate(MODALITIES):
            source = volumes[modality][:, :, k].T
            assert (image[..., channel][source == 0] == 0).all()  # outside the brain
            if (source > 0).any():  # inside: this modality, rescaled
                corr = np.corrcoef(image[..., channel][source > 0], source[source > 0])[0, 1]
                assert corr > 0.99, (modality, k)


@pytest.mark.parametrize("n", [2, 3, 4, 5], ids=lambda n: BRATS[n])
def test_brats_variant_packs_like_the_reference(brats_packed, n):
    _, found = brats_packed
    assert slices_of(found, case_id(n)) == slices_of(found, case_id(1))


def test_brats_manifest_records_orientations_and_skips(brats_packed):
    manifest, found = brats_packed
    orientation = manifest["preprocessing"]["orientation"]
    assert orientation["original"] == {
        case_id(1): "LPS",
        case_id(2): "RAS",
        case_id(3): "PLS",
        case_id(4): "LPS",
        case_id(5): "LPS",
    }
    assert orientation["reoriented"] == 3
    folder = f"{BRATS_ROOT}/{case_id(4)}"
    (mixed,) = notes_on(manifest, folder)
    assert f"{case_id(4)}_seg.nii RAS" in mixed
    reasons = skip_reasons(manifest)
    assert reasons[f"{BRATS_ROOT}/{case_id(6)}"] == (
        f"{case_id(6)}_seg.nii and {case_id(6)}_flair.nii disagree in world space: voxel "
        "spacing differs (1.00×1.00×1.00 vs 0.80×0.70×2.50 mm) (if their voxels are known to "
        "align, pass --geometry image)"
    )
    assert reasons[f"{BRATS_ROOT}/{case_id(7)}"] == (
        f"{case_id(7)}_flair.nii is 4-D (24, 20, 12, 2): one 3-D volume per file expected"
    )
    assert len(reasons) == 2


def test_brats_geometry_image_packs_the_seg_with_a_wrong_header(brats_src, tmp_path):
    manifest = pack("brats", brats_src, tmp_path / "out", "--geometry", "image")
    found = samples(tmp_path / "out")
    assert slices_of(found, case_id(6)) == slices_of(found, case_id(1))
    (note,) = notes_on(manifest, f"{BRATS_ROOT}/{case_id(6)}")
    assert note.startswith(f"header of {case_id(6)}_seg.nii differs from {case_id(6)}_flair.nii")


def test_every_case_skipped_names_the_first_reason(tmp_path):
    hu, labels = ct_anatomy()
    for n in range(2):
        save_as(tmp_path / f"volume-{n}.nii", hu, "LPS")
        save_as(tmp_path / f"segmentation-{n}.nii", labels, "LPS", lps_affine((0, 0, 25.0)))
    with pytest.raises(UserError, match=r"all 2 lits input\(s\) were skipped .*--geometry image"):
        pack("lits", tmp_path, tmp_path / "out")


# --------------------------------------------------------------------------- LiTS PNG release


def png_release(folder) -> dict[str, np.ndarray]:
    """Three volumes of four 16×16 slices in the Kaggle layout below ``folder``: volume 0
    stored as RGB with equal channels, slice 2 of volume 1 as RGB with differing channels,
    the rest greyscale. Returns sample key -> the greyscale CT expected in the shards."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    liver = np.zeros((16, 16), np.uint8)
    liver[4:9, 3:10] = 1
    expected = {}
    for n in range(3):
        for k in range(4):
            ct = rng.integers(0, 256, (16, 16)).astype(np.uint8)
            rgb = np.stack([ct, ct, ct], axis=-1)
            if n == 1 and k == 2:
                rgb[..., 0] = 255 - ct
                ct = np.asarray(Image.fromarray(rgb).convert("L"))
            colour = n == 0 or (n == 1 and k == 2)
            Image.fromarray(rgb if colour else ct).save(folder / f"volume-{n}_{k}.png")
            Image.fromarray(liver).save(folder / f"segmentation-{n}_livermask_{k}.png")
            Image.fromarray(liver * 0).save(folder / f"segmentation-{n}_lesionmask_{k}.png")
            expected[f"volume-{n}_{k:03d}"] = ct
    return expected


def test_lits_rgb_ct_pngs_are_reduced_and_noted(tmp_path):
    """Colour CT slices of the Kaggle release are reduced to one channel, each noted: equal
    channels losslessly, differing channels to their luminance."""
    expected = png_release(tmp_path / "src" / "dataset_6" / "dataset_6")
    manifest = pack("lits", tmp_path / "src", tmp_path / "out")
    found = samples(tmp_path / "out")
    for key, ct in expected.items():
        assert np.array_equal(decode_png(found[key]["img.png"]), ct), key
    notes = {n["input"]: n["note"] for n in manifest["notes"]}
    lossless = "RGB PNG with equal colour channels stored as one channel (lossless)"
    assert notes == {
        **{f"dataset_6/dataset_6/volume-0_{k}.png": lossless for k in range(4)},
        "dataset_6/dataset_6/volume-1_2.png": "RGB PNG with differing colour channels reduced "
        "to its luminance (0.299 R + 0.587 G + 0.114 B)",
    }
    assert len(manifest["notes"]) == 5


def test_lits_release_png_beside_nifti_files(tmp_path):
    """``--release png`` on a folder holding both releases reads the PNGs (it handed the
    NIfTI files to the PNG scan, which crashed)."""
    expected = png_release(tmp_path / "src" / "dataset_6" / "dataset_6")
    hu, labels = ct_anatomy()
    save_as(tmp_path / "src" / "volume-0.nii", hu, "LPS")
    save_as(tmp_path / "src" / "segmentation-0.nii", labels, "LPS")
    manifest = pack("lits", tmp_path / "src", tmp_path / "out", "--release", "png")
    assert manifest["preprocessing"]["release"] == "png"
    assert set(samples(tmp_path / "out")) == set(expected)


def test_a_mask_whose_sform_and_qform_disagree_is_packed_by_its_sform_and_noted(tmp_path):
    """Both header transforms set, in other orientations: viewers differ on which they trust.
    The sform places the voxels (nibabel's rule) and the manifest says what was chosen."""
    hu, labels = ct_anatomy()
    src = tmp_path / "src"
    src.mkdir()
    for n in range(3):
        save(src / f"volume-{n}.nii", hu, lps_affine())
        mask = nib.Nifti1Image(labels, lps_affine())
        if n == 1:  # the qform says RAS: mirrored in x and y against the sform
            _, ras = stored(labels, lps_affine(), (0, 1))
            mask.set_qform(ras, code=1)
            mask.set_sform(lps_affine(), code=1)
        nib.save(mask, src / f"segmentation-{n}.nii")
    manifest = pack("lits", src, tmp_path / "out")
    noted = [n for n in manifest["notes"] if "header transforms disagree" in n["note"]]
    assert len(noted) == 1 and "segmentation-1.nii" in noted[0]["note"]
    assert "sform LPS, qform RAS" in noted[0]["note"]
    found = samples(tmp_path / "out")
    masks = [decode_png(s["mask.png"]) for s in slices_of(found, "volume-1")]
    assert all(np.array_equal(m, labels[:, :, k].T) for k, m in enumerate(masks))
