"""ImageNet-1k from the Kaggle layout (imagenet-object-localization-challenge).

Labels are line numbers of ``LOC_synset_mapping.txt``. The official train images are the
train split; the official validation images are split, seeded and stratified by class, into
val and test (``--val-share``, default half each), as the study did.

Sample ``n01440764_10026``::

    jpg        the source JPEG, bytes unchanged (re-encoded RGB only where needed)
    cls        the class index as text (webdataset)
    label.i64  the class index as one little-endian int64 (DALI, ``dtypes=INT64``)
    json       {"wnid", "source"}

JPEG bytes are copied unchanged after a header check (format, RGB, not truncated); CMYK,
greyscale, and non-JPEG files named ``.JPEG`` are decoded, converted to RGB and re-encoded,
and listed in the manifest's notes. ``--max-side N`` writes a resized copy instead;
``--check decode`` fully decodes every image to catch corruption inside the data too.
``--classes 100`` or ``10`` keeps every 10th or 100th synset (the study's ImageNet-100/10).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from xdtrain.errors import UserError
from xdtrain.shards.base import Sample, Scan, SkipItem, Source, int_bytes, json_bytes, rel

name = "imagenet"
volumetric = False
groups_are_keys = True  # no patients: each image is its own split unit
components = {
    "jpg": "RGB JPEG (source bytes unchanged unless converted or resized)",
    "cls": "class index as ASCII text",
    "label.i64": "class index as little-endian int64",
    "json": "wnid and source path",
}
DATA = Path("ILSVRC/Data/CLS-LOC")
EXTENSIONS = (".jpeg", ".jpg")
DEFAULT_QUALITY = 90


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
    group.add_argument(
        "--quality",
        type=int,
        default=None,
        help="JPEG quality of re-encoded images (ImageNet 90, ChestX-ray8 95)",
    )


def options(args) -> dict:
    if not 0 < args.val_share < 1:
        raise UserError(f"--val-share {args.val_share}: must be between 0 and 1")
    if args.max_side is not None and args.max_side < 16:
        raise UserError(f"--max-side {args.max_side}: must be at least 16")
    quality = args.quality or DEFAULT_QUALITY
    if not 1 <= quality <= 100:
        raise UserError(f"--quality {quality}: must be between 1 and 100")
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


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


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

    def add(path: Path, wnid: str, split: str | None) -> None:
        key = path.name.split(".")[0]
        if path.suffix.lower() not in EXTENSIONS:
            skipped.append({"input": rel(path, src), "reason": "not a .JPEG file"})
            return
        if wnid not in label_of:
            return  # a synset left out by --classes
        label = label_of[wnid]
        sources.append(
            Source(
                key,
                key,
                {"input": rel(path, src), "path": str(path), "label": label, "wnid": wnid},
                split=split,
                stratum=wnid,
            )
        )

    for folder in sorted(p for p in train_dir.iterdir() if p.is_dir()):
        if folder.name not in all_wnids:
            skipped.append(
                {"input": rel(folder, src), "reason": "class folder not in LOC_synset_mapping.txt"}
            )
            continue
        if folder.name not in label_of:
            continue
        for path in _images(folder):
            add(path, folder.name, "train")
    val_labels = _val_labels(src)
    seen = set()
    for path in _images(val_dir):
        image_id = path.name.split(".")[0]
        seen.add(image_id)
        wnid = val_labels.get(image_id)
        if wnid is None:
            skipped.append({"input": rel(path, src), "reason": "no row in LOC_val_solution.csv"})
        elif wnid not in all_wnids:
            skipped.append(
                {"input": rel(path, src), "reason": f"label {wnid} not in LOC_synset_mapping.txt"}
            )
        else:
            add(path, wnid, None)
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
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise SkipItem(f"unreadable file ({exc.strerror})") from None


def _ends_complete(data: bytes) -> bool:
    """A JPEG ends with its EOI marker; 0xFFD9 occurs nowhere else in the entropy-coded tail."""
    return data.rfind(b"\xff\xd9", max(0, len(data) - 1024)) != -1


def encode(source: Source, options: dict) -> list[Sample]:
    data = _read(source.params["path"])
    try:
        image = Image.open(io.BytesIO(data))
        kind = f"{image.mode} {image.format}"
        copy = (
            image.format == "JPEG"
            and image.mode == "RGB"
            and _ends_complete(data)
            and (options["max_side"] is None or max(image.size) <= options["max_side"])
        )
        if options["check"] == "decode" or not copy:
            image.load()  # raises on truncated or corrupt data
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise SkipItem(f"cannot decode image ({str(exc)[:80]})") from None
    note = None
    if not copy:
        data = _reencode(image, options)
        if image.format != "JPEG" or image.mode != "RGB":
            note = {"input": source.params["input"], "note": f"{kind} converted to RGB JPEG"}
    label = source.params["label"]
    parts = {
        "jpg": data,
        "cls": str(label).encode(),
        "label.i64": int_bytes([label], "int64"),
        "json": json_bytes({"wnid": source.params["wnid"], "source": source.params["input"]}),
    }
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
