"""The pieces under xd-shard: tar writing, indexes, splits, fractions, sizes, bounded maps."""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from xdtrain.errors import UserError
from xdtrain.shards import tar as tar_module
from xdtrain.shards.base import decode_png, int_bytes, json_bytes, png_bytes, quantise
from xdtrain.shards.manifest import index_from_tar
from xdtrain.shards.pack import ordered_map, shard_size
from xdtrain.shards.splits import (
    assign_splits,
    fraction_tiers,
    parse_fractions,
    parse_ratios,
    tier_name,
)
from xdtrain.shards.tar import (
    ShardWriter,
    _tarfile_header,
    check_key,
    index_path,
    member_header,
    parse_index,
    read_samples,
)

SAMPLES = [
    ("a_000", {"jpg": b"\xff\xd8" + b"x" * 1000, "cls": b"3"}),
    ("b_001", {"jpg": b"y" * 512, "cls": b"12"}),
    ("c_002", {"mask.png": b"", "json": b"{}"}),
]


def write(path, samples=SAMPLES):
    writer = ShardWriter(path)
    for key, parts in samples:
        writer.add(key, parts)
    return writer.close()


@pytest.mark.parametrize("name", ["a.jpg", "n01440764_10026.label.i64", "x" * 99, "y" * 150])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 123456789, 8**11 - 1, 8**11])
def test_member_header_is_what_tarfile_writes(name, size):
    assert member_header(name, size) == _tarfile_header(name, size)


def test_shard_is_gnu_tar_aligned_indexed_and_reproducible(tmp_path):
    info = write(tmp_path / "a.tar")
    again = write(tmp_path / "b.tar")
    assert (info.samples, info.bytes, info.sha256) == (3, again.bytes, again.sha256)
    data = (tmp_path / "a.tar").read_bytes()
    assert len(data) == info.bytes and len(data) % (20 * 512) == 0
    listing = subprocess.run(
        ["tar", "tf", str(tmp_path / "a.tar")], capture_output=True, text=True, check=True
    ).stdout.split()
    assert listing == [
        "a_000.jpg",
        "a_000.cls",
        "b_001.jpg",
        "b_001.cls",
        "c_002.mask.png",
        "c_002.json",
    ]
    assert read_samples(tmp_path / "a.tar") == SAMPLES
    index = index_path(tmp_path / "a.tar").read_text()
    assert index == index_from_tar(tmp_path / "a.tar")
    assert index.splitlines()[0] == "v1.2 3"
    with tarfile.open(tmp_path / "a.tar") as tar:
        for member in tar:
            assert member.mtime == 0 and member.uid == 0 and member.mode == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.idx", "a.tar", "b.idx", "b.tar"]


def test_long_member_names_keep_the_index_and_the_size_right(tmp_path):
    """A member name of 100 bytes or more takes tarfile's GNU long-name header (1,536 bytes,
    not 512): the index offsets, the shard's size and its sha256 follow what was written."""
    path = tmp_path / "long.tar"
    keys = ["short", "k" * 91, "m" * 150, "after"]  # 91 + ".label.i64": 101 bytes
    writer = ShardWriter(path)
    for n, key in enumerate(keys):
        writer.add(key, {"jpg": bytes([n]) * (300 + n), "label.i64": bytes(8)})
    info = writer.close()
    data = path.read_bytes()
    assert info.bytes == len(data) and info.sha256 == hashlib.sha256(data).hexdigest()
    with tarfile.open(path) as tar:
        members = {m.name: (m.offset_data, m.size) for m in tar}
    for ref in parse_index(index_path(path).read_text()):
        for ext, offset, size in ref.parts:
            assert members[f"{ref.key}.{ext}"] == (offset, size)
            assert data[offset : offset + size] == tar_bytes(ref.key, ext, keys)
    assert index_path(path).read_text() == index_from_tar(path)


def tar_bytes(key: str, ext: str, keys: list[str]) -> bytes:
    n = keys.index(key)
    return bytes([n]) * (300 + n) if ext == "jpg" else bytes(8)


def test_abort_and_unfinished_shards_leave_nothing_that_looks_complete(tmp_path):
    writer = ShardWriter(tmp_path / "x.tar")
    writer.add("k", {"jpg": b"1"})
    assert not (tmp_path / "x.tar").exists()
    assert [p.name for p in tmp_path.iterdir()] == [".x.tar.tmp"]
    writer.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key", ["", "a.b", "a/b", "a b"])
def test_bad_keys_are_refused(key):
    with pytest.raises(ValueError):
        check_key(key)


@pytest.mark.parametrize("fsync", [True, False])
def test_large_shards_flush_in_chunks(tmp_path, monkeypatch, fsync):
    writes, started = [], []
    real_writev = os.writev

    def recording_writev(fd, parts):
        writes.append((len(parts), sum(map(len, parts))))
        return real_writev(fd, parts)

    monkeypatch.setattr(os, "writev", recording_writev)
    monkeypatch.setattr(tar_module, "start_writeback", lambda fd, o, n: started.append((o, n)))
    big = [(f"s{i:03d}", {"bin": bytes([i % 256]) * 300_000}) for i in range(30)]
    big.append(("huge", {"bin": bytes(range(256)) * 20_000, "cls": b"1"}))  # a 5 MB component
    big += [(f"t{i:04d}", {"cls": b"2", "json": b"{}"}) for i in range(1500)]  # 9,000 parts
    writer = ShardWriter(tmp_path / "big.tar", fsync=fsync)
    for key, parts in big:
        writer.add(key, parts)
    info = writer.close()
    data = (tmp_path / "big.tar").read_bytes()
    assert read_samples(tmp_path / "big.tar") == big and info.bytes == len(data) > 14_000_000
    assert info.sha256 == hashlib.sha256(data).hexdigest()  # hashed by reading it back
    # no write of 2 MiB or more (see CHUNK), none over IOV_MAX buffers, and not many more
    # writes than that allows
    assert max(size for _, size in writes) < 2 << 20
    assert max(count for count, _ in writes) <= 1000
    assert len(writes) <= len(data) // (1 << 20) + 6 + 9_000 // 1000
    if fsync:  # write-back was started for every byte, in order
        ends = itertools.accumulate((n for _, n in started), initial=0)
        assert [o for o, _ in started] + [len(data)] == list(ends)
    else:
        assert started == []


def test_short_writes_are_completed(tmp_path, monkeypatch):
    real_writev = os.writev

    def short_writev(fd, parts):  # what a signal or a nearly full pipe can cause
        return os.write(fd, b"".join(parts)[:700]) if sum(map(len, parts)) > 700 else 0

    monkeypatch.setattr(os, "writev", short_writev)
    info = write(tmp_path / "short.tar")
    monkeypatch.setattr(os, "writev", real_writev)
    expected = write(tmp_path / "whole.tar")
    assert (tmp_path / "short.tar").read_bytes() == (tmp_path / "whole.tar").read_bytes()
    assert info.sha256 == expected.sha256


def test_component_helpers():
    assert int_bytes([1, -2], np.int32) == np.array([1, -2], "<i4").tobytes()
    assert json_bytes({"b": 1, "a": [2]}) == b'{"a":[2],"b":1}'
    assert quantise(np.array([-1.0, 0.0, 0.5, 1.0, 2.0]), 8).tolist() == [0, 0, 128, 255, 255]
    assert quantise(np.array([1.0]), 16).dtype == np.uint16
    rgba = np.arange(4 * 5 * 4, dtype=np.uint16).reshape(4, 5, 4) * 100
    assert np.array_equal(decode_png(png_bytes(rgba)), rgba)  # channel order kept
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5)
    assert np.array_equal(decode_png(png_bytes(grey)), grey)
    with pytest.raises(ValueError):
        decode_png(b"nope")


def test_parse_ratios_and_fractions():
    assert parse_ratios("0.7,0.1,0.2") == {"train": 0.7, "val": 0.1, "test": 0.2}
    for bad in ("0.7,0.2", "0.5,0.5,0.5", "-0.1,0.6,0.5", "a,b,c"):
        with pytest.raises(UserError):
            parse_ratios(bad)
    assert parse_fractions("0.01,0.5,0.1") == (0.5, 0.1, 0.01)
    for bad in ("0.005", "1.0", "0", "x"):
        with pytest.raises(UserError):
            parse_fractions(bad)
    assert [tier_name(f) for f in (0.01, 0.1, 0.5, 1.0)] == ["p001", "p010", "p050", "p100"]


def test_assign_splits_follows_ratios_per_stratum_and_is_seeded():
    groups = {f"p{i:03d}": ("sick" if i % 3 == 0 else "well") for i in range(300)}
    ratios = {"train": 0.7, "val": 0.1, "test": 0.2}
    split = assign_splits(groups, ratios, seed=0)
    assert split == assign_splits(dict(reversed(groups.items())), ratios, seed=0)
    assert split != assign_splits(groups, ratios, seed=1)
    for stratum in ("sick", "well"):
        members = [g for g, s in groups.items() if s == stratum]
        counts = Counter(split[g] for g in members)
        for name, share in ratios.items():
            assert abs(counts[name] / len(members) - share) < 0.02


def test_assign_splits_counts_samples_and_fills_every_split():
    weights = {"big": 100, **{f"s{i}": 1 for i in range(10)}}
    split = assign_splits(
        dict.fromkeys(weights, ""), {"train": 0.5, "val": 0.5, "test": 0.0}, seed=0, weights=weights
    )
    assert "test" not in split.values()
    assert {split[g] for g in weights} == {"train", "val"}
    tiny = assign_splits({"a": "", "b": "", "c": ""}, {"train": 0.8, "val": 0.1, "test": 0.1}, 0)
    assert sorted(tiny.values()) == ["test", "train", "val"]


def test_fraction_tiers_are_nested_and_sized():
    groups = [f"p{i:03d}" for i in range(200)]
    tiers = fraction_tiers(groups, (0.5, 0.1, 0.01), seed=0)
    counts = Counter(tiers.values())
    assert counts == {0.01: 2, 0.1: 18, 0.5: 80, 1.0: 100}
    assert tiers == fraction_tiers(list(reversed(groups)), (0.5, 0.1, 0.01), seed=0)
    assert fraction_tiers(["only"], (0.5, 0.01), 0) == {"only": 0.01}


def test_shard_size_units():
    assert shard_size("256MB") == 256_000_000
    assert shard_size("64KiB") == 65536
    assert shard_size("1.5 GiB") == int(1.5 * 2**30)
    assert shard_size("4096") == 4096
    for bad in ("lots", "12XB", "100"):
        with pytest.raises(UserError):
            shard_size(bad)


def test_ordered_map_keeps_order_with_bounded_work_in_flight():
    started = []

    def slow_square(x):
        started.append(x)
        return x * x

    items = iter(range(100))
    with ThreadPoolExecutor(4) as pool:
        results = ordered_map(slow_square, items, pool, window=2, batch=3)
        first = next(results)
        assert first == 0 and len(started) <= 2 * 3 + 3
        assert [first, *results] == [x * x for x in range(100)]
    assert list(ordered_map(slow_square, [1, 2], None, window=1)) == [1, 4]


def test_file_sha256_reads_the_whole_file(tmp_path):
    from xdtrain.shards.tar import file_sha256

    data = bytes(range(256)) * 5000  # more than one 1 MiB block
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()
