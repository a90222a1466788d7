"""``rank_range`` says which samples a rank reads; DALI's reader is asked, not a formula.

Small shards whose samples hold their own position in the split are read by
``fn.readers.webdataset`` with ``shard_id``/``num_shards``, one epoch per ``shard_id``, for
several shard layouts and world sizes (even and uneven splits), and what DALI gave each
``shard_id`` must be exactly the range ``rank_range`` names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xdtrain.data.shardset import rank_range
from xdtrain.shards.tar import ShardWriter, index_path

# samples per shard file, in the order a split lists its files
LAYOUTS = [[10], [3, 5, 2], [1, 1, 1, 4], [7, 6], [4, 4, 4]]


def write_shards(folder: Path, counts: list[int]) -> list[str]:
    """Shards holding ``counts`` samples each; sample ``i`` of the split stores ``i``."""
    paths, position = [], 0
    for number, count in enumerate(counts):
        path = folder / f"train-{number:06d}.tar"
        writer = ShardWriter(path, fsync=False)
        for _ in range(count):
            writer.add(f"s{position:05d}", {"pos.i32": np.int32(position).tobytes()})
            position += 1
        writer.close()
        paths.append(str(path))
    return paths


def dali_read(paths: list[str], shard_id: int, num_shards: int, pad: bool, reads: int):
    """Positions of ``reads`` consecutive samples DALI gives ``shard_id``, and its metadata."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        return fn.readers.webdataset(
            paths=paths,
            index_paths=[str(index_path(p)) for p in paths],
            ext=["pos.i32"],
            dtypes=[types.INT32],
            shard_id=shard_id,
            num_shards=num_shards,
            random_shuffle=False,
            stick_to_shard=True,
            pad_last_batch=pad,
            missing_component_behavior="error",
            name="reader",
        )

    pipeline = pipe()
    pipeline.build()
    got = [int(np.array(pipeline.run()[0].at(0)).reshape(-1)[0]) for _ in range(reads)]
    return got, pipeline.reader_meta("reader")


def dali_epoch(paths: list[str], total: int, shard_id: int, num_shards: int) -> list[int]:
    """The samples of one epoch of ``shard_id``: the reader sticks to its shard, so what it
    reads repeats with the shard's length as period; read past it to find the period."""
    got, meta = dali_read(paths, shard_id, num_shards, pad=False, reads=2 * total + 1)
    assert meta["epoch_size"] == total
    period = got.index(got[0], 1)
    epoch = got[:period]
    assert len(set(epoch)) == len(epoch), got
    assert got == (epoch * (len(got) // period + 1))[: len(got)], got  # the same epoch again
    return epoch


CASES = [
    (counts, world)
    for counts in LAYOUTS
    for world in (1, 2, 3, 4, 5, sum(counts))
    if world <= sum(counts)  # DALI refuses fewer samples than shards
]


@pytest.mark.parametrize(("counts", "world"), CASES, ids=[f"{c}-w{w}" for c, w in CASES])
def test_rank_range_is_what_dali_gives_each_shard_id(tmp_path, counts, world):
    paths = write_shards(tmp_path, counts)
    total = sum(counts)
    seen = []
    for rank in range(world):
        start, stop = rank_range(total, rank, world)
        epoch = dali_epoch(paths, total, rank, world)
        assert epoch == list(range(start, stop)), (rank, epoch, (start, stop))
        seen += epoch
    assert seen == list(range(total))  # together the ranks read every sample once


@pytest.mark.parametrize("world", [3, 4])
def test_padded_reader_repeats_only_the_last_sample_of_the_rank_range(tmp_path, world):
    """The loader's own reader setting (``pad_last_batch``): each ``shard_id`` is padded to the
    longest shard's length with its last sample, so ``rank_range`` still tells the real ones."""
    counts = [3, 5, 2]
    paths = write_shards(tmp_path, counts)
    total = sum(counts)
    longest = max(b - a for a, b in (rank_range(total, r, world) for r in range(world)))
    for rank in range(world):
        start, stop = rank_range(total, rank, world)
        got, meta = dali_read(paths, rank, world, pad=True, reads=longest)
        assert meta["epoch_size_padded"] == longest * world
        assert got == [*range(start, stop)] + [stop - 1] * (longest - (stop - start)), rank
