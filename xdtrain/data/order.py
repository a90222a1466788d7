"""Which samples each rank reads in an epoch, and in what order, for both backends.

Shards are shuffled once at pack time, and a reader's shuffle buffer (about a thousand
samples) only mixes neighbours. Read in the same order every epoch, a sample would keep its
place (r = 0.97 between two epochs' positions) and meet the same batch-mates again and
again, so SimCLR would see nearly the same negatives each epoch. So for training, every
epoch, seeded by (seed, epoch):

1. each shard is cut into *runs* of about :data:`RUN` consecutive samples, starting at a
   random offset (the run that crosses the shard's end wraps to its start);
2. the runs of all shards are shuffled together;
3. rank ``r`` of ``w`` takes samples ``[n·r/w, n·(r+1)/w)`` of that order (DALI's own
   ``shard_id``/``num_shards`` split, applied to the shuffled order).

Reads stay sequential inside a run, so the I/O pattern is the one of shard reading, while the
order mixes across all shards; the reader's buffer then shuffles within about a thousand
samples. Evaluation reads every shard whole, in stored order, split by rank the same way.
The order depends on nothing but (seed, epoch, rank, world size), so a resumed run reads
exactly what an uninterrupted one read, whatever ``data.workers`` is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from xdtrain.rng import rng_for

RUN = 64  # samples per run, at least
MAX_RUNS = 8192  # per rank and epoch: longer runs on larger data sets (index files, handles)


@dataclass(frozen=True)
class Piece:
    """Samples ``positions`` (index lines, in reading order) of shard number ``shard``."""

    shard: int
    positions: tuple[int, ...]


def run_length(samples: int, world_size: int = 1) -> int:
    """Samples per run for a split of ``samples`` read by ``world_size`` ranks."""
    return max(RUN, math.ceil(samples / world_size / MAX_RUNS))


def epoch_order(
    counts: list[int], *, seed: int, epoch: int, train: bool, world_size: int = 1
) -> list[Piece]:
    """The whole split's reading order for ``epoch``: shards cut into runs, runs shuffled
    (``train``), or every shard whole in stored order (evaluation). ``counts[i]``: samples
    of shard ``i``."""
    if not train:
        return [Piece(i, tuple(range(n))) for i, n in enumerate(counts) if n]
    length = run_length(sum(counts), world_size)
    rng = rng_for(seed, "epoch-order", epoch)
    runs = []
    for shard, n in enumerate(counts):
        if n == 0:
            continue
        start = int(rng.integers(n))
        rotated = [(start + i) % n for i in range(n)]
        runs += [Piece(shard, tuple(rotated[a : a + length])) for a in range(0, n, length)]
    return [runs[i] for i in rng.permutation(len(runs)).tolist()]


def rank_pieces(order: list[Piece], rank: int, world_size: int) -> list[Piece]:
    """Rank ``rank``'s part of ``order``: samples ``[n·r/w, n·(r+1)/w)``, runs cut there."""
    total = sum(len(p.positions) for p in order)
    lo, hi = total * rank // world_size, total * (rank + 1) // world_size
    out, at = [], 0
    for piece in order:
        n = len(piece.positions)
        a, b = max(lo, at), min(hi, at + n)
        if a < b:
            out.append(Piece(piece.shard, piece.positions[a - at : b - at]))
        at += n
        if at >= hi:
            break
    return out


def reader_pieces(reader, epoch: int) -> list[Piece]:
    """Rank ``reader.rank``'s pieces of ``epoch``: :func:`epoch_order` cut by
    :func:`rank_pieces` (of the shard set's sample, when it is one), for a loader (anything
    with ``shardset``, ``seed``, ``train``, ``rank`` and ``world_size``)."""
    order = epoch_order(
        list(reader.shardset.counts),
        seed=reader.seed,
        epoch=epoch,
        train=reader.train,
        world_size=reader.world_size,
    )
    pieces = rank_pieces(order, reader.rank, reader.world_size)
    chosen = reader.shardset.positions  # a sample of the split: positions among its lines
    if chosen is None:
        return pieces
    return [Piece(p.shard, tuple(chosen[p.shard][i] for i in p.positions)) for p in pieces]
