"""The contract between the packing driver and the one module each data set has.

A packer *scans* a raw data set without decoding it (which inputs exist, their labels and
patients, what is malformed) and *encodes* one source into finished samples. The driver does
everything else: splits, shuffling, shards, workers, resume and the manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from PIL import UnidentifiedImageError

from xdtrain.errors import UserError
from xdtrain.shards.tar import KEY_CHARACTERS


@dataclass(slots=True)
class Source:
    """One input: an image (one sample) or a volume (one sample per kept slice)."""

    key: str  # unique, without dots: becomes the sample key or its prefix
    group: str  # the split unit: patient, case, volume; the key itself where there is none
    # What encode needs: a dict with "input" (the path shown in messages), or, where millions
    # of sources must stay small, any object with describe(key) -> that path.
    params: Any = field(default_factory=dict)
    split: str | None = None  # fixed by the release (e.g. ChestX-ray8's test list), else assigned
    stratum: str = ""  # splits are balanced per stratum (class, grade, ...)
    tier: float = 1.0  # training sources: the smallest data fraction holding their group

    def describe(self) -> str:
        """The input's path (relative to --src) for messages and the manifest."""
        if isinstance(self.params, dict):
            return self.params.get("input", self.key)
        return self.params.describe(self.key)


@dataclass
class Sample:
    """One finished WebDataset sample."""

    key: str
    parts: dict[str, bytes]  # extension -> bytes, in tar order
    labels: tuple[int, ...] = ()  # classes present, counted per split in the manifest
    note: dict[str, str] | None = None  # e.g. a conversion the manifest lists


@dataclass
class Scan:
    """What a packer found in ``--src`` before any decoding."""

    sources: list[Source]
    classes: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"input", "reason"}
    notes: list[dict[str, str]] = field(default_factory=list)  # release quirks handled
    info: dict[str, Any] = field(default_factory=dict)  # preprocessing, for the manifest
    # for data sets whose headers hold identifiers: removes them from paths written (the
    # manifest's source and options), and refuses an --out named after a patient
    scrub: Any = None


# What Pillow raises for an unreadable, truncated or malformed image file.
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError)


class SkipItem(Exception):
    """A malformed input that is skipped (and listed) rather than stopping the run."""


@dataclass(frozen=True)
class Layout:
    """How one data set's samples are read back: components, label type, stored channels.

    Declared by each packer next to what it writes; the loaders read shards by it.
    """

    kind: Literal["multiclass", "multilabel", "segmentation"]
    image: str  # component holding the encoded image ("jpg", "img.png"; "codec" from options)
    stored_channels: int  # channels as stored: 3 RGB, 1 greyscale, 4 MRI modalities
    label: str  # fixed-size little-endian binary component read without Python
    label_dtype: str  # numpy dtype name of one element of ``label``
    label_size: int  # elements per sample
    mask: str | None = None
    # whether the 3 stored channels are colour (a photo); False for a stack of CT windows,
    # which are augmented and normalised like greyscale. None: 3 channels are RGB.
    rgb: bool | None = None

    @property
    def colour(self) -> bool:
        """Whether the channels are RGB colour (ImageNet statistics, colour jitter)."""
        return self.stored_channels == 3 if self.rgb is None else self.rgb

    @property
    def greyscale(self) -> bool:
        """Medical images: brightness/contrast only, never hue, saturation or greyscale."""
        return not self.colour


class Packer(Protocol):
    """A data set's packing module (``xdtrain/shards/<name>.py``)."""

    name: str
    volumetric: bool  # one source gives many samples (slices)
    groups_are_keys: bool  # no patients: each source is its own group
    components: dict[str, str]  # extension -> what it holds, for the manifest and docs
    layout: Layout  # which components the loaders read, and how

    def add_arguments(self, group: argparse._ArgumentGroup) -> None: ...

    def options(self, args: argparse.Namespace) -> dict[str, Any]: ...

    def scan(self, src: Path, options: dict[str, Any]) -> Scan: ...

    def split_ratios(self, ratios: dict[str, float], options: dict) -> dict[str, float]: ...

    def encode(self, source: Source, options: dict[str, Any]) -> list[Sample]: ...

    def cpu_bound(self, options: dict[str, Any]) -> bool:
        """Whether encoding needs worker processes (False: plain copying, done in-process)."""


# --------------------------------------------------------------------------- shared options


def add_shared_arguments(group: argparse._ArgumentGroup) -> None:
    """Options that several data sets read, each with its own default."""
    group.add_argument(
        "--size",
        type=int,
        default=None,
        help="output side in pixels: ChestX-ray8 (default 512), dicom and nifti (default 256)",
    )
    group.add_argument(
        "--quality",
        type=int,
        default=None,
        help="JPEG quality of re-encoded images (ImageNet 90, ChestX-ray8 95)",
    )
    group.add_argument(
        "--slices",
        choices=["brain", "tumor", "liver", "all"],
        default=None,
        help="training slices kept: BraTS brain (default), tumor or all; LiTS liver (default) "
        "or all (val and test always keep every slice)",
    )
    group.add_argument(
        "--geometry",
        choices=["check", "image"],
        default="check",
        help="BraTS, LiTS NIfTI: check (default) that a case's files agree in world space, or "
        "image: give every file the affine of the case's image (for headers known to be "
        "wrong on voxel-aligned files)",
    )
    group.add_argument(
        "--bits",
        type=int,
        choices=[8, 16],
        default=None,
        help="BraTS, LiTS, dicom, nifti: bits per image channel (default 8)",
    )


MAX_SIDE = 4096  # pixels: larger slices or films than any release holds


def output_side(args: argparse.Namespace, default: int) -> int:
    """``--size`` (or ``default``), checked to lie in 16..:data:`MAX_SIDE`."""
    size = args.size or default
    if not 16 <= size <= MAX_SIDE:
        raise UserError(f"--size {size}: must be between 16 and {MAX_SIDE} pixels")
    return size


def jpeg_quality(args: argparse.Namespace, default: int) -> int:
    quality = args.quality or default
    if not 1 <= quality <= 100:
        raise UserError(f"--quality {quality}: must be between 1 and 100")
    return quality


def float_pair(text: str, option: str, example: str) -> tuple[float, float]:
    """``"low,high"`` with low < high, e.g. a window or a percentile range."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{option} {text}: expected low,high like {example}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise UserError(f"{option} {text}: low and high must be finite numbers, like {example}")
    if low >= high:
        raise UserError(f"{option} {text}: low must be below high")
    return low, high


# Recorded in the manifest of volumetric data sets; the loaders refuse to score val/test
# splits of shard folders that lack it (packed when selection thinned every split).
SLICE_SELECTION = "training split only: val and test keep every slice of every volume"


def thins(source: Source) -> bool:
    """Whether slices of ``source`` may be selected by label or content (``--slices``): only
    in the training split. Evaluation keeps whole volumes, so the ground truth never decides
    what is scored and per-case scores are over the whole volume."""
    return source.split == "train"


def slices_option(args: argparse.Namespace, dataset: str, allowed: tuple[str, ...]) -> str:
    """``--slices`` for a volumetric data set; the first allowed value is its default."""
    slices = args.slices or allowed[0]
    if slices not in allowed:
        quoted = ", ".join(f"'{a}'" for a in allowed)
        raise UserError(f"--slices {slices}: {dataset} keeps {quoted} slices")
    return slices


# --------------------------------------------------------------------------- sample keys

_NOT_IN_KEY = re.compile(f"[^{KEY_CHARACTERS}]")


def sample_key(stem: str) -> str:
    """The sample key of an input whose file name, without its extension, is ``stem``.

    A key becomes the start of tar member names, which webdataset splits at the first dot,
    and a field of the DALI index, which is text split at spaces: every character outside
    A-Z, a-z, 0-9, ``_`` and ``-`` (a space, a dot, a bracket, ``#``, a non-ASCII letter)
    becomes ``_``, so ``n01440764_900 (1)`` gives ``n01440764_900__1_``. Deterministic. Two
    names can give one key (:func:`claim_key` keeps keys unique); an empty stem gives an
    empty key, which no shard accepts. Every packer that takes keys from names a user
    controls derives them here, and keeps the original name in the sample's ``json``.
    """
    return _NOT_IN_KEY.sub("_", stem)


def claim_key(key: str, original: str, taken: set[str]) -> str | None:
    """A key that no other input of the scan holds, added to ``taken``; None if there is none.

    ``key`` itself while it is free; else ``key``, ``_`` and the first 8 hex digits of the
    sha256 of ``original`` (the input's path below ``--src``, unique per input). Callers
    claim in a fixed order (names that need no change first, then the rest sorted by path),
    so an input whose name is its key keeps it and the keys depend only on the inputs.
    """
    if not key:
        return None
    if key in taken:
        digest = hashlib.sha256(original.encode("utf-8", "surrogateescape")).hexdigest()
        key = f"{key}_{digest[:8]}"  # (surrogateescape: file names that are not UTF-8)
        if key in taken:
            return None
    taken.add(key)
    return key


RENAMED_KEY = "its file name is no valid or free sample key; the sample's json holds the name"


def key_note(relative: str, key: str) -> dict[str, str]:
    """The manifest note of an input packed under a key that is not its file name's stem."""
    return {"input": relative, "note": f"packed as sample {key}: {RENAMED_KEY}"}


def renamed_keys(notes: list[dict]) -> int:
    """How many of ``notes`` are :func:`key_note` notes."""
    return sum(1 for note in notes if note["note"].endswith(RENAMED_KEY))


# --------------------------------------------------------------------------- helpers


def walk(root: Path, match: Callable[[str], bool], *, dirs: bool = False) -> list[Path]:
    """Every file (or, with ``dirs``, every folder) below ``root`` whose name ``match`` accepts,
    sorted, following symbolic links to folders.

    Releases of tens of gigabytes often sit on another disk, linked below ``--src``;
    :meth:`pathlib.Path.rglob` (Python 3.11-3.12) does not descend into such links. Each real
    folder is visited once (by device and inode), so a link back up the tree cannot loop,
    and a link to ``root`` or a folder above it is not followed: nothing outside is read.
    """
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    inside = os.path.realpath(root)
    for top, subdirs, files in os.walk(root, followlinks=True):
        # a link to ``root`` or a folder above it would walk outside --src
        subdirs[:] = [d for d in subdirs if not _above(os.path.join(top, d), inside)]
        try:
            stat = os.stat(top)
        except OSError:
            subdirs[:] = []
            continue
        if (stat.st_dev, stat.st_ino) in seen:
            subdirs[:] = []  # reached again through a link: already walked
            continue
        seen.add((stat.st_dev, stat.st_ino))
        subdirs.sort()
        for name in subdirs if dirs else files:
            if match(name):
                found.append(Path(top) / name)
    if dirs:  # a folder linked twice is one folder
        unique = {}
        for path in sorted(found):
            stat = path.stat()
            unique.setdefault((stat.st_dev, stat.st_ino), path)
        found = list(unique.values())
    return sorted(found)


def _above(path: str, inside: str) -> bool:
    """Whether ``path`` is a link to the folder ``inside`` or to one of its ancestors."""
    if not os.path.islink(path):
        return False
    target = os.path.realpath(path)
    return inside == target or inside.startswith(target.rstrip(os.sep) + os.sep)


def slice_sample(
    source: Source, k: int, depth: int, image: np.ndarray, mask: np.ndarray, meta: dict[str, Any]
) -> Sample:
    """One axial slice of a volume: ``img.png``, ``mask.png``, ``pos.i32`` and ``json``."""
    return Sample(
        key=f"{source.key}_{k:0{max(3, len(str(depth - 1)))}d}",
        parts={
            "img.png": png_bytes(image),
            "mask.png": png_bytes(mask),
            "pos.i32": int_bytes([source.params["case_index"], k, depth], np.int32),
            "json": json_bytes({"case": source.key, "slice": k, "slices": depth, **meta}),
        },
        labels=tuple(int(v) for v in np.unique(mask)),
    )


def rel(path: Path, root: Path) -> str:
    """``path`` relative to the source root, for the manifest."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def png_bytes(array: np.ndarray, level: int = 3) -> bytes:
    """PNG of an HxW or HxWxC uint8/uint16 array, channels in the order given.

    OpenCV writes 16-bit and 4-channel PNGs (Pillow does not write 16-bit RGBA); it expects
    BGR(A) order, so the first three channels are swapped here to keep RGB(A) on disk.
    """
    import cv2  # imported on use: packing ImageNet does not need it

    if array.ndim == 3 and array.shape[2] in (3, 4):
        array = array[..., [2, 1, 0, *range(3, array.shape[2])]]
    ok, buf = cv2.imencode(
        ".png", np.ascontiguousarray(array), [cv2.IMWRITE_PNG_COMPRESSION, level]
    )
    if not ok:  # pragma: no cover - OpenCV fails only on unsupported dtypes
        raise ValueError(f"cannot encode a {array.dtype} array of shape {array.shape} as PNG")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """Inverse of :func:`png_bytes` (RGB(A) order), for checks and tests."""
    import cv2

    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ValueError("not a decodable PNG")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        array = array[..., [2, 1, 0, *range(3, array.shape[2])]]
    return array


def int_bytes(values, dtype) -> bytes:
    """A fixed-size little-endian binary label component (read by DALI with ``dtypes``)."""
    return np.asarray(values, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def json_bytes(meta: dict) -> bytes:
    """A sample's ``json`` component (keys sorted, so equal metadata gives equal bytes)."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def quantise(unit: np.ndarray, bits: int) -> np.ndarray:
    """Values in [0, 1] to ``uint8`` or ``uint16``."""
    top = (1 << bits) - 1
    out = np.rint(np.clip(unit, 0.0, 1.0) * top)
    return out.astype(np.uint8 if bits == 8 else np.uint16)
