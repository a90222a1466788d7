#!/usr/bin/env python3
"""How much one training epoch's sample order resembles the next's; prints JSON.

Writes ``--samples`` tiny classification samples into shards of ``--per-shard`` samples
(the layout ``xd-shard`` writes for ImageNet, shuffled at pack time), reads two training
epochs through ``xdtrain.data.build_loader`` (DALI, preset ``none``) and reports:

* ``position_r``: Pearson's r between each sample's position in epoch 0 and in epoch 1
  (0 for independent orders, 1 for the same order);
* ``cobatch_repeat``: of the pairs of samples that share a batch in epoch 0, the share that
  share one again in epoch 1; ``cobatch_random`` is its value for independent uniform
  orders, ``(batch - 1) / (samples - 1)``. SimCLR draws its negatives from the batch, so a
  high repeat rate means the same negatives every epoch.

Example (the figures of docs/pipelines.md)::

    python tools/bench_epoch_order.py --samples 20000 --per-shard 2000 --batch 64
"""

from __future__ import annotations

import argparse
import json
import tempfile
from itertools import combinations
from pathlib import Path

import numpy as np


def write_shards(folder: Path, samples: int, per_shard: int, seed: int) -> None:
    """``samples`` 8x8 JPEGs in shards of ``per_shard``, keys in a seeded random order."""
    import cv2

    from xdtrain.shards import manifest as manifests
    from xdtrain.shards.tar import ShardWriter

    rng = np.random.default_rng(seed)
    ok, jpeg = cv2.imencode(".jpg", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    assert ok
    order = rng.permutation(samples)
    shards = []
    for number, start in enumerate(range(0, samples, per_shard)):
        writer = ShardWriter(folder / f"train-p100-{number:06d}.tar", fsync=False)
        for i in order[start : start + per_shard].tolist():
            parts = {"jpg": jpeg.tobytes(), "label.i64": np.array([i % 10], "<i8").tobytes()}
            writer.add(f"s{i:07d}", parts)
        info = writer.close()
        shards.append({"name": info.name, "samples": info.samples, "tier": "p100"})
    manifest = {
        "format": manifests.FORMAT,
        "dataset": "imagenet",
        "fractions": {},
        "options": {},
        "classes": [str(c) for c in range(10)],
        "splits": {"train": {"samples": samples, "shards": shards}},
    }
    (folder / manifests.NAME).write_text(json.dumps(manifest))


def epoch_orders(folder: Path, batch: int, epochs: int, seed: int) -> list[list[list[str]]]:
    """Keys of every batch of ``epochs`` training epochs: ``[epoch][batch][sample]``."""
    from xdtrain.config import DataConfig
    from xdtrain.data import build_loader

    config = DataConfig(
        dataset="imagenet",
        shards=str(folder),
        augment="none",
        image_size=32,
        channels=3,
        batch_size=batch,
        workers=2,
        device="cpu",
    )
    loader = build_loader(config, "train", seed=seed)
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        out.append([list(b["keys"]) for b in loader])
    return out


def order_figures(first: list[list[str]], second: list[list[str]]) -> dict:
    """``position_r`` and ``cobatch_repeat`` of two epochs (see the module docstring)."""
    flat_a = [k for b in first for k in b]
    flat_b = {k: i for i, k in enumerate(k for b in second for k in b)}
    common = [k for k in flat_a if k in flat_b]
    pos_a = np.array([i for i, k in enumerate(flat_a) if k in flat_b], dtype=float)
    pos_b = np.array([flat_b[k] for k in common], dtype=float)
    batch_of = {k: n for n, b in enumerate(second) for k in b}
    pairs = again = 0
    for b in first:
        for x, y in combinations([k for k in b if k in batch_of], 2):
            pairs += 1
            again += batch_of[x] == batch_of[y]
    size = max(len(b) for b in first)
    return {
        "position_r": float(np.corrcoef(pos_a, pos_b)[0, 1]),
        "cobatch_repeat": again / max(pairs, 1),
        "cobatch_random": (size - 1) / max(len(flat_a) - 1, 1),
        "pairs": pairs,
        "samples": len(flat_a),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--per-shard", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="xd-order-") as tmp:
        folder = Path(tmp)
        write_shards(folder, args.samples, args.per_shard, args.seed)
        first, second = epoch_orders(folder, args.batch, 2, args.seed)
    result = {
        "samples": args.samples,
        "per_shard": args.per_shard,
        "batch": args.batch,
        **order_figures(first, second),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
