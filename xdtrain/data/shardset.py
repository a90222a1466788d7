"""Which shard files a split reads and what their samples hold, from ``manifest.json``.

The pipelines never guess a layout: the manifest written by ``xd-shard`` says which files
belong to a split and fraction, how many samples they hold, the image codec and bit depth,
and the class names. :func:`layout_of` says which components a pipeline reads (each packer
declares its own; a user's own data set's depends on how it was packed).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xdtrain.errors import UserError
from xdtrain.rng import rng_for
from xdtrain.shards import PACKERS
from xdtrain.shards import manifest as manifests
from xdtrain.shards.base import Layout
from xdtrain.shards.tar import SampleRef, index_path, parse_index

# Each packer says how its samples are read (``xdtrain/shards/<name>.py``, ``layout``); the
# packers of a user's own data have none fixed (``layout_of(manifest)`` instead).
LAYOUTS: dict[str, Layout] = {
    name: packer.layout for name, packer in PACKERS.items() if hasattr(packer, "layout")
}


def layout_of(dataset: str, manifest: dict) -> Layout:
    """How the samples of a shard folder of ``dataset`` with this manifest are read."""
    packer = PACKERS[dataset]
    return packer.layout_of(manifest) if hasattr(packer, "layout_of") else packer.layout


@dataclass(frozen=True)
class ShardSet:
    """The files of one split (and training fraction) of a shard folder."""

    folder: Path
    dataset: str
    split: str
    layout: Layout
    paths: tuple[str, ...]
    index_paths: tuple[str, ...]
    counts: tuple[int, ...]  # samples of each shard, as the manifest records them
    samples: int
    classes: tuple[str, ...]
    image_ext: str
    bits: int
    # a sample of the split (:func:`sample_of`): the index lines of each shard that are read;
    # ``counts`` then counts those. None: every sample.
    positions: tuple[tuple[int, ...], ...] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def sample_refs(self, shard: int) -> list[SampleRef]:
        """Where each sample of shard number ``shard`` lies in its tar file, in order."""
        return parse_index(Path(self.index_paths[shard]).read_text())


def open_split(folder: str | Path, dataset: str, split: str, fraction: float = 1.0) -> ShardSet:
    """Resolve ``split`` of the shard folder ``folder``; one-line errors for every mismatch."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            f"{folder}: no shard folder; run `xd-shard --dataset {dataset} --out {folder}` "
            "or set data.shards"
        )
    manifest = manifests.load(folder)
    if manifest["dataset"] != dataset:
        raise UserError(
            f"{folder}/manifest.json: holds {manifest['dataset']!r} shards, but the config "
            f"asks for data.dataset {dataset!r}; fix data.shards or data.dataset"
        )
    if split not in manifest["splits"]:
        have = ", ".join(manifest["splits"]) or "none"
        raise UserError(f"{folder}/manifest.json: no {split!r} split (have {have})")
    if split == "train" and fraction < 1.0:
        offered = sorted(manifest["fractions"].values())
        if not any(abs(f - fraction) < 1e-9 for f in offered):
            raise UserError(
                f"{folder}/manifest.json: data.fraction {fraction} was not packed "
                f"(fractions {offered} and 1.0); repack with --fractions or pick one of those"
            )
    _check_whole_volumes(folder, manifest, dataset, split)
    names = manifests.shards(manifest, split, fraction)
    recorded = {s["name"]: s for s in manifest["splits"][split]["shards"]}
    counts = {name: entry["samples"] for name, entry in recorded.items()}
    paths = tuple(str(folder / name) for name in names)
    for name, path in zip(names, paths, strict=True):
        problem = _shard_problem(Path(path), recorded[name])
        if problem:
            raise UserError(f"{path}: {problem}; run `xd-shard verify {folder}`")
    layout = layout_of(dataset, manifest)
    options = manifest.get("options", {})
    image_ext = layout.image if layout.image != "codec" else options.get("codec", "jpg")
    return ShardSet(
        folder=folder,
        dataset=dataset,
        split=split,
        layout=layout,
        paths=paths,
        index_paths=tuple(str(index_path(p)) for p in paths),
        counts=tuple(counts[n] for n in names),
        samples=sum(counts[n] for n in names),
        classes=tuple(manifest["classes"]),
        image_ext=image_ext,
        bits=int(options.get("bits", 8)),
    )


def sample_of(shardset: ShardSet, count: int, seed: int) -> ShardSet:
    """A fixed, seeded sample of ``count`` samples of ``shardset`` (all of them when it holds
    no more): positions drawn without replacement from ``(seed, "sample", split)``, read in
    stored order. The same folder, count and seed always give the same samples, whatever the
    number of ranks or threads that read them."""
    if count < 1:
        raise ValueError(f"a sample needs at least one sample, not {count}")
    if shardset.positions is not None:
        raise ValueError("sample_of takes a whole split, not a sample of one")
    total = shardset.samples
    if count >= total:
        return shardset
    rng = rng_for(seed, "sample", shardset.split)
    chosen = np.sort(rng.choice(total, size=count, replace=False))
    starts = np.cumsum((0, *shardset.counts))
    positions = tuple(
        tuple(int(p - a) for p in chosen[(chosen >= a) & (chosen < b)])
        for a, b in zip(starts[:-1], starts[1:], strict=True)
    )
    return dataclasses.replace(
        shardset, positions=positions, counts=tuple(map(len, positions)), samples=count
    )


def _shard_problem(path: Path, recorded: dict) -> str | None:
    """What is wrong with a shard that a stat and its index's first line can tell: missing
    files, a size other than the manifest's (cut short, or replaced), an index whose header
    counts other samples. (Damage of the same size needs ``xd-shard verify``'s sha256.)"""
    try:
        size = path.stat().st_size
        with open(index_path(path), "rb") as fh:
            header = fh.readline(64).split()
    except OSError:
        return "shard or its .idx is missing or unreadable"
    if "bytes" in recorded and size != recorded["bytes"]:
        return f"{size} bytes, not the {recorded['bytes']} the manifest records (cut short?)"
    if len(header) != 2 or header[1] != str(recorded["samples"]).encode():
        return f"its .idx does not index the {recorded['samples']} samples the manifest records"
    return None


def _check_whole_volumes(folder: Path, manifest: dict, dataset: str, split: str) -> None:
    """Refuse to score val/test splits whose slices were selected by label or content
    (written before ``--slices`` applied to the training split only)."""
    if split == "train" or not PACKERS[dataset].volumetric:
        return
    slices = manifest.get("options", {}).get("slices", "all")
    if slices != "all" and "slice_selection" not in manifest.get("preprocessing", {}):
        raise UserError(
            f"{folder}/manifest.json: its {split} split keeps only --slices {slices} slices, so "
            "the ground truth decided what is scored; repack with this xd-shard (--force), "
            "which keeps every val/test slice"
        )


def rank_range(samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """Samples ``[start, stop)`` that ``rank`` reads: DALI's ``shard_id``/``num_shards`` split."""
    return samples * rank // world_size, samples * (rank + 1) // world_size


def rank_batches(shardset: ShardSet, batch_size: int, rank: int, world_size: int, train: bool):
    """``(samples, batches)`` that ``rank`` reads of ``shardset`` in one epoch.

    Training: every rank yields the full batches of the smallest rank (DDP steps in lockstep);
    too few samples for one is a :class:`UserError` whose advice fits (a smaller batch, or
    fewer ranks when one sample per rank is already too many). Evaluation: every sample once,
    the last batch partial; a rank whose share is empty (a split smaller than the number of
    ranks) reads no batch and still takes part in the metrics' reductions.
    """
    start, stop = rank_range(shardset.samples, rank, world_size)
    if shardset.samples == 0:
        raise UserError(f"{shardset.folder}: the {shardset.split} split holds no sample")
    if not train:
        return stop - start, math.ceil((stop - start) / batch_size)
    per_rank = shardset.samples // world_size
    if per_rank < batch_size:
        advice = batch_advice(shardset.samples, world_size)
        raise UserError(
            f"{shardset.folder}: the {shardset.split} split has {shardset.samples} samples, "
            f"fewer than one batch of {batch_size} per rank ({world_size} ranks); {advice}"
        )
    return stop - start, per_rank // batch_size


def batch_advice(samples: int, world_size: int, smallest: int = 1) -> str:
    """What fits ``samples`` training samples into one full batch per rank: a smaller
    ``data.batch_size`` (at least ``smallest``, e.g. 2 for SimCLR), else fewer ranks."""
    per_rank = samples // world_size
    if per_rank >= smallest:
        return f"set data.batch_size={per_rank} or less"
    most = samples // smallest
    if most >= 1:
        return f"run on at most {most} rank(s) (torchrun --nproc_per_node)"
    return "repack with more data"
