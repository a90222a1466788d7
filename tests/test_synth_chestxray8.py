from __future__ import annotations

import csv
import re
from collections import defaultdict
from io import BytesIO

import numpy as np
from PIL import Image

from xdtrain.synth import chestxray8
from xdtrain.synth.common import Job

HEADER = [
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
    "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
    "OriginalImagePixelSpacing[x", "y]", "",
]  # fmt: skip


def rows(raw):
    with open(raw / "chestxray8/Data_Entry_2017.csv", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        return header, list(reader)


def test_csv_columns_as_released(raw):
    header, table = rows(raw)
    assert header == HEADER  # the real file's header is cut by the commas inside brackets
    first = (raw / "chestxray8/Data_Entry_2017.csv").read_text().splitlines()[0]
    assert first.startswith("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,")
    for row in table:
        assert len(row) == len(HEADER) and row[-1] == ""
        name, labels, visit, patient = row[0], row[1], int(row[2]), int(row[3])
        assert name == f"{patient:08d}_{visit:03d}.png"
        assert row[5] in ("M", "F") and row[6] in ("PA", "AP")
        assert 0 < int(row[4]) < 100 and int(row[7]) > 1000 and float(row[9]) > 0
        if labels != "No Finding":
            parts = labels.split("|")
            assert set(parts) <= set(chestxray8.FINDINGS)
            assert parts == sorted(parts, key=chestxray8.FINDINGS.index)


def test_label_mix_and_follow_ups(raw):
    _, table = rows(raw)
    labels = [r[1] for r in table]
    assert "No Finding" in labels
    assert any("|" in label for label in labels)
    visits = defaultdict(list)
    for row in table:
        visits[row[3]].append(int(row[2]))
    assert any(len(v) > 1 for v in visits.values())
    assert all(sorted(v) == list(range(len(v))) for v in visits.values())


def test_images_match_table_and_folders(raw):
    root = raw / "chestxray8"
    files = {p.name: p for p in root.glob("images_*/images/*.png")}
    _, table = rows(raw)
    assert set(files) == {r[0] for r in table}
    folders = sorted({p.parent.parent.name for p in files.values()})
    assert len(folders) >= 2 and all(re.fullmatch(r"images_\d{3}", f) for f in folders)
    modes = [Image.open(p).mode for p in files.values()]
    assert modes.count("RGBA") == 1 and modes.count("L") == len(modes) - 1
    assert {Image.open(p).size for p in files.values()} == {(128, 128)}


def test_official_lists_are_patient_disjoint(raw):
    root = raw / "chestxray8"
    train_val = (root / "train_val_list.txt").read_text().split()
    test = (root / "test_list.txt").read_text().split()
    _, table = rows(raw)
    assert train_val and test
    assert sorted(train_val + test) == sorted(r[0] for r in table)
    patient = {r[0]: r[3] for r in table}
    assert not {patient[n] for n in train_val} & {patient[n] for n in test}


def _render(labels: list[str], size: str = "small") -> np.ndarray:
    job = Job("00000007_001.png", ("x.png",), {"labels": labels, "patient": 7, "rgba": False})
    image = Image.open(BytesIO(chestxray8.render(job, size, 0)["x.png"]))
    return np.asarray(image.resize((64, 64), Image.BILINEAR), np.float32) / 255


def test_every_finding_is_visible_at_64_px():
    """Each finding's pattern changes the film of the same patient, seen at training size."""
    normal = _render([])
    for finding in chestxray8.FINDINGS:
        changed = np.abs(_render([finding]) - normal) > 0.1
        assert changed.sum() >= 25, finding


def test_follow_ups_share_anatomy():
    a, b = _render([]), _render([])
    assert np.abs(a - b).mean() < 0.03  # same patient, only noise differs
