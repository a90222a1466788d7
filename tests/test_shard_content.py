"""What each packer writes: labels, channels, masks and the quirks of each release."""

from __future__ import annotations

import csv
import io
import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from xdtrain.shards import manifest as manifest_mod
from xdtrain.shards.base import decode_png
from xdtrain.shards.tar import read_samples
from xdtrain.synth import brats as synth_brats
from xdtrain.synth import lits as synth_lits


def all_samples(folder, split=None) -> dict[str, dict[str, bytes]]:
    manifest = manifest_mod.load(folder)
    out = {}
    for name, entry in manifest["splits"].items():
        if split not in (None, name):
            continue
        for shard in entry["shards"]:
            out.update(read_samples(folder / shard["name"]))
    return out


def case_splits(folder) -> dict[str, str]:
    """The split of every case (volume) of a BraTS or LiTS shard folder."""
    manifest = manifest_mod.load(folder)
    return {
        json.loads(parts["json"])["case"]: name
        for name in manifest["splits"]
        for parts in all_samples(folder, name).values()
    }


# --------------------------------------------------------------------------- ImageNet


def test_imagenet_labels_follow_the_synset_mapping(raw, packed):
    root = raw / "imagenet"
    wnids = [line.split()[0] for line in (root / "LOC_synset_mapping.txt").read_text().splitlines()]
    with open(root / "LOC_val_solution.csv", newline="") as fh:
        val = {r["ImageId"]: r["PredictionString"].split()[0] for r in csv.DictReader(fh)}
    samples = all_samples(packed["imagenet"])
    assert len(samples) == len(list(root.rglob("*.JPEG")))
    for key, parts in samples.items():
        wnid = key.split("_")[0] if key in val or not key.startswith("ILSVRC") else None
        wnid = val.get(key, wnid)
        label = wnids.index(wnid)
        assert parts["cls"] == str(label).encode()
        assert np.frombuffer(parts["label.i64"], "<i8").tolist() == [label]
        assert set(parts) == {"jpg", "cls", "label.i64", "json"}
        assert json.loads(parts["json"]) == {"file": f"{key}.JPEG", "wnid": wnids[label]}


def test_imagenet_train_is_official_train_and_val_test_split_official_val(packed):
    folder = packed["imagenet"]
    train = all_samples(folder, "train")
    held_out = {**all_samples(folder, "val"), **all_samples(folder, "test")}
    assert not any(k.startswith("ILSVRC2012_val_") for k in train)
    assert all(k.startswith("ILSVRC2012_val_") for k in held_out)
    manifest = manifest_mod.load(folder)
    assert abs(manifest["splits"]["val"]["samples"] - manifest["splits"]["test"]["samples"]) <= 1


def test_imagenet_copies_jpeg_bytes_and_converts_the_quirks(raw, packed):
    root = raw / "imagenet"
    manifest = manifest_mod.load(packed["imagenet"])
    converted = {n["input"]: n["note"] for n in manifest["notes"]}
    assert sorted(converted.values()) == [
        "CMYK JPEG converted to RGB JPEG",
        "L JPEG converted to RGB JPEG",
        "RGB PNG converted to RGB JPEG",
    ]
    samples = all_samples(packed["imagenet"])
    for path in root.rglob("*.JPEG"):
        data = samples[path.name.split(".")[0]]["jpg"]
        image = Image.open(io.BytesIO(data))
        assert image.format == "JPEG" and image.mode == "RGB"
        relative = str(path.relative_to(root))
        if relative in converted:
            assert data != path.read_bytes()
        else:
            assert data == path.read_bytes()  # copied unchanged


def test_imagenet_max_side_and_class_subsets(raw, tmp_path):
    from xdtrain.shards.cli import main

    src = raw / "imagenet"
    assert (
        main(
            [
                "--dataset",
                "imagenet",
                "--src",
                str(src),
                "--out",
                str(tmp_path / "a"),
                "--max-side",
                "40",
                "--classes",
                "10",
                "--quiet",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    manifest = manifest_mod.load(tmp_path / "a")
    assert manifest["classes"] == ["n01440764 tench, Tinca tinca"]  # every 100th synset
    samples = all_samples(tmp_path / "a")
    assert samples and all(p["cls"] == b"0" for p in samples.values())
    assert all(k.startswith(("n01440764_", "ILSVRC2012_val_")) for k in samples)
    for parts in samples.values():
        assert max(Image.open(io.BytesIO(parts["jpg"])).size) <= 40


# --------------------------------------------------------------------------- ChestX-ray8


def test_chestxray8_labels_lists_and_greyscale(raw, packed):
    root = raw / "chestxray8"
    with open(root / "Data_Entry_2017.csv", newline="") as fh:
        rows = {r["Image Index"][:-4]: r for r in csv.DictReader(fh)}
    test_list = {n[:-4] for n in (root / "test_list.txt").read_text().split()}
    manifest = manifest_mod.load(packed["chestxray8"])
    outputs = manifest["classes"]
    assert len(outputs) == 15 and outputs[-1] == "No Finding" and outputs[0] == "Atelectasis"
    for split in ("train", "val", "test"):
        for key, parts in all_samples(packed["chestxray8"], split).items():
            assert (split == "test") == (key in test_list)
            expected = rows[key]["Finding Labels"].split("|")
            vector = list(parts["labels.u8"])
            assert [outputs[i] for i, v in enumerate(vector) if v] == expected
            image = Image.open(io.BytesIO(parts["jpg"]))
            assert image.mode == "L" and image.size == (64, 64)
            assert json.loads(parts["json"])["patient"] == rows[key]["Patient ID"]
    notes = [n["note"] for n in manifest["notes"]]
    assert notes == ["RGBA PNG converted to greyscale"]


def test_chestxray8_png_codec_is_lossless(raw, tmp_path):
    from xdtrain.shards.cli import main

    src = raw / "chestxray8"
    assert (
        main(
            [
                "--dataset",
                "chestxray8",
                "--src",
                str(src),
                "--out",
                str(tmp_path),
                "--codec",
                "png",
                "--size",
                "128",
                "--quiet",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    samples = all_samples(tmp_path)
    for key, parts in list(samples.items())[:5]:
        source = next(src.glob(f"images_*/images/{key}.png"))
        original = np.asarray(Image.open(source).convert("L"))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(parts["png"]))), original)


# --------------------------------------------------------------------------- BraTS


def _case(raw, number):
    folder = raw / "brats" / synth_brats.ROOT / synth_brats.case_id(number)
    volumes = {}
    for path in folder.iterdir():
        kind = "seg" if "seg" in path.name.lower() else path.name.split("_")[-1].split(".")[0]
        volumes[kind] = np.asarray(nib.load(path).dataobj)
    return volumes


def test_brats_channels_masks_and_positions(raw, packed):
    manifest = manifest_mod.load(packed["brats"])
    cases = manifest["preprocessing"]["cases"]
    assert manifest["preprocessing"]["channels"] == ["flair", "t1", "t1ce", "t2"]
    samples = all_samples(packed["brats"])
    by_case: dict[str, list[int]] = {}
    for key, parts in samples.items():
        meta = json.loads(parts["json"])
        case_index, z, depth = np.frombuffer(parts["pos.i32"], "<i4").tolist()
        assert cases[case_index] == meta["case"] and z == meta["slice"] and key.endswith(f"{z:03d}")
        by_case.setdefault(meta["case"], []).append(z)
    splits = case_splits(packed["brats"])
    assert "train" in splits.values() and set(splits.values()) - {"train"}
    for number, case in enumerate(cases, 1):
        volumes = _case(raw, number)
        brain = volumes["flair"] > 0
        depth = brain.shape[2]
        in_brain = np.flatnonzero(brain.any(axis=(0, 1))).tolist()
        assert len(in_brain) < depth  # the selection has something to drop
        # --slices brain thins training cases only; val and test keep whole volumes
        expected = in_brain if splits[case] == "train" else list(range(depth))
        assert sorted(by_case[case]) == expected, (case, splits[case])
        z = in_brain[len(in_brain) // 2]
        parts = samples[f"{case}_{z:03d}"]
        image, mask = decode_png(parts["img.png"]), decode_png(parts["mask.png"])
        assert image.shape == (64, 64, 4) and image.dtype == np.uint8
        seg = volumes["seg"][:, :, z].T
        assert np.array_equal(mask, np.select([seg == 4, seg == 2, seg == 1], [3, 2, 1], 0))
        for channel, modality in enumerate(("flair", "t1", "t1ce", "t2")):
            source = volumes[modality][:, :, z].T.astype(float)
            inside = source > 0
            assert (image[..., channel][~inside] == 0).all()
            # Same ordering of intensities: the channel is this modality, rescaled.
            corr = np.corrcoef(image[..., channel][inside], source[inside])[0, 1]
            assert corr > 0.99, modality
    notes = manifest["notes"]
    assert len(notes) == 1 and notes[0]["input"].endswith(synth_brats.MISNAMED_SEG)


def test_brats_16_bit_and_all_slices(raw, tmp_path):
    from xdtrain.shards.cli import main

    assert (
        main(
            [
                "--dataset",
                "brats",
                "--src",
                str(raw / "brats"),
                "--out",
                str(tmp_path),
                "--bits",
                "16",
                "--slices",
                "all",
                "--quiet",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    samples = all_samples(tmp_path)
    assert len(samples) == 3 * synth_brats.SIZE["small"][0][2]
    image = decode_png(next(iter(samples.values()))["img.png"])
    assert image.dtype == np.uint16 and image.shape[2] == 4


# --------------------------------------------------------------------------- LiTS


def test_lits_both_releases_give_the_same_masks(packed):
    png = all_samples(packed["lits"])
    nifti = all_samples(packed["lits-nifti"])
    assert png.keys() == nifti.keys()
    for key in list(png)[:10]:
        assert np.array_equal(decode_png(png[key]["mask.png"]), decode_png(nifti[key]["mask.png"]))


def test_lits_masks_merge_tumour_over_liver_and_window_hu(raw, packed):
    samples = all_samples(packed["lits-nifti"])
    hu, labels, _ = synth_lits.scan("small", 0, 0)
    with_liver = [k for k in range(labels.shape[2]) if labels[:, :, k].any()]
    assert len(with_liver) < labels.shape[2]
    split = case_splits(packed["lits-nifti"])["volume-0"]
    kept = with_liver if split == "train" else list(range(labels.shape[2]))
    assert sorted(int(k.split("_")[1]) for k in samples if k.startswith("volume-0_")) == kept
    k = int(np.argmax((labels == 2).sum(axis=(0, 1))))
    parts = samples[f"volume-0_{k:03d}"]
    mask, image = decode_png(parts["mask.png"]), decode_png(parts["img.png"])
    assert np.array_equal(mask, labels[:, :, k].T)
    expected = np.rint(np.clip((hu[:, :, k].T + 200) / 450, 0, 1) * 255)
    assert np.abs(image.astype(int) - expected).max() <= 1
    png = all_samples(packed["lits"])[f"volume-0_{k:03d}"]
    liver_and_lesion = decode_png(png["mask.png"])
    assert set(np.unique(liver_and_lesion).tolist()) == {0, 1, 2}


# --------------------------------------------------------------------------- volumes


@pytest.mark.parametrize("name", ["brats", "lits", "lits-nifti"])
def test_slice_selection_thins_the_training_split_only(packed, name):
    """Evaluation never selects by label or content: every val/test case holds every slice
    of its volume, while --slices (default brain / liver) thins training cases."""
    manifest = manifest_mod.load(packed[name])
    assert manifest["options"]["slices"] in ("brain", "liver")
    thinned = 0
    for split in manifest["splits"]:
        slices: dict[int, set[int]] = {}
        depth: dict[int, int] = {}
        for parts in all_samples(packed[name], split).values():
            case, z, n = np.frombuffer(parts["pos.i32"], "<i4").tolist()
            slices.setdefault(case, set()).add(z)
            depth[case] = n
        for case, seen in slices.items():
            if split == "train":
                thinned += len(seen) < depth[case]
            else:
                assert seen == set(range(depth[case])), (split, case)
    assert thinned > 0  # the selection is on for training: the test has power
    assert set(manifest["splits"]) > {"train"}


def test_val_test_splits_packed_with_selection_are_refused(packed, tmp_path):
    """Shard folders written when --slices thinned every split cannot be scored."""
    import shutil

    from xdtrain.data.shardset import open_split
    from xdtrain.errors import UserError

    old = tmp_path / "lits"
    shutil.copytree(packed["lits"], old)
    manifest = manifest_mod.load(old)
    del manifest["preprocessing"]["slice_selection"]
    (old / manifest_mod.NAME).write_text(json.dumps(manifest))
    assert open_split(old, "lits", "train").samples > 0  # training may be thinned
    for split in ("val", "test"):
        with pytest.raises(UserError, match="repack") as info:
            open_split(old, "lits", split)
        assert "\n" not in str(info.value)
