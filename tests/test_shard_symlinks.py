"""Releases reached through symbolic links below ``--src`` (a 40 GB release on another disk):
every packer finds them, a link that loops back is walked once, and the shards are those of
the same release without links."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from xdtrain.shards.base import walk
from xdtrain.shards.cli import main as shard_main

# data set -> (the folder of its raw copy in the session's `raw`, the part moved elsewhere)
LINKED = {
    "brats": ("brats", "MICCAI_BraTS2020_TrainingData"),
    "lits": ("lits-nifti", None),  # the whole release folder linked as --src's only child
    "chestxray8": ("chestxray8", "images_001"),
    "imagenet": ("imagenet", "ILSVRC"),
}


def _pack(src: Path, out: Path, dataset: str) -> dict:
    argv = ["--dataset", dataset, "--src", str(src), "--out", str(out), "--quiet"]
    extra = ["--size", "64"] if dataset == "chestxray8" else []
    assert shard_main([*argv, "--workers", "1", *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


def _shards(manifest: dict) -> dict:
    return {s: [x["sha256"] for x in e["shards"]] for s, e in manifest["splits"].items()}


@pytest.mark.parametrize("dataset", sorted(LINKED))
def test_every_packer_follows_links_below_src(raw, tmp_path, dataset):
    folder, moved = LINKED[dataset]
    plain = tmp_path / "plain"
    shutil.copytree(raw / folder, plain, symlinks=True)
    linked, store = tmp_path / "linked", tmp_path / "store"
    linked.mkdir()
    store.mkdir()
    if moved is None:
        shutil.copytree(raw / folder, store / "release")
        (linked / "release").symlink_to(store / "release", target_is_directory=True)
    else:
        shutil.copytree(raw / folder, linked, dirs_exist_ok=True)
        shutil.move(linked / moved, store / moved)
        (linked / moved).symlink_to(store / moved, target_is_directory=True)
    # inside the linked release: a link back to itself (read once) and one up to --src
    inner = store / (moved or "release")
    (inner / "loop").symlink_to(inner, target_is_directory=True)
    (inner / "up").symlink_to(linked, target_is_directory=True)
    a = _pack(plain, tmp_path / "a", dataset)
    b = _pack(linked, tmp_path / "b", dataset)
    assert a["splits"] and _shards(a) == _shards(b)
    assert {k: v["samples"] for k, v in a["splits"].items()} == {
        k: v["samples"] for k, v in b["splits"].items()
    }


def test_walk_visits_each_real_folder_once(tmp_path):
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "real" / "sub" / "x.nii").write_text("")
    (tmp_path / "real" / "y.nii").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)  # twice
    (tmp_path / "real" / "sub" / "up").symlink_to(tmp_path, target_is_directory=True)  # loop
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere", target_is_directory=True)
    (tmp_path / "real" / "sub" / "root").symlink_to("/", target_is_directory=True)
    (tmp_path.parent / "outside.nii").write_text("")  # reached only through a link upwards
    files = walk(tmp_path, lambda name: name.endswith(".nii"))
    assert sorted(p.name for p in files) == ["x.nii", "y.nii"]
    assert len({os.path.realpath(p) for p in files}) == 2
    folders = walk(tmp_path, lambda name: name in ("real", "link", "sub"), dirs=True)
    assert [p.relative_to(tmp_path) for p in folders] == [Path("link"), Path("link/sub")]
