"""NIH ChestX-ray8 (ChestX-ray14): greyscale films with 15 multi-hot outputs, split by patient.

``test_list.txt`` is the test split; ``train_val_list.txt`` is split into train and val by
``Patient ID`` in the ratio of the train and val shares of ``--splits``.

Sample ``00000001_000``::

    jpg or png   greyscale film, --size x --size (default 512); JPEG q95 by default (GPUs
                 decode it), PNG with --codec png (lossless)
    labels.u8    15 bytes, 0/1, in the order of :data:`OUTPUTS`: the 14 findings, then
                 "No Finding"
    json         {"labels", "patient", "image", "follow_up", "view", "age", "sex"}
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

from xdtrain.errors import UserError
from xdtrain.shards.base import (
    DECODE_ERRORS,
    Layout,
    Sample,
    Scan,
    SkipItem,
    Source,
    jpeg_quality,
    json_bytes,
    rel,
    walk,
)

name = "chestxray8"
volumetric = False
groups_are_keys = False
FINDINGS = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
]  # fmt: skip
NO_FINDING = "No Finding"
OUTPUTS = [*FINDINGS, NO_FINDING]
components = {
    "jpg|png": "greyscale film (JPEG q95 or PNG)",
    "labels.u8": "15 uint8 0/1: the 14 findings in manifest class order, then No Finding",
    "json": "finding names, patient id, image name, follow-up, view, age, sex",
}
# "codec": the image component is jpg or png, as the manifest says (--codec)
layout = Layout("multilabel", "codec", 1, "labels.u8", "uint8", len(OUTPUTS))
TABLES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
REQUIRED = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID")
IMAGE = re.compile(r"\d{8}_\d{3}\.png")
DEFAULT_QUALITY = 95


def add_arguments(group) -> None:
    group.add_argument(
        "--size", type=int, default=512, help="ChestX-ray8: output side in pixels (default 512)"
    )
    group.add_argument(
        "--codec",
        choices=["jpg", "png"],
        default="jpg",
        help="ChestX-ray8: jpg (q95, GPU-decodable, default) or png (lossless)",
    )


def options(args) -> dict:
    if args.size < 16:
        raise UserError(f"--size {args.size}: must be at least 16")
    quality = jpeg_quality(args, DEFAULT_QUALITY)
    return {"size": args.size, "codec": args.codec, "quality": quality}


def split_ratios(ratios: dict[str, float], options: dict) -> dict[str, float]:
    # Test is fixed by test_list.txt; train_val_list.txt is split in the train:val ratio.
    train, val = ratios["train"], ratios["val"]
    if train + val <= 0:
        raise UserError("--splits: ChestX-ray8 needs a non-zero train or val share")
    return {"train": train / (train + val), "val": val / (train + val), "test": 0.0}


def _read_list(path: Path) -> set[str]:
    if not path.is_file():
        raise UserError(f"{path}: not found; it is part of the ChestX-ray8 release")
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def scan(src: Path, options: dict) -> Scan:
    # The 2020 re-release renames the table and a column ("Patient Sex"); both are read.
    tables = [src / name for name in TABLES if (src / name).is_file()]
    if not tables:
        raise UserError(
            f"{src / TABLES[0]}: not found; pass --src with the ChestX-ray8 folder "
            "(Data_Entry_2017.csv, images_*/images/)"
        )
    table = tables[0]
    test, train_val = _read_list(src / "test_list.txt"), _read_list(src / "train_val_list.txt")
    files = {
        p.name: p
        for top in walk(src, lambda name: name.startswith("images"), dirs=True)
        if top.parent == src
        for p in walk(top, IMAGE.fullmatch)
    }
    if not files:
        raise UserError(f"{src}: no images_*/images/*.png files found; check --src")
    sources: list[Source] = []
    skipped: list[dict] = []
    rows: dict[str, dict] = {}
    with open(table, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{table}: missing column(s) {', '.join(missing)}")
        for number, row in enumerate(reader, 2):
            image = (row["Image Index"] or "").strip()
            where = f"{table.name}:{number}"
            labels = [x.strip() for x in (row["Finding Labels"] or "").split("|")]
            unknown = [x for x in labels if x not in OUTPUTS]
            if unknown or (NO_FINDING in labels and len(labels) > 1):
                skipped.append(
                    {"input": where, "reason": f"unknown labels {row['Finding Labels']!r}"}
                )
                continue
            if image not in files:
                skipped.append({"input": where, "reason": f"{image}: listed but no image file"})
                continue
            rows[image] = row | {"labels": labels}
    for image in sorted(set(files) - set(rows)):
        skipped.append(
            {
                "input": rel(files[image], src),
                "reason": f"image without a row in {table.name}",
            }
        )
    # A patient's stratum: whether any of their films shows a finding.
    sick = {r["Patient ID"] for r in rows.values() if r["labels"] != [NO_FINDING]}
    for image in sorted(rows):
        row = rows[image]
        if image in test:
            split = "test"
        elif image in train_val:
            split = None
        else:
            skipped.append(
                {
                    "input": rel(files[image], src),
                    "reason": "in neither train_val_list.txt nor test_list.txt",
                }
            )
            continue
        patient = row["Patient ID"].strip()
        vector = [1 if name in row["labels"] else 0 for name in OUTPUTS]
        meta = {
            "labels": [n for n in row["labels"] if n != NO_FINDING],
            "patient": patient,
            "image": image,
            "follow_up": row["Follow-up #"],
            "view": row.get("View Position", ""),
            "age": row.get("Patient Age", ""),
            "sex": row.get("Patient Gender", row.get("Patient Sex", "")),
        }
        sources.append(
            Source(
                key=image.removesuffix(".png"),
                group=patient,
                split=split,
                stratum="finding" if patient in sick else "normal",
                params={
                    "input": rel(files[image], src),
                    "path": str(files[image]),
                    "vector": vector,
                    "meta": meta,
                },
            )
        )
    info = {
        "outputs": OUTPUTS,
        "size": options["size"],
        "codec": options["codec"],
        "quality": options["quality"] if options["codec"] == "jpg" else None,
        "resize": "Lanczos to size x size",
    }
    return Scan(sources, OUTPUTS, skipped, [], info)


def encode(source: Source, options: dict) -> list[Sample]:
    path = source.params["path"]
    try:
        image = Image.open(path)
        image.load()
    except DECODE_ERRORS as exc:
        raise SkipItem(f"cannot decode image ({str(exc)[:80]})") from None
    note = None
    if image.mode not in ("L", "I;16", "I"):
        note = {"input": source.params["input"], "note": f"{image.mode} PNG converted to greyscale"}
    image = _grey(image)
    side = options["size"]
    if image.size != (side, side):
        image = image.resize((side, side), Image.LANCZOS)
    buf = io.BytesIO()
    if options["codec"] == "jpg":
        image.save(buf, format="JPEG", quality=options["quality"])
    else:
        image.save(buf, format="PNG", compress_level=3)
    vector = source.params["vector"]
    parts = {
        options["codec"]: buf.getvalue(),
        "labels.u8": bytes(vector),
        "json": json_bytes(source.params["meta"]),
    }
    return [Sample(source.key, parts, tuple(i for i, v in enumerate(vector) if v), note)]


def _grey(image: Image.Image) -> Image.Image:
    """8-bit greyscale; 16-bit films are scaled down, colour and alpha dropped."""
    if image.mode in ("I;16", "I"):
        return Image.fromarray((np.asarray(image, np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    return image.convert("L")


def cpu_bound(options: dict) -> bool:
    return True
