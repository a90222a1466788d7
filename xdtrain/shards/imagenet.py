"""ImageNet-1k from the Kaggle layout (imagenet-object-localization-challenge).

Labels are line numbers of ``LOC_synset_mapping.txt``. The official train images are the
train split; the official validation images are split, seeded and stratified by class, into
val and test (``--val-share``, default half each), as the study did.

Sample ``n01440764_10026``::

    jpg        the source JPEG, bytes unchanged (re-encoded RGB only where needed)
    cls        the class index as text (webdataset)
    label.i64  the class index as one little-endian int64 (DALI, ``dtypes=INT64``)

The class names (``wnid names``) are the manifest's ``classes``, in label order.

JPEG bytes are copied unchanged after a header check (format, RGB, not truncated); CMYK,
greyscale, and non-JPEG files named ``.JPEG`` are decoded, converted to RGB and re-encoded,
and listed in the manifest's notes. ``--max-side N`` writes a resized copy instead;
``--check decode`` fully decodes every image to catch corruption inside the data too.
``--classes 100`` or ``10`` keeps every 10th or 100th synset (the study's ImageNet-100/10).
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
    int_bytes,
    jpeg_quality,
    rel,
)

name = "imagenet"
volumetric = False
groups_are_keys = True  # no patients: each image is its own split unit
components = {
    "jpg": "RGB JPEG (source bytes unchanged unless converted or resized)",
    "cls": "class index as ASCII text",
    "label.i64": "class index as little-endian int64",
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
    """Where an image is and its label, shared by all images of a folder and class.

    ImageNet has 1.28 million images: a source must not carry its own path strings.
    """

    folder: str
    relative_folder: str
    suffix: str
    label: int

    def path(self, key: str) -> str:
        return f"{self.folder}/{key}{self.suffix}"

    def describe(self, key: str) -> str:
        return f"{self.relative_folder}/{key}{self.suffix}"


def _images(folder: Path) -> list[str]:
    """File names in ``folder``, sorted (``os.scandir``: no stat call per file)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_file())


def scan(src: Path, options: dict) -> Scan:
    synsets = _synsets(src)
    step = 1000 // options["classes"]
    kept = [(i, wnid, names) for i, (wnid, names) in enumerate(synsets) if i % step == 0]
    label_of = {wnid: new for new, (_, wnid, _) in enumerate(kept)}
    all_wnids = {wnid for wnid, _ in synsets}
    train_dir, val_dir = src / DATA / "train", src / DATA / "val"
    for folder in (train_dir, val_dir):
        if not folder.is_dir():
            raise UserError(f"{folder}: not found; pass --src with the Kaggle ImageNet folder")
    sources: list[Source] = []
    skipped: list[dict] = []

    def add(folder: Path, filename: str, wnid: str, split: str | None) -> None:
        key, _, suffix = filename.partition(".")
        if f".{suffix}".lower() not in EXTENSIONS:
            relative = f"{folder_rel[folder]}/{filename}"
            skipped.append({"input": relative, "reason": "not a .JPEG file"})
            return
        if wnid not in label_of:
            return  # a synset left out by --classes
        refs = folder_refs.setdefault((folder, suffix, wnid), {})
        if split not in refs:  # shared by every image of a folder, class and split
            refs[split] = ImageRef(str(folder), folder_rel[folder], f".{suffix}", label_of[wnid])
        sources.append(Source(key, key, refs[split], split=split, stratum=wnid))

    folder_refs: dict[tuple, dict] = {}
    folder_rel: dict[Path, str] = {}
    for folder in sorted(p for p in train_dir.iterdir() if p.is_dir()):
        folder_rel[folder] = rel(folder, src)
        if folder.name not in all_wnids:
            skipped.append(
                {
                    "input": folder_rel[folder],
                    "reason": "class folder not in LOC_synset_mapping.txt",
                }
            )
            continue
        if folder.name not in label_of:
            continue
        wnid = folder.name  # one string for the whole folder
        for filename in _images(folder):
            add(folder, filename, wnid, "train")
    val_labels = _val_labels(src)
    folder_rel[val_dir] = rel(val_dir, src)
    seen = set()
    for filename in _images(val_dir):
        image_id = filename.split(".")[0]
        seen.add(image_id)
        wnid = val_labels.get(image_id)
        relative = f"{folder_rel[val_dir]}/{filename}"
        if wnid is None:
            skipped.append({"input": relative, "reason": "no row in LOC_val_solution.csv"})
        elif wnid not in all_wnids:
            reason = f"label {wnid} not in LOC_synset_mapping.txt"
            skipped.append({"input": relative, "reason": reason})
        else:
            add(val_dir, filename, wnid, None)
    for image_id in sorted(set(val_labels) - seen):
        skipped.append(
            {"input": f"LOC_val_solution.csv:{image_id}", "reason": "listed but no image file"}
        )
    classes = [f"{wnid} {names}" for _, wnid, names in kept]
    info = {
        "label_order": "LOC_synset_mapping.txt line order",
        "synset_step": step,
        "original_synset_index": [i for i, _, _ in kept],
        **options,
    }
    return Scan(sources, classes, skipped, [], info)


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
    parts = {"jpg": data, "cls": _CLS[label], "label.i64": _LABEL[label]}
    return [Sample(source.key, parts, (label,), note)]


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
