"""Which shard files a split reads and what their samples hold, from ``manifest.json``.

The pipelines never guess a layout: the manifest written by ``xd-shard`` says which files
belong to a split and fraction, how many samples they hold, the image codec and bit depth,
and the class names. :data:`LAYOUTS` says, per data set, which components a pipeline reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from xdtrain.errors import UserError
from xdtrain.shards import manifest as manifests
from xdtrain.shards.tar import index_path


@dataclass(frozen=True)
class Layout:
    """How one data set's samples are read: components, label type, stored channels."""

    kind: Literal["multiclass", "multilabel", "segmentation"]
    image: str  # component holding the encoded image ("jpg", "img.png"; "codec" from options)
    stored_channels: int  # channels as stored: 3 RGB, 1 greyscale, 4 MRI modalities
    label: str  # fixed-size little-endian binary component read without Python
    label_dtype: str  # numpy dtype name of one element of ``label``
    label_size: int  # elements per sample
    mask: str | None = None

    @property
    def greyscale(self) -> bool:
        """Medical images: brightness/contrast only, never hue, saturation or greyscale."""
        return self.stored_channels != 3


LAYOUTS = {
    "imagenet": Layout("multiclass", "jpg", 3, "label.i64", "int64", 1),
    "chestxray8": Layout("multilabel", "codec", 1, "labels.u8", "uint8", 15),
    "brats": Layout("segmentation", "img.png", 4, "pos.i32", "int32", 3, mask="mask.png"),
    "lits": Layout("segmentation", "img.png", 1, "pos.i32", "int32", 3, mask="mask.png"),
}


@dataclass(frozen=True)
class ShardSet:
    """The files of one split (and training fraction) of a shard folder."""

    folder: Path
    dataset: str
    split: str
    layout: Layout
    paths: tuple[str, ...]
    index_paths: tuple[str, ...]
    samples: int
    classes: tuple[str, ...]
    image_ext: str
    bits: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)


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
    names = manifests.shards(manifest, split, fraction)
    counts = {s["name"]: s["samples"] for s in manifest["splits"][split]["shards"]}
    paths = tuple(str(folder / name) for name in names)
    for path in paths:
        if not Path(path).is_file() or not index_path(path).is_file():
            raise UserError(f"{path}: shard or its .idx is missing; run `xd-shard verify {folder}`")
    layout = LAYOUTS[dataset]
    options = manifest.get("options", {})
    image_ext = layout.image if layout.image != "codec" else options.get("codec", "jpg")
    return ShardSet(
        folder=folder,
        dataset=dataset,
        split=split,
        layout=layout,
        paths=paths,
        index_paths=tuple(str(index_path(p)) for p in paths),
        samples=sum(counts[n] for n in names),
        classes=tuple(manifest["classes"]),
        image_ext=image_ext,
        bits=int(options.get("bits", 8)),
    )


def rank_range(samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """Samples ``[start, stop)`` that ``rank`` reads: DALI's ``shard_id``/``num_shards`` split."""
    return samples * rank // world_size, samples * (rank + 1) // world_size
