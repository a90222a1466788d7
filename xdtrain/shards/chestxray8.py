"""NIH ChestX-ray8 (ChestX-ray14): greyscale films with 15 multi-hot outputs, split by patient.

``test_list.txt`` is the test split; ``train_val_list.txt`` is split into train and val by
``Patient ID`` in the ratio of the train and val shares of ``--splits``. No patient is in two
splits: the ``train_val_list.txt`` films of a patient with ``test_list.txt`` films are left out
(``--list-overlap skip``, the default) or moved to test (``test``); see :class:`_Lists` for
why. The table read (``Data_Entry_2017.csv`` before ``Data_Entry_2017_v2020.csv``) is
recorded with its size and sha256 in ``preprocessing.table``; the films left out or moved, in
``preprocessing.list_overlap`` and, one by one, in ``skipped`` or ``notes``; the manifest's
``decisions`` count both.

Films are the ``.png`` files of the ``images*`` folders, named in the table's ``Image Index``;
other files, a second file of one name and a second row of one film are skipped with the
reason. The key is the name without ``.png`` (made a valid, unique key where it is not one;
the ``json`` holds the name).

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
    claim_key,
    jpeg_quality,
    json_bytes,
    key_note,
    output_side,
    rel,
    renamed_keys,
    sample_key,
    walk,
)
from xdtrain.shards.tar import file_sha256

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
DEFAULT_QUALITY = 95
DEFAULT_SIZE = 512
IN_BOTH = "in both test_list.txt and train_val_list.txt: packed as a test film"
IN_NEITHER = "in neither train_val_list.txt nor test_list.txt"
# --list-overlap: what becomes of the train_val_list.txt films of a patient with test films
LIST_OVERLAP = {
    "skip": "left out, so that test is exactly test_list.txt (--list-overlap skip)",
    "test": "moved to test (--list-overlap test)",
}


def add_arguments(group) -> None:
    group.add_argument(
        "--codec",
        choices=["jpg", "png"],
        default="jpg",
        help="ChestX-ray8: jpg (q95, GPU-decodable, default) or png (lossless)",
    )
    group.add_argument(
        "--list-overlap",
        choices=list(LIST_OVERLAP),
        default="skip",
        help="ChestX-ray8: train_val_list.txt films of patients with test_list.txt films are "
        "left out (skip, default: test is exactly test_list.txt) or moved to test (test)",
    )


def options(args) -> dict:
    size = output_side(args, DEFAULT_SIZE)
    quality = jpeg_quality(args, DEFAULT_QUALITY)
    return {
        "size": size,
        "codec": args.codec,
        "quality": quality,
        "list_overlap": args.list_overlap,
    }


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


def _tables(src: Path) -> list[Path]:
    """The Data_Entry tables present, the one read first (the order of :data:`TABLES`)."""
    tables = [src / name for name in TABLES if (src / name).is_file()]
    if not tables:
        raise UserError(
            f"{src / TABLES[0]}: not found; pass --src with the ChestX-ray8 folder "
            "(Data_Entry_2017.csv, images_*/images/)"
        )
    return tables


def _table_record(tables: list[Path]) -> dict:
    """Which table the labels, patients and metadata come from (the releases differ), and
    the ones present but not read."""
    table = tables[0]
    return {
        "name": table.name,
        "bytes": table.stat().st_size,
        "sha256": file_sha256(table),
        "not_read": [other.name for other in tables[1:]],
    }


def _films(src: Path, skipped: list[dict]) -> dict[str, Path]:
    """Every PNG in the ``images*`` folders directly below ``src``, by file name (the table's
    ``Image Index``); other files and a second file of the same name are skipped."""
    files: dict[str, Path] = {}
    for top in walk(src, lambda name: name.startswith("images"), dirs=True):
        if top.parent != src:
            continue
        for path in walk(top, lambda name: True):
            relative = rel(path, src)
            if not path.name.lower().endswith(".png"):
                skipped.append({"input": relative, "reason": "not a .png film"})
            elif path.name in files:
                first = rel(files[path.name], src)
                skipped.append({"input": relative, "reason": f"same file name as {first}"})
            else:
                files[path.name] = path
    if not files:
        raise UserError(f"{src}: no images_*/images/*.png files found; check --src")
    return files


def _rows(table: Path, files: dict[str, Path], skipped: list[dict]) -> dict[str, dict]:
    """The table's rows by film, with their findings; rows that cannot be used are skipped."""
    rows: dict[str, dict] = {}
    line_of: dict[str, int] = {}
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
                reason = f"unknown labels {row['Finding Labels']!r}"
            elif image in line_of:
                reason = f"a second row for {image} (line {line_of[image]} is read)"
            elif image not in files:
                reason = f"{image}: listed but no image file"
            else:
                line_of[image] = number
                rows[image] = row | {"labels": labels, "Patient ID": row["Patient ID"].strip()}
                continue
            skipped.append({"input": where, "reason": reason})
    return rows


class _Lists:
    """Which split the official lists give each film, and what was decided on the way.

    ``test_list.txt`` is the test split. A film in both lists is a test film. A patient is
    in one split only, so the ``train_val_list.txt`` films of a patient who also has films in
    ``test_list.txt`` can be neither train nor val films. NIH split its lists by patient, and
    results on ChestX-ray14 are reported on exactly the films of ``test_list.txt``: users
    expect that test set, and films moved in would change it (and weigh those patients
    more). So by default (``--list-overlap skip``) such films are left out, at the cost of
    a few training films. Lists of one's own split by image keep every film with
    ``--list-overlap test``, which moves them into test. Each film is listed either way.
    """

    def __init__(self, src: Path, lists: tuple[set, set], rows: dict, files: dict, policy: str):
        test, train_val = lists
        self.policy = policy
        self.skipped: list[dict] = []
        self.notes: list[dict] = []
        self.in_both: list[str] = []
        self.split: dict[str, str | None] = {}  # film -> "test", or None: train or val
        for image in sorted(rows):
            relative = rel(files[image], src)
            if image in test:
                self.split[image] = "test"
                if image in train_val:
                    self.in_both.append(image)
                    self.notes.append({"input": relative, "note": IN_BOTH})
            elif image in train_val:
                self.split[image] = None
            else:
                self.skipped.append({"input": relative, "reason": IN_NEITHER})
        self.overlap = self._resolve_overlap(src, rows, files)

    def _resolve_overlap(self, src: Path, rows: dict, files: dict) -> list[str]:
        """Skip or move the train_val films of test patients; return them."""
        patient = {image: rows[image]["Patient ID"] for image in self.split}
        tested = {patient[image] for image, split in self.split.items() if split == "test"}
        overlap = [i for i, split in self.split.items() if split is None and patient[i] in tested]
        for image in overlap:
            relative = rel(files[image], src)
            text = (
                f"train_val_list.txt film of patient {patient[image]}, who has test_list.txt films"
            )
            if self.policy == "skip":
                del self.split[image]
                self.skipped.append(
                    {"input": relative, "reason": f"{text}: {LIST_OVERLAP['skip']}"}
                )
            else:
                self.split[image] = "test"
                self.notes.append({"input": relative, "note": f"{text}: {LIST_OVERLAP['test']}"})
        self.patients = sorted({patient[image] for image in overlap})
        return overlap

    def record(self) -> dict:
        """The manifest's ``preprocessing.list_overlap``."""
        return {"policy": self.policy, "patients": self.patients, "films": self.overlap}


def _keys(images: list[str], files: dict[str, Path], src: Path) -> dict[str, str | None]:
    """Each film's sample key: its name without ``.png`` where that is a valid key (all of
    NIH's), else :func:`sample_key` of it; unique (:func:`claim_key`), None if none can be."""
    stems = {image: image.rpartition(".")[0] for image in images}
    clean = [image for image in images if sample_key(stems[image]) == stems[image]]
    others = sorted(set(images) - set(clean), key=lambda image: rel(files[image], src))
    taken: set[str] = set()
    return {
        image: claim_key(sample_key(stems[image]), rel(files[image], src), taken)
        for image in clean + others
    }


def scan(src: Path, options: dict) -> Scan:
    # The 2020 re-release renames the table and a column ("Patient Sex"); both are read.
    tables = _tables(src)
    table, record = tables[0], _table_record(tables)
    unread = f"present but not read: {table.name} is read when both are present"
    notes = [{"input": other, "note": unread} for other in record["not_read"]]
    lists = _read_list(src / "test_list.txt"), _read_list(src / "train_val_list.txt")
    skipped: list[dict] = []
    files = _films(src, skipped)
    rows = _rows(table, files, skipped)
    for image in sorted(set(files) - set(rows)):
        skipped.append(
            {"input": rel(files[image], src), "reason": f"image without a row in {table.name}"}
        )
    listed = _Lists(src, lists, rows, files, options["list_overlap"])
    skipped += listed.skipped
    notes += listed.notes
    sources = _sources(src, rows, files, listed.split, skipped, notes)
    info = {
        "outputs": OUTPUTS,
        "size": options["size"],
        "codec": options["codec"],
        "quality": options["quality"] if options["codec"] == "jpg" else None,
        "resize": "Lanczos to size x size",
        "table": record,
        "list_overlap": listed.record(),
        "decisions": _decisions(record, notes, listed),
    }
    return Scan(sources, OUTPUTS, skipped, notes, info)


def _sources(src, rows, files, splits, skipped, notes) -> list[Source]:
    """One source per film the lists keep, keyed by :func:`_keys`."""
    # A patient's stratum: whether any of their films shows a finding.
    sick = {r["Patient ID"] for r in rows.values() if r["labels"] != [NO_FINDING]}
    keys = _keys(sorted(splits), files, src)
    sources = []
    for image in sorted(splits):
        row, relative, key = rows[image], rel(files[image], src), keys[image]
        if key is None:
            skipped.append({"input": relative, "reason": "no sample key can be formed from it"})
            continue
        if key != image.rpartition(".")[0]:
            notes.append(key_note(relative, key))
        patient = row["Patient ID"]
        sources.append(
            Source(
                key=key,
                group=patient,
                split=splits[image],
                stratum="finding" if patient in sick else "normal",
                params={
                    "input": relative,
                    "path": str(files[image]),
                    "vector": [1 if name in row["labels"] else 0 for name in OUTPUTS],
                    "meta": _meta(image, row),
                },
            )
        )
    return sources


def _meta(image: str, row: dict) -> dict:
    """The sample's ``json``: findings, patient, the film's file name and the table's fields."""
    return {
        "labels": [n for n in row["labels"] if n != NO_FINDING],
        "patient": row["Patient ID"],
        "image": image,
        "follow_up": row["Follow-up #"],
        "view": row.get("View Position", ""),
        "age": row.get("Patient Age", ""),
        "sex": row.get("Patient Gender", row.get("Patient Sex", "")),
    }


def _decisions(record: dict, notes: list[dict], lists: _Lists) -> list[dict]:
    """What the scan decided that a user might not expect, counted for the manifest."""
    others = record["not_read"]
    also = f"; {', '.join(others)} also present, not read" if others else ""
    action = "left out" if lists.policy == "skip" else "moved to test"
    where = "skipped" if lists.policy == "skip" else "notes"
    return [
        {
            "decision": "Data_Entry table read",
            "count": 1,
            "detail": f"{record['name']} ({record['bytes']} bytes, sha256 "
            f"{record['sha256'][:16]}){also}",
        },
        {
            "decision": "train_val_list.txt films of test patients",
            "count": len(lists.overlap),
            "detail": f"{action} (--list-overlap {lists.policy}); "
            f"{len(lists.patients)} patient(s); listed in {where}",
        },
        {
            "decision": "films in both lists",
            "count": len(lists.in_both),
            "detail": "packed as test films; listed in notes",
        },
        {
            "decision": "sample keys renamed",
            "count": renamed_keys(notes),
            "detail": "film names that are no valid or free key; listed in notes",
        },
    ]


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
