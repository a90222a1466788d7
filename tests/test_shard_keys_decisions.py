"""Sample keys from any file name; every decision counted in the manifest; an --out folder
in which xd-shard touches only its own files.

Keys are checked against the readers' own rules: webdataset's key splitting
(``base_plus_ext``: the key is the name up to the first dot), the DALI index (text split
at spaces, one ``ext offset size name`` field group per component), xdtrain's index reader
and, where DALI is installed, its webdataset reader.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
from helpers import fail_at_close

from xdtrain.errors import run_cli
from xdtrain.shards import PACKERS, base, imagenet, pack, tar
from xdtrain.shards import manifest as manifest_mod
from xdtrain.shards.cli import main
from xdtrain.shards.tar import parse_index, read_samples
from xdtrain.synth import generate

TRAIN = "ILSVRC/Data/CLS-LOC/train"
VAL = "ILSVRC/Data/CLS-LOC/val"
WNID = "n01440764"
# ImageNet training names that are no valid key, or the same key as another: "{w}" is the wnid
ODD_TRAIN = [
    "{w}_900 (1).JPEG",  # a file manager's duplicate
    "{w}_10.copy.JPEG",  # a dot before the extension
    "{w}_11.a.b.c.jpeg",  # several
    "{w}_(2).jpg",  # brackets
    "{w}_ünï.JPEG",  # not ASCII
    "{w}_#3.JPEG",
    "{w}_x y.JPEG",  # gives the key of the next one, which keeps it
    "{w}_x_y.JPEG",
    "{w}_dup.JPEG",  # one stem, two extensions: the first in name order keeps the key
    "{w}_dup.jpg",
]
ODD_VAL = "ILSVRC2012_val_00000001 (1).JPEG"  # labelled in LOC_val_solution.csv by its stem


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Small synthetic ImageNet and ChestX-ray8 releases, generated once for this module."""
    root = tmp_path_factory.mktemp("raw")
    generate("imagenet", root, count=4)
    generate("chestxray8", root, count=60)
    return root


def copy(synthetic: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(synthetic / name, tmp_path / name))


def run(dataset: str, src: Path, out: Path, *extra: str) -> int:
    """``xd-shard`` as the command runs it: a UserError is exit 2 and one line, anything
    else propagates (a traceback fails the test)."""
    argv = ["--dataset", dataset, "--src", str(src), "--out", str(out), "--quiet"]
    return run_cli(main, [*argv, "--workers", "1", *extra])


def samples(out: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of a shard folder by key (keys must be unique across all shards)."""
    found: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*.tar")):
        for key, parts in read_samples(shard):
            assert key not in found, f"sample key {key} twice"
            found[key] = parts
    return found


def files(out: Path) -> dict[str, str]:
    """Every file of a folder tree with the sha256 of its bytes."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def odd_imagenet(synthetic: Path, tmp_path: Path) -> Path:
    """ImageNet with :data:`ODD_TRAIN` in one class folder and :data:`ODD_VAL`, labelled."""
    src = copy(synthetic, "imagenet", tmp_path)
    folder = src / TRAIN / WNID
    plain = (folder / f"{WNID}_2.JPEG").read_bytes()
    for name in ODD_TRAIN:
        (folder / name.format(w=WNID)).write_bytes(plain)
    shutil.copy(src / VAL / "ILSVRC2012_val_00000001.JPEG", src / VAL / ODD_VAL)
    with open(src / "LOC_val_solution.csv", "a", newline="") as fh:
        csv.writer(fh).writerow([ODD_VAL.removesuffix(".JPEG"), f"{WNID} 1 2 30 40"])
    return src


# --------------------------------------------------------------------------- the key rule


@pytest.mark.parametrize(
    "stem",
    ["n01_900 (1)", "a.b.c", "(x)", "ünï", "a#b", "tab\tx", "line\nbreak", "a/b", "-x-", "x"],
)
def test_sample_key_is_a_key_for_webdataset_and_dali(stem):
    from webdataset.tariterators import base_plus_ext

    key = base.sample_key(stem)
    assert tar.key_problem(key) is None and base.sample_key(stem) == key
    assert len(key) == len(stem)  # one character for one: names stay recognisable
    assert base_plus_ext(f"{key}.label.i64") == (key, "label.i64")  # webdataset's own split
    assert f"label.i64 512 8 {key}.label.i64".split()[3] == f"{key}.label.i64"  # DALI index


@pytest.mark.parametrize("key", ["a#b", "ünï", "a\tb", "a\nb", "(x)", "a,b"])
def test_the_writer_refuses_keys_outside_the_rule(key):
    with pytest.raises(ValueError):
        tar.check_key(key)


def test_claim_key_disambiguates_deterministically():
    taken: set[str] = set()
    assert base.claim_key("a_b", "x/a_b.JPEG", taken) == "a_b"
    other = base.claim_key("a_b", "x/a b.JPEG", taken)
    digest = hashlib.sha256(b"x/a b.JPEG").hexdigest()[:8]
    assert other == f"a_b_{digest}" and taken == {"a_b", other}
    assert base.claim_key("a_b", "x/a b.JPEG", taken) is None  # nothing free: skip
    assert base.claim_key("", "x/.JPEG", taken) is None


# --------------------------------------------------------------------------- ImageNet keys


def test_imagenet_odd_file_names_pack_with_valid_unique_keys(synthetic, tmp_path):
    from webdataset.tariterators import base_plus_ext

    src = odd_imagenet(synthetic, tmp_path)
    out = tmp_path / "out"
    assert run("imagenet", src, out) == 0
    found = samples(out)
    by_file = defaultdict(list)
    for key, parts in found.items():
        assert tar.key_problem(key) is None
        assert set(parts) == {"jpg", "cls", "label.i64", "json"}
        meta = json.loads(parts["json"])
        assert parts["json"] == base.json_bytes(meta)  # the formatted fast path too
        by_file[meta["file"]].append(key)
    odd = [name.format(w=WNID) for name in ODD_TRAIN] + [ODD_VAL]
    assert all(len(by_file[name]) == 1 for name in odd)  # each packed exactly once
    key = {name: by_file[name][0] for name in odd}
    assert key[f"{WNID}_900 (1).JPEG"] == f"{WNID}_900__1_"
    assert key[f"{WNID}_10.copy.JPEG"] == f"{WNID}_10_copy"
    assert key[f"{WNID}_11.a.b.c.jpeg"] == f"{WNID}_11_a_b_c"
    assert key[f"{WNID}_ünï.JPEG"] == f"{WNID}__n_"
    assert key[ODD_VAL] == "ILSVRC2012_val_00000001__1_"
    assert key[f"{WNID}_x_y.JPEG"] == f"{WNID}_x_y"  # a name that is its key keeps it
    assert key[f"{WNID}_x y.JPEG"].startswith(f"{WNID}_x_y_")
    assert key[f"{WNID}_dup.JPEG"] == f"{WNID}_dup" != key[f"{WNID}_dup.jpg"]
    label = manifest_mod.load(out)["classes"].index(f"{WNID} tench, Tinca tinca")
    assert all(found[key[name]]["cls"] == str(label).encode() for name in odd)
    # the val image with the odd name is labelled through its stem, as listed
    assert json.loads(found[key[ODD_VAL]]["json"])["wnid"] == WNID

    manifest = manifest_mod.load(out)
    renamed = {n["input"].rpartition("/")[2] for n in manifest["notes"] if "packed as" in n["note"]}
    assert renamed == set(odd) - {f"{WNID}_x_y.JPEG", f"{WNID}_dup.JPEG"}
    decisions = {d["decision"]: d["count"] for d in manifest["decisions"]}
    assert decisions["sample keys renamed"] == len(renamed)

    for shard in sorted(out.glob("*.tar")):
        index = shard.with_suffix(".idx").read_text()
        assert index == manifest_mod.index_from_tar(shard)  # what wds2idx would write
        for line in index.splitlines()[1:]:
            fields = line.split(" ")
            assert len(fields) % 4 == 0  # DALI: ext offset size name, nothing split apart
            for name in fields[3::4]:
                assert base_plus_ext(name)[0] == name.partition(".")[0] in found
        assert [r.key for r in parse_index(index)] == [k for k, _ in read_samples(shard)]
    assert run_cli(main, ["verify", str(out)]) == 0


def test_webdataset_and_dali_read_the_samples_of_odd_names(synthetic, tmp_path):
    import webdataset as wds

    src = odd_imagenet(synthetic, tmp_path)
    out = tmp_path / "out"
    assert run("imagenet", src, out) == 0
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    read = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    assert sorted(s["__key__"] for s in read) == sorted(samples(out))
    files_read = {s["json"]["file"] for s in read}
    assert {name.format(w=WNID) for name in ODD_TRAIN} | {ODD_VAL} <= files_read

    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def pipe():
        return tuple(
            fn.readers.webdataset(
                paths=urls,
                index_paths=[u[:-4] + ".idx" for u in urls],
                ext=["jpg", "label.i64"],
                dtypes=[types.UINT8, types.INT64],
                missing_component_behavior="error",
                name="reader",
            )
        )

    pipeline = pipe()
    pipeline.build()
    assert pipeline.epoch_size("reader") == len(read)
    labels = pipeline.run()[1]
    classes = len(manifest_mod.load(out)["classes"])
    assert all(0 <= int(labels.at(i)[0]) < classes for i in range(len(labels)))


def test_a_name_without_a_key_is_skipped_with_a_reason(synthetic, tmp_path):
    src = copy(synthetic, "imagenet", tmp_path)
    plain = src / TRAIN / WNID / f"{WNID}_2.JPEG"
    shutil.copy(plain, plain.with_name(".JPEG"))  # nothing before the extension
    assert run("imagenet", src, tmp_path / "out") == 0
    skipped = {s["input"]: s["reason"] for s in manifest_mod.load(tmp_path / "out")["skipped"]}
    assert skipped == {f"{TRAIN}/{WNID}/.JPEG": "no sample key can be formed from this file name"}


def test_the_driver_skips_keys_a_packer_got_wrong(synthetic, tmp_path, monkeypatch):
    """Whatever a packer derives, a key problem is a skip with the reason, never a crash."""
    src = odd_imagenet(synthetic, tmp_path)
    monkeypatch.setattr(imagenet, "sample_key", lambda stem: stem)  # keys as the names are
    assert run("imagenet", src, tmp_path / "a") == 0
    skipped = {s["input"]: s["reason"] for s in manifest_mod.load(tmp_path / "a")["skipped"]}
    assert skipped[f"{TRAIN}/{WNID}/{WNID}_900 (1).JPEG"].endswith(
        "holds characters other than A-Z, a-z, 0-9, _ and -"
    )

    monkeypatch.undo()
    real = PACKERS["imagenet"].encode

    def bad_sample_key(source, options):
        produced = real(source, options)
        if source.key == f"{WNID}_2":
            produced[0].key = "bad key"
        return produced

    monkeypatch.setattr(PACKERS["imagenet"], "encode", bad_sample_key)
    assert run("imagenet", src, tmp_path / "b") == 0
    skipped = {s["input"]: s["reason"] for s in manifest_mod.load(tmp_path / "b")["skipped"]}
    assert "holds characters other than" in skipped[f"{TRAIN}/{WNID}/{WNID}_2.JPEG"]


def test_imagenet_files_not_read_and_classes_left_out_are_recorded(synthetic, tmp_path):
    src = copy(synthetic, "imagenet", tmp_path)
    (src / TRAIN / "README.txt").write_text("mine")
    (src / TRAIN / WNID / "extra").mkdir()
    (src / VAL / "old").mkdir()
    assert run("imagenet", src, tmp_path / "out", "--classes", "100") == 0
    manifest = manifest_mod.load(tmp_path / "out")
    skipped = {s["input"]: s["reason"] for s in manifest["skipped"]}
    assert skipped == {
        f"{TRAIN}/README.txt": "not inside a class folder",
        f"{TRAIN}/{WNID}/extra": "a folder inside a class folder: not read",
        f"{VAL}/old": "a folder inside the val folder: not read",
    }
    synsets = (src / "LOC_synset_mapping.txt").read_text().splitlines()
    decisions = {d["decision"]: d for d in manifest["decisions"]}
    left_out = decisions["synsets left out by --classes"]
    assert left_out["count"] == len(synsets) - len(manifest["classes"]) > 0


# --------------------------------------------------------------------------- ChestX-ray8


def _table(src: Path) -> list[dict]:
    with open(src / "Data_Entry_2017.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _lists(src: Path) -> tuple[list[str], list[str]]:
    return (
        (src / "test_list.txt").read_text().split(),
        (src / "train_val_list.txt").read_text().split(),
    )


def overlapping_lists(src: Path) -> None:
    """Put one film of a patient whose films are all in train_val_list.txt into test_list.txt."""
    films = defaultdict(list)
    for row in _table(src):
        films[row["Patient ID"]].append(row["Image Index"])
    test, train_val = _lists(src)
    patient = next(p for p, f in sorted(films.items()) if len(f) >= 3 and set(f) <= set(train_val))
    first = sorted(films[patient])[0]
    train_val.remove(first)
    (src / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (src / "test_list.txt").write_text("\n".join([*test, first]) + "\n")


def films_of_test_patients_in_train_val(src: Path) -> set[str]:
    """Computed from the release alone: train_val films of patients with test films."""
    patient = {row["Image Index"]: row["Patient ID"] for row in _table(src)}
    test, train_val = _lists(src)
    tested = {patient[f] for f in test if f in patient}
    return {f for f in train_val if f in patient and patient[f] in tested and f not in test}


def _split_patients(manifest: dict) -> dict[str, set[str]]:
    return {name: set(entry["patient_ids"]) for name, entry in manifest["splits"].items()}


def _info(folder: Path, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "250")  # one table row per line
    assert run_cli(main, ["info", str(folder)]) == 0
    return capsys.readouterr().out


def test_cx8_list_overlap_is_left_out_by_default_and_recorded(
    synthetic, tmp_path, capsys, monkeypatch
):
    src = copy(synthetic, "chestxray8", tmp_path)
    overlapping_lists(src)
    expected = films_of_test_patients_in_train_val(src)
    assert expected
    out = tmp_path / "out"
    assert run("chestxray8", src, out, "--size", "32") == 0
    manifest = manifest_mod.load(out)
    left_out = {
        Path(s["input"]).name for s in manifest["skipped"] if "train_val_list" in s["reason"]
    }
    assert left_out == expected
    assert manifest["splits"]["test"]["samples"] == len(_lists(src)[0])  # exactly test_list
    patients = _split_patients(manifest)
    assert not patients["test"] & (patients["train"] | patients["val"])
    decision = next(d for d in manifest["decisions"] if d["decision"].startswith("train_val"))
    assert decision["count"] == len(expected)
    assert sorted(manifest["preprocessing"]["list_overlap"]["films"]) == sorted(expected)
    shown = _info(out, capsys, monkeypatch)
    assert f"{len(manifest['skipped'])} input(s) skipped" in shown
    assert f"{len(manifest['decisions'])} decision(s)" in shown
    assert any(
        "train_val_list.txt films of test patients" in line and f" {len(expected)} " in line
        for line in shown.splitlines()
    )


def test_cx8_list_overlap_moved_to_test_is_recorded(synthetic, tmp_path):
    src = copy(synthetic, "chestxray8", tmp_path)
    overlapping_lists(src)
    expected = films_of_test_patients_in_train_val(src)
    out = tmp_path / "out"
    assert run("chestxray8", src, out, "--size", "32", "--list-overlap", "test") == 0
    manifest = manifest_mod.load(out)
    moved = {Path(n["input"]).name for n in manifest["notes"] if "moved to test" in n["note"]}
    assert moved == expected
    assert manifest["splits"]["test"]["samples"] == len(_lists(src)[0]) + len(expected)
    test_keys = set()
    for name in manifest_mod.shards(manifest, "test"):
        test_keys |= {key for key, _ in read_samples(out / name)}
    assert {f.removesuffix(".png") for f in expected} <= test_keys
    patients = _split_patients(manifest)
    assert not patients["test"] & (patients["train"] | patients["val"])
    decision = next(d for d in manifest["decisions"] if d["decision"].startswith("train_val"))
    assert decision["count"] == len(expected)


def test_cx8_table_read_is_recorded(synthetic, tmp_path, capsys, monkeypatch):
    src = copy(synthetic, "chestxray8", tmp_path)
    table = src / "Data_Entry_2017.csv"
    shutil.copy(table, src / "Data_Entry_2017_v2020.csv")
    assert run("chestxray8", src, tmp_path / "both", "--size", "32") == 0
    manifest = manifest_mod.load(tmp_path / "both")
    assert manifest["preprocessing"]["table"] == {
        "name": "Data_Entry_2017.csv",
        "bytes": table.stat().st_size,
        "sha256": hashlib.sha256(table.read_bytes()).hexdigest(),
        "not_read": ["Data_Entry_2017_v2020.csv"],
    }
    assert any(n["input"] == "Data_Entry_2017_v2020.csv" for n in manifest["notes"])
    shown = _info(tmp_path / "both", capsys, monkeypatch)
    assert "Data_Entry table read" in shown and "Data_Entry_2017.csv" in shown

    table.unlink()
    assert run("chestxray8", src, tmp_path / "v2020", "--size", "32") == 0
    record = manifest_mod.load(tmp_path / "v2020")["preprocessing"]["table"]
    assert record["name"] == "Data_Entry_2017_v2020.csv" and record["not_read"] == []


def test_cx8_odd_film_names_and_files_not_read(synthetic, tmp_path):
    src = copy(synthetic, "chestxray8", tmp_path)
    images = src / "images_001/images"
    original = sorted(images.glob("*.png"))[0]
    odd = f"{original.stem} (1).png"
    shutil.copy(original, images / odd)
    row = next(r for r in _table(src) if r["Image Index"] == original.name)
    with open(src / "Data_Entry_2017.csv", "a", newline="") as fh:
        csv.writer(fh).writerow([odd, *list(row.values())[1:]])
    test, train_val = _lists(src)
    listed = "test_list.txt" if original.name in test else "train_val_list.txt"
    with open(src / listed, "a") as fh:
        fh.write(f"{odd}\n")  # with its original, so its patient stays in one split
    (images / "Thumbs.db").write_bytes(b"x")
    (src / "images_002/images" / original.name).write_bytes(original.read_bytes())
    out = tmp_path / "out"
    assert run("chestxray8", src, out, "--size", "32") == 0
    found = samples(out)
    key = f"{original.stem}__1_"
    assert json.loads(found[key]["json"])["image"] == odd
    skipped = {s["input"]: s["reason"] for s in manifest_mod.load(out)["skipped"]}
    assert skipped["images_001/images/Thumbs.db"] == "not a .png film"
    assert skipped[f"images_002/images/{original.name}"] == (
        f"same file name as images_001/images/{original.name}"
    )


def test_the_driver_records_inputs_it_moves_to_their_patients_split():
    scan = base.Scan(
        sources=[
            base.Source("a_0", "p1", {"input": "a_0.png"}, split="test"),
            base.Source("a_1", "p1", {"input": "a_1.png"}),
            base.Source("b_0", "p2", {"input": "b_0.png"}),
        ],
        classes=["x"],
    )
    ratios = {"train": 0.7, "val": 0.1, "test": 0.2}
    pack.plan_groups(PACKERS["chestxray8"], scan, ratios=ratios, fractions=(), seed=0, options={})
    assert scan.sources[1].split == "test"
    assert [n["input"] for n in scan.notes] == ["a_1.png"]
    assert scan.info["decisions"][0]["count"] == 1


# --------------------------------------------------------------------------- the --out folder


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_foreign_files_in_out_survive_and_the_run_refuses(synthetic, tmp_path, capsys, force):
    out = tmp_path / "out"
    out.mkdir()
    (out / "my-own-000000.tar").write_bytes(b"mine")
    (out / "my-own-000000.idx").write_text("v1.2 0\n")
    before = files(out)
    extra = ["--force"] if force else []
    assert run("imagenet", synthetic / "imagenet", out, *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "my-own-000000.idx" in err and "--out" in err
    assert files(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)


def test_force_replaces_only_what_xd_shard_recorded(synthetic, tmp_path, capsys):
    src = synthetic / "imagenet"
    out = tmp_path / "out"
    assert run("imagenet", src, out, "--shard-size", "20KB") == 0
    manifest = manifest_mod.load(out)
    stray = out / "val-000099.tar"  # named like a shard, recorded nowhere
    stray.write_bytes(b"mine")
    (out / ".val-000000.tar.tmp").write_bytes(b"a killed run's")
    before = files(out)
    assert run("imagenet", src, out, "--seed", "3", "--force") == 2
    assert "val-000099.tar" in capsys.readouterr().err
    assert files(out) == before  # nothing touched, our own files neither

    stray.unlink()
    assert run("imagenet", src, out, "--seed", "3", "--force") == 0
    after = manifest_mod.load(out)
    assert after["seed"] == 3
    listed = {s["name"] for e in after["splits"].values() for s in e["shards"]}
    names = {p.name for p in out.iterdir()}
    assert names == {"manifest.json"} | listed | {n[:-4] + ".idx" for n in listed}
    old = {s["name"] for e in manifest["splits"].values() for s in e["shards"]}
    assert old - listed and not (old - listed) & names  # the earlier run's extra shards went


@pytest.mark.parametrize("shards_before_failure", [0, 3])
def test_an_interrupted_run_names_its_own_files_and_resumes(
    synthetic, tmp_path, monkeypatch, capsys, shards_before_failure
):
    src = synthetic / "imagenet"
    args = ("--shard-size", "20KB")
    assert run("imagenet", src, tmp_path / "whole", *args) == 0
    out = tmp_path / "out"
    fail_at_close(monkeypatch, shards_before_failure)
    with pytest.raises(OSError):
        run("imagenet", src, out, *args)
    monkeypatch.undo()
    state = json.loads((out / pack.STATE).read_text())  # written before the first shard
    written = manifest_mod.load(tmp_path / "whole")["splits"]
    groups = {s["name"].rpartition("-")[0] for e in written.values() for s in e["shards"]}
    assert set(state["groups"]) == groups

    (out / "notes.txt").write_text("mine")
    assert run("imagenet", src, out, *args) == 2  # resumes only a folder of its own
    assert "notes.txt" in capsys.readouterr().err
    (out / "notes.txt").unlink()
    assert run("imagenet", src, out, *args) == 0
    assert files(out) == files(tmp_path / "whole")


def test_an_unfinished_run_of_other_arguments_needs_force(synthetic, tmp_path, monkeypatch, capsys):
    src = synthetic / "imagenet"
    out = tmp_path / "out"
    fail_at_close(monkeypatch, 2)
    with pytest.raises(OSError):
        run("imagenet", src, out, "--shard-size", "20KB")
    monkeypatch.undo()
    before = files(out)
    assert run("imagenet", src, out, "--shard-size", "40KB") == 2
    assert "--force" in capsys.readouterr().err and files(out) == before
    assert run("imagenet", src, out, "--shard-size", "40KB", "--force") == 0
    assert not list(out.glob(".*.tmp")) and not (out / pack.STATE).exists()
    assert run_cli(main, ["verify", str(out)]) == 0


def test_file_names_that_are_not_utf8_get_keys_too(synthetic, tmp_path):
    """Latin-1 names (caf\\xe9, caf\\xe8: one key after replacing) pack under two keys, no
    traceback; the second gets the suffix of its path's bytes."""
    src = tmp_path / "imagenet"
    shutil.copytree(synthetic / "imagenet", src)
    folder = src / "ILSVRC" / "Data" / "CLS-LOC" / "train" / WNID
    image = next(folder.iterdir()).read_bytes()
    for name in (b"caf\xe9.JPEG", b"caf\xe8.JPEG"):
        with open(os.path.join(os.fsencode(folder), name), "wb") as fh:
            fh.write(image)
    out = tmp_path / "out"
    assert run("imagenet", src, out) == 0
    keys = [k for k in samples(out) if k.startswith("caf_")]
    assert len(keys) == 2 and "caf_" in keys and all(tar.key_problem(k) is None for k in keys)
