"""Every shard of every data set reads with GNU tar, webdataset and DALI; counts match."""

from __future__ import annotations

import json
import math
import subprocess
import typing
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from wds2idx import IndexCreator

from xdtrain.config import DataConfig
from xdtrain.data.shardset import LAYOUTS, open_split
from xdtrain.shards import PACKERS
from xdtrain.shards import manifest as manifest_mod
from xdtrain.shards.splits import fraction_tier_indices, tier_name
from xdtrain.shards.tar import BLOCK, parse_index, read_samples

NAMES = ["imagenet", "chestxray8", "brats", "lits", "lits-nifti"]
COMPONENTS = {
    "imagenet": {"jpg", "cls", "label.i64", "json"},
    "chestxray8": {"jpg", "labels.u8", "json"},
    "brats": {"img.png", "mask.png", "pos.i32", "json"},
    "lits": {"img.png", "mask.png", "pos.i32", "json"},
    "lits-nifti": {"img.png", "mask.png", "pos.i32", "json"},
}


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.tar"))


@pytest.mark.parametrize("name", NAMES)
def test_manifest_lists_every_shard_and_counts(packed, name):
    folder = packed[name]
    manifest = manifest_mod.load(folder)
    listed = {s["name"]: s for e in manifest["splits"].values() for s in e["shards"]}
    assert sorted(listed) == [p.name for p in shard_files(folder)]
    assert set(manifest["splits"]) == {"train", "val", "test"}
    for entry in manifest["splits"].values():
        assert entry["samples"] == sum(s["samples"] for s in entry["shards"]) > 0
    for path in shard_files(folder):
        assert len(read_samples(path)) == listed[path.name]["samples"]
    assert manifest_mod.verify(folder) == (len(listed), [])
    assert not list(folder.glob(".*"))  # no state, spool or temporary files left


@pytest.mark.parametrize("name", NAMES)
def test_gnu_tar_reads_every_shard(packed, name):
    for path in shard_files(packed[name]):
        assert path.stat().st_size % BLOCK == 0
        listing = subprocess.run(
            ["tar", "tvf", str(path)], capture_output=True, text=True, check=True
        )
        assert listing.stderr == ""
        names = [line.split()[-1] for line in listing.stdout.splitlines()]
        keys = [n.split(".", 1)[0] for n in names]
        assert all("." not in k for k in keys)
        exts = defaultdict(set)
        for n in names:
            key, ext = n.split(".", 1)
            exts[key].add(ext)
        assert all(e == COMPONENTS[name] for e in exts.values())


@pytest.mark.parametrize("name", NAMES)
def test_index_equals_wds2idx(packed, name, tmp_path):
    for path in shard_files(packed[name]):
        reference = tmp_path / f"{path.stem}.idx"
        with IndexCreator(str(path), str(reference), verbose=False) as creator:
            creator.create_index()
        assert path.with_suffix(".idx").read_text() == reference.read_text()


@pytest.mark.parametrize("name", NAMES)
def test_webdataset_library_reads_all_samples(packed, name):
    folder = packed[name]
    manifest = manifest_mod.load(folder)
    for split, entry in manifest["splits"].items():
        urls = [str(folder / s["name"]) for s in entry["shards"]]
        samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
        assert len(samples) == entry["samples"], split
        for sample in samples:
            assert set(sample) - {"__key__", "__url__", "__local_path__"} == COMPONENTS[name]
            assert isinstance(sample["json"], dict)


def _dali_count(urls: list[str], exts: list[str], dtypes) -> tuple[int, list]:
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def pipe():
        return tuple(
            fn.readers.webdataset(
                paths=urls,
                index_paths=[u[:-4] + ".idx" for u in urls],
                ext=exts,
                dtypes=dtypes,
                missing_component_behavior="error",
                name="reader",
            )
        )

    pipeline = pipe()
    pipeline.build()
    first = pipeline.run()
    return pipeline.epoch_size("reader"), [np.array(o.at(0)) for o in first]


@pytest.mark.parametrize("name", NAMES)
def test_dali_reads_with_the_written_index(packed, name):
    from nvidia.dali import types

    folder = packed[name]
    manifest = manifest_mod.load(folder)
    if name == "imagenet":
        exts, dtypes = ["jpg", "label.i64"], [types.UINT8, types.INT64]
    elif name == "chestxray8":
        exts, dtypes = ["jpg", "labels.u8"], [types.UINT8, types.UINT8]
    else:
        exts, dtypes = ["img.png", "mask.png", "pos.i32"], [types.UINT8, types.UINT8, types.INT32]
    for split, entry in manifest["splits"].items():
        urls = [str(folder / s["name"]) for s in entry["shards"]]
        count, first = _dali_count(urls, exts, dtypes)
        assert count == entry["samples"], split
        label = first[1]
        if name == "imagenet":
            assert label.shape == (1,) and 0 <= label[0] < len(manifest["classes"])
        elif name == "chestxray8":
            assert label.shape == (15,) and set(label.tolist()) <= {0, 1}
        else:
            assert first[2].shape == (3,) and first[2][1] < first[2][2]


def _groups(folder: Path, name: str) -> dict[str, set[str]]:
    field = {"imagenet": None, "chestxray8": "patient"}.get(name, "case")
    groups = {}
    manifest = manifest_mod.load(folder)
    for split, entry in manifest["splits"].items():
        found = set()
        for shard in entry["shards"]:
            for key, parts in read_samples(folder / shard["name"]):
                found.add(key if field is None else json.loads(parts["json"])[field])
        groups[split] = found
    return groups


@pytest.mark.parametrize("name", NAMES)
def test_no_patient_in_two_splits(packed, name):
    groups = _groups(packed[name], name)
    splits = list(groups)
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not groups[a] & groups[b], (a, b)
    manifest = manifest_mod.load(packed[name])
    for split, entry in manifest["splits"].items():
        assert entry["patients"] == len(groups[split])
        if "patient_ids" in entry:
            assert set(entry["patient_ids"]) == groups[split]


@pytest.mark.parametrize("name", NAMES)
def test_samples_are_shuffled_across_groups(packed, name):
    """Samples are not in key (class, patient, slice) order within a split."""
    folder = packed[name]
    manifest = manifest_mod.load(folder)
    for entry in manifest["splits"].values():
        keys = [k for s in entry["shards"] for k, _ in read_samples(folder / s["name"])]
        assert len(keys) < 8 or keys != sorted(keys)  # 8! orders: sorted by chance is rare


def _patients(folder: Path, names: list[str]) -> set[str]:
    """Patients of the samples in the shard files ``names`` (each sample's ``json``)."""
    return {
        json.loads(parts["json"])["patient"] for n in names for _, parts in read_samples(folder / n)
    }


def test_fraction_tiers_are_nested_by_patient(packed):
    folder = packed["chestxray8"]
    manifest = manifest_mod.load(folder)
    train = manifest["splits"]["train"]
    everyone = sorted(train["patient_ids"])
    n = len(everyone)
    fractions = sorted(manifest["fractions"].values())
    assert fractions == [0.01, 0.1, 0.5] and n >= 10  # enough patients for distinct tiers
    # fraction -> patients of the files it reads
    read = {}
    for fraction in (*fractions, 1.0):
        names = manifest_mod.shards(manifest, "train", fraction)
        assert names == sorted(names, key=lambda name: name.split("-")[1])
        read[fraction] = _patients(folder, names)
        # ceil(f * n) patients, at least one: the rule of splits.fraction_tier_indices
        assert len(read[fraction]) == (n if fraction == 1.0 else max(1, math.ceil(fraction * n)))
    assert sorted(read[1.0]) == everyone
    assert read[0.01] < read[0.1] < read[0.5] < read[1.0]  # nested, and each adds patients
    # each file tier holds whole patients: nobody is in two tiers
    tiers = defaultdict(list)
    for shard in train["shards"]:
        tiers[shard["tier"]].append(shard["name"])
    assert sorted(tiers) == ["p001", "p010", "p050", "p100"]
    by_tier = {tier: _patients(folder, names) for tier, names in tiers.items()}
    assert sum(len(p) for p in by_tier.values()) == n
    assert set().union(*by_tier.values()) == set(everyone)
    # and they are the patients fraction_tier_indices picks for the pack's seed
    picked = fraction_tier_indices(n, tuple(fractions), manifest["seed"])
    names = [tier_name(f) for f in (*fractions, 1.0)]
    assert by_tier == {
        name: {p for p, i in zip(everyone, picked.tolist(), strict=True) if i == k}
        for k, name in enumerate(names)
    }
    assert manifest_mod.shards(manifest, "val") == [
        s["name"] for s in manifest["splits"]["val"]["shards"]
    ]
    assert manifest_mod.shards(manifest, "nope") == []


def test_parse_index_round_trip(packed):
    path = shard_files(packed["brats"])[0]
    refs = parse_index(path.with_suffix(".idx").read_text())
    samples = read_samples(path)
    with open(path, "rb") as fh:
        for ref, (key, parts) in zip(refs, samples, strict=True):
            assert ref.key == key and ref.read(fh) == parts


def test_one_registry_entry_makes_a_data_set_known_everywhere():
    assert typing.get_args(typing.get_type_hints(DataConfig)["dataset"]) == tuple(PACKERS)
    fixed = {name: p.layout for name, p in PACKERS.items() if hasattr(p, "layout")}
    assert fixed == LAYOUTS
    # a user's own data sets (dicom, nifti): the layout follows from how they were packed
    assert all(hasattr(p, "layout_of") for name, p in PACKERS.items() if name not in fixed)


@pytest.mark.parametrize("name", NAMES)
def test_every_sample_holds_what_its_layout_reads(packed, name):
    dataset = name.split("-")[0]
    shardset = open_split(packed[name], dataset, "test")
    layout = shardset.layout
    assert layout is PACKERS[dataset].layout
    wanted = {shardset.image_ext, layout.label} | ({layout.mask} if layout.mask else set())
    assert (layout.kind == "segmentation") == (layout.mask is not None)
    dtype = np.dtype(layout.label_dtype).newbyteorder("<")
    for path in shardset.paths:
        for key, parts in read_samples(path):
            assert wanted <= set(parts), (path, key)
            assert len(parts[layout.label]) == dtype.itemsize * layout.label_size, (path, key)
