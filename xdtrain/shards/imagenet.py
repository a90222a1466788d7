"""ImageNet-1k from the Kaggle layout (imagenet-object-localization-challenge).

Labels are line numbers of ``LOC_synset_mapping.txt``. The official train images are the
train split; the official validation images are split, seeded and stratified by class, into
val and test (``--val-share``, default half each), as the study did.

Sample ``n01440764_10026``::

    jpg        the source JPEG, bytes unchanged (re-encoded RGB only where needed)
    cls        the class index as text (webdataset)
    label.i64  the class index as one little-endian int64 (DALI, ``dtypes=INT64``)
    json       {"file": the image's file name, "wnid": its synset}

The class names (``wnid names``) are the manifest's ``classes``, in label order.

A file's extension is the part after its last dot (``.JPEG``, ``.jpg``, ``.jpeg``, in any
case); the sample key is the rest, made a valid key by :func:`sample_key`
(``n01440764_900 (1).JPEG`` -> ``n01440764_900__1_``, ``n01440764_10.copy.JPEG`` ->
``n01440764_10_copy``) and unique by :func:`claim_key`. Renamed keys are noted, and the file
name stays in the sample's ``json``. Val images are labelled through
``LOC_val_solution.csv`` by their file name's stem, as it is on disk.

JPEG bytes are copied unchanged after a header check (format, RGB, not truncated); CMYK,
greyscale, and non-JPEG files named ``.JPEG`` are decoded, converted to RGB and re-encoded,
and listed in the manifest's notes. ``--max-side N`` writes a resized copy instead;
``--check decode`` fully decodes every image to catch corruption inside the data too.
``--classes 100`` or ``10`` keeps every 10th or 100th synset (the study's ImageNet-100/10).

Files outside class folders, folders inside them and other extensions are skipped with the
reason. The manifest's ``decisions`` count the renamed keys, the synsets ``--classes`` left
out and the kept synsets without training images.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from xdtrain.errors import UserError
from xdtrain.shards.base import (
    DECODE_ERRORS,
    Layout,
    Sample,
    Scan,
    SkipItem,
    Source,
    claim_key,
    int_bytes,
    jpeg_quality,
    json_bytes,
    key_note,
    rel,
    renamed_keys,
    sample_key,
)

name = "imagenet"
volumetric = False
groups_are_keys = True  # no patients: each image is its own split unit
components = {
    "jpg": "RGB JPEG (source bytes unchanged unless converted or resized)",
    "cls": "class index as ASCII text",
    "label.i64": "class index as little-endian int64",
    "json": "the image's file name and synset (wnid)",
}
layout = Layout("multiclass", "jpg", 3, "label.i64", "int64", 1)
DATA = Path("ILSVRC/Data/CLS-LOC")
EXTENSIONS = (".jpeg", ".jpg")
DEFAULT_QUALITY = 90
# The label components of every class, encoded once.
_CLS = [str(i).encode() for i in range(1000)]
_LABEL = [int_bytes([i], "int64") for i in range(1000)]


def add_arguments(group) -> None:
    group.add_argument(
        "--classes",
        type=int,
        choices=[1000, 100, 10],
        default=1000,
        help="ImageNet: keep every (1000/N)-th synset (default: all)",
    )
    group.add_argument(
        "--max-side",
        type=int,
        default=None,
        help="ImageNet: resize so the longer side is at most N pixels",
    )
    group.add_argument(
        "--val-share",
        type=float,
        default=0.5,
        help="ImageNet: share of the official val images kept as val, the rest test (default 0.5)",
    )
    group.add_argument(
        "--check",
        choices=["header", "decode"],
        default="header",
        help="ImageNet: how copied JPEGs are checked (default: header)",
    )


def options(args) -> dict:
    if not 0 < args.val_share < 1:
        raise UserError(f"--val-share {args.val_share}: must be between 0 and 1")
    if args.max_side is not None and args.max_side < 16:
        raise UserError(f"--max-side {args.max_side}: must be at least 16")
    quality = jpeg_quality(args, DEFAULT_QUALITY)
    return {
        "classes": args.classes,
        "max_side": args.max_side,
        "val_share": args.val_share,
        "check": args.check,
        "quality": quality,
    }


def split_ratios(ratios: dict[str, float], options: dict) -> dict[str, float]:
    # Train is fixed by the release; only the official val images are split.
    return {"train": 0.0, "val": options["val_share"], "test": 1 - options["val_share"]}


def _synsets(src: Path) -> list[tuple[str, str]]:
    path = src / "LOC_synset_mapping.txt"
    if not path.is_file():
        raise UserError(
            f"{path}: not found; pass --src with the Kaggle ImageNet folder "
            "(LOC_synset_mapping.txt, ILSVRC/Data/CLS-LOC/)"
        )
    synsets = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, names = line.partition(" ")
        if not (wnid.startswith("n") and wnid[1:].isdigit()):
            raise UserError(f"{path}:{number}: expected '<wnid> <names>', got {line[:60]!r}")
        synsets.append((wnid, names.strip()))
    if not synsets:
        raise UserError(f"{path}: empty synset mapping")
    return synsets


def _val_labels(src: Path) -> dict[str, str]:
    path = src / "LOC_val_solution.csv"
    if not path.is_file():
        raise UserError(f"{path}: not found; it labels the validation images")
    labels = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(
            reader.fieldnames
        ):
            raise UserError(f"{path}: expected columns ImageId,PredictionString")
        for row in reader:
            prediction = (row["PredictionString"] or "").split()
            if prediction:
                labels[row["ImageId"]] = prediction[0]
    return labels


class ImageRef(NamedTuple):
    """Where an image is, its label and synset: one ref is shared by all images of a folder,
    class and split whose file name is their key and ``suffix``.

    ImageNet has 1.28 million images: a source must not carry its own path strings. Only an
    image whose key is not its file name's stem (see :func:`sample_key`) has its own ref,
    holding ``name``.
    """

    folder: str
    relative_folder: str
    suffix: str
    label: int
    wnid: str
    name: str | None = None  # the file name, where it is not key + suffix

    def filename(self, key: str) -> str:
        return self.name or f"{key}{self.suffix}"

    def path(self, key: str) -> str:
        return f"{self.folder}/{self.filename(key)}"

    def describe(self, key: str) -> str:
        return f"{self.relative_folder}/{self.filename(key)}"


def _entries(folder: Path) -> tuple[list[str], list[str]]:
    """Names of the files and of everything else (folders) in ``folder``, each sorted
    (``os.scandir``: no stat call per file)."""
    files, others = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            (files if entry.is_file() else others).append(entry.name)
    return sorted(files), sorted(others)


def _stem(filename: str) -> str | None:
    """The name before the extension (the part after the last dot), or None if the extension
    is not one of :data:`EXTENSIONS`: ``n01_10.copy.JPEG`` -> ``n01_10.copy``."""
    stem, dot, extension = filename.rpartition(".")
    return stem if dot and f".{extension.lower()}" in EXTENSIONS else None


class _Images:
    """The images a scan keeps, each with a unique sample key, and what it skipped or renamed.

    Names that are valid keys claim them as they are met; the others (a space, more dots,
    brackets, a key another image holds) are keyed after the walk, sorted by path, by
    :func:`claim_key`, and noted.
    """

    def __init__(self, label_of: dict[str, int]):
        self.label_of = label_of
        self.sources: list[Source] = []
        self.skipped: list[dict] = []
        self.notes: list[dict] = []
        self.taken: set[str] = set()
        self.left_out = 0  # val images of synsets that --classes leaves out
        self._later: list[tuple[str, str, str, str, str | None]] = []
        self._refs: dict[tuple, ImageRef] = {}

    def skip(self, relative: str, reason: str) -> None:
        self.skipped.append({"input": relative, "reason": reason})

    def add(self, folder: str, relative_folder: str, filename: str, wnid: str, split) -> bool:
        """One file of a class folder (``split`` "train") or of the val folder (None);
        whether it is kept."""
        stem = _stem(filename)
        if stem is None:
            self.skip(f"{relative_folder}/{filename}", "not a .JPEG file")
            return False
        if wnid not in self.label_of:
            self.left_out += 1  # a synset left out by --classes
            return False
        if sample_key(stem) != stem or not stem or stem in self.taken:
            self._later.append((f"{relative_folder}/{filename}", folder, filename, wnid, split))
            return True
        self.taken.add(stem)
        suffix = filename[len(stem) :]
        ref = self._refs.get((folder, suffix, wnid, split))
        if ref is None:  # shared by every image of a folder, class and split
            ref = ImageRef(folder, relative_folder, suffix, self.label_of[wnid], wnid)
            self._refs[(folder, suffix, wnid, split)] = ref
        self.sources.append(Source(stem, stem, ref, split=split, stratum=wnid))
        return True

    def key_the_rest(self) -> None:
        """Key the images whose names are no valid or free key, in order of their paths."""
        for relative, folder, filename, wnid, split in sorted(self._later):
            stem = _stem(filename)
            key = claim_key(sample_key(stem), relative, self.taken)
            if key is None:
                self.skip(relative, "no sample key can be formed from this file name")
                continue
            relative_folder = relative.rpartition("/")[0]
            ref = ImageRef(folder, relative_folder, "", self.label_of[wnid], wnid, filename)
            self.sources.append(Source(key, key, ref, split=split, stratum=wnid))
            self.notes.append(key_note(relative, key))
        self._later.clear()


def scan(src: Path, options: dict) -> Scan:
    synsets = _synsets(src)
    step = 1000 // options["classes"]
    kept = [(i, wnid, names) for i, (wnid, names) in enumerate(synsets) if i % step == 0]
    label_of = {wnid: new for new, (_, wnid, _) in enumerate(kept)}
    train_dir, val_dir = src / DATA / "train", src / DATA / "val"
    for folder in (train_dir, val_dir):
        if not folder.is_dir():
            raise UserError(f"{folder}: not found; pass --src with the Kaggle ImageNet folder")
    images = _Images(label_of)
    trained = _scan_train(src, train_dir, images, {wnid for wnid, _ in synsets})
    _scan_val(src, val_dir, images, {wnid for wnid, _ in synsets})
    images.key_the_rest()
    untrained = [wnid for wnid in label_of if wnid not in trained]
    for wnid in untrained:
        images.notes.append({"input": f"{rel(train_dir, src)}/{wnid}", "note": NO_TRAINING})
    classes = [f"{wnid} {names}" for _, wnid, names in kept]
    info = {
        "label_order": "LOC_synset_mapping.txt line order",
        "synset_step": step,
        "original_synset_index": [i for i, _, _ in kept],
        **options,
        "decisions": _decisions(images, synsets, kept, step, untrained),
    }
    return Scan(images.sources, classes, images.skipped, images.notes, info)


NO_TRAINING = "synset without training images: the class is never trained on"


def _scan_train(src: Path, train_dir: Path, images: _Images, all_wnids: set[str]) -> set[str]:
    """Add the official train images, one folder per synset; return the synsets seen."""
    trained = set()
    files, folders = _entries(train_dir)
    for name in files:
        images.skip(f"{rel(train_dir, src)}/{name}", "not inside a class folder")
    for name in folders:
        folder = train_dir / name
        relative_folder = rel(folder, src)
        if name not in all_wnids:
            images.skip(relative_folder, "class folder not in LOC_synset_mapping.txt")
            continue
        if name not in images.label_of:
            continue  # a synset left out by --classes: counted in the decisions
        files, others = _entries(folder)
        for other in others:
            images.skip(f"{relative_folder}/{other}", "a folder inside a class folder: not read")
        kept = [images.add(str(folder), relative_folder, f, name, "train") for f in files]
        if any(kept):
            trained.add(name)
    return trained


def _scan_val(src: Path, val_dir: Path, images: _Images, all_wnids: set[str]) -> None:
    """Add the official val images, labelled by LOC_val_solution.csv through their stems."""
    val_labels = _val_labels(src)
    relative_folder = rel(val_dir, src)
    files, others = _entries(val_dir)
    for other in others:
        images.skip(f"{relative_folder}/{other}", "a folder inside the val folder: not read")
    seen = set()
    for filename in files:
        relative = f"{relative_folder}/{filename}"
        image_id = _stem(filename)
        if image_id is None:
            images.skip(relative, "not a .JPEG file")
            continue
        seen.add(image_id)
        wnid = val_labels.get(image_id)
        if wnid is None:
            images.skip(relative, "no row in LOC_val_solution.csv")
        elif wnid not in all_wnids:
            images.skip(relative, f"label {wnid} not in LOC_synset_mapping.txt")
        else:
            images.add(str(val_dir), relative_folder, filename, wnid, None)
    for image_id in sorted(set(val_labels) - seen):
        images.skip(f"LOC_val_solution.csv:{image_id}", "listed but no image file")


def _decisions(images: _Images, synsets: list, kept: list, step: int, untrained: list) -> list:
    """What the scan decided that a user might not expect, counted for the manifest."""
    left_out = f"1 synset in {step} kept; {images.left_out} val image(s) of the others not read"
    return [
        {
            "decision": "sample keys renamed",
            "count": renamed_keys(images.notes),
            "detail": "file names that are no valid or free key; listed in notes, each "
            "name kept in its sample's json",
        },
        {
            "decision": "synsets left out by --classes",
            "count": len(synsets) - len(kept),
            "detail": left_out if step > 1 else "all synsets kept",
        },
        {
            "decision": "synsets without training images",
            "count": len(untrained),
            "detail": "kept synsets that no training image shows; listed in notes",
        },
    ]


def _read(path: str) -> bytes:
    """A whole file, with the fewest system calls (this runs once per ImageNet image)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise SkipItem(f"unreadable file ({exc.strerror})") from None
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size)
        while len(data) < size:  # a short read: keep going
            more = os.read(fd, size - len(data))
            if not more:
                break
            data += more
        return data
    except OSError as exc:
        raise SkipItem(f"unreadable file ({exc.strerror})") from None
    finally:
        os.close(fd)


def _ends_complete(data: bytes) -> bool:
    """A JPEG ends with its EOI marker; 0xFFD9 occurs nowhere else in the entropy-coded tail."""
    return data.rfind(b"\xff\xd9", max(0, len(data) - 1024)) != -1


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(components, width, height) from a JPEG's frame header, or None if not a JPEG.

    Walks the marker segments up to the first SOF marker: a few microseconds, where opening
    the file with Pillow costs as much as copying it.
    """
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 10 > n:
                return None
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return data[i + 9], width, height
        i += 2 + length
    return None


def cpu_bound(options: dict) -> bool:
    """Copy-through is I/O: it runs in the main process, where worker processes would only
    add the cost of shipping every byte between processes."""
    return options["max_side"] is not None or options["check"] == "decode"


def encode(source: Source, options: dict) -> list[Sample]:
    ref: ImageRef = source.params
    data = _read(ref.path(source.key))
    frame = jpeg_frame(data)
    copy = (
        options["check"] == "header"
        and frame is not None
        and frame[0] == 3
        and _ends_complete(data)
        and (options["max_side"] is None or max(frame[1:]) <= options["max_side"])
    )
    note = None
    if not copy:
        try:
            image = Image.open(io.BytesIO(data))
            kind = f"{image.mode} {image.format}"
            image.load()  # raises on truncated or corrupt data
        except DECODE_ERRORS as exc:
            raise SkipItem(f"cannot decode image ({str(exc)[:80]})") from None
        if image.format != "JPEG" or image.mode != "RGB":
            note = {"input": source.describe(), "note": f"{kind} converted to RGB JPEG"}
            data = _reencode(image, options)
        elif options["max_side"] is not None and max(image.size) > options["max_side"]:
            data = _reencode(image, options)
    label = ref.label
    parts = {
        "jpg": data,
        "cls": _CLS[label],
        "label.i64": _LABEL[label],
        "json": _meta(ref, source.key),
    }
    return [Sample(source.key, parts, (label,), note)]


def _meta(ref: ImageRef, key: str) -> bytes:
    """The ``json`` component: the image's file name and synset.

    What :func:`json_bytes` writes; built by formatting where the name is the key and a
    JPEG extension (characters JSON writes as they are), as it is for nearly every image:
    this runs once per image of the copy-through path.
    """
    if ref.name is None:
        return b'{"file":"%s%s","wnid":"%s"}' % (
            key.encode(),
            ref.suffix.encode(),
            ref.wnid.encode(),
        )
    return json_bytes({"file": ref.name, "wnid": ref.wnid})


def _reencode(image: Image.Image, options: dict) -> bytes:
    image = image.convert("RGB")
    side = options["max_side"]
    if side is not None and max(image.size) > side:
        scale = side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.BICUBIC, reducing_gap=3.0)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=options["quality"])
    return buf.getvalue()
