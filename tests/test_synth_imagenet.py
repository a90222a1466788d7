from __future__ import annotations

import csv
import re

import numpy as np
from PIL import Image

from xdtrain.synth import imagenet
from xdtrain.synth.common import Job

PER_CLASS = 4  # conftest.COUNTS["imagenet"]


def test_layout_and_synset_mapping(raw):
    root = raw / "imagenet"
    lines = (root / "LOC_synset_mapping.txt").read_text().splitlines()
    wnids = [line.split(" ", 1)[0] for line in lines]
    assert len(lines) == len(imagenet.SYNSETS) and wnids == sorted(wnids)
    assert all(re.fullmatch(r"n\d{8} \S.*", line) for line in lines)
    assert lines[0] == "n01440764 tench, Tinca tinca"
    train = root / "ILSVRC/Data/CLS-LOC/train"
    assert sorted(p.name for p in train.iterdir()) == wnids
    for wnid in wnids:
        files = list((train / wnid).iterdir())
        assert len(files) == PER_CLASS
        assert all(re.fullmatch(rf"{wnid}_\d+\.JPEG", f.name) for f in files)


def test_val_images_and_solution(raw):
    root = raw / "imagenet"
    val = sorted((root / "ILSVRC/Data/CLS-LOC/val").iterdir())
    assert [p.name for p in val] == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, len(val) + 1)]
    wnids = {line.split()[0] for line in (root / "LOC_synset_mapping.txt").read_text().splitlines()}
    with open(root / "LOC_val_solution.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["ImageId", "PredictionString"]
    assert sorted(r["ImageId"] + ".JPEG" for r in rows) == [p.name for p in val]
    for row in rows:
        fields = row["PredictionString"].split()
        assert len(fields) % 5 == 0 and fields[0] in wnids
        x0, y0, x1, y1 = map(int, fields[1:5])
        w, h = Image.open(root / "ILSVRC/Data/CLS-LOC/val" / f"{row['ImageId']}.JPEG").size
        assert 0 <= x0 < x1 < w and 0 <= y0 < y1 < h
    with open(root / "LOC_train_solution.csv", newline="") as fh:
        train_rows = list(csv.DictReader(fh))
    assert train_rows and all(r["ImageId"].split("_")[0] in wnids for r in train_rows)


def test_quirks_of_the_real_release(raw):
    modes, pngs = [], []
    for path in (raw / "imagenet/ILSVRC/Data/CLS-LOC").rglob("*.JPEG"):
        head = path.read_bytes()[:8]
        if head.startswith(b"\x89PNG"):
            pngs.append(path.name)
            continue
        assert head.startswith(b"\xff\xd8"), path
        modes.append(Image.open(path).mode)
    assert len(pngs) == 1
    assert modes.count("CMYK") == 1 and modes.count("L") == 1
    assert set(modes) == {"RGB", "CMYK", "L"}


def test_shape_is_inside_its_box(raw):
    """The box in LOC_val_solution.csv frames the drawn object: pixels differ inside it."""
    root = raw / "imagenet"
    with open(root / "LOC_val_solution.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    x0, y0, x1, y1 = map(int, row["PredictionString"].split()[1:5])
    pixels = np.asarray(Image.open(root / f"ILSVRC/Data/CLS-LOC/val/{row['ImageId']}.JPEG"))
    inside = pixels[y0 : y1 + 1, x0 : x1 + 1].reshape(-1, 3).std(axis=0).mean()
    outside = np.concatenate([pixels[:, :x0].reshape(-1, 3), pixels[:, x1 + 1 :].reshape(-1, 3)])
    assert inside > outside.std(axis=0).mean()


def _downsampled(job: Job) -> np.ndarray:
    data = imagenet.render(job, "small", 0)[job.files[0]]
    from io import BytesIO

    image = Image.open(BytesIO(data)).convert("L").resize((64, 64), Image.BILINEAR)
    return np.asarray(image, np.float32) / 255


def test_content_decides_the_class():
    """The same scene drawn as another class differs visibly at 64 px, the demo's training size."""
    params = {"w": 112, "h": 96, "cx": 56.0, "cy": 48.0, "r": 30.0, "angle": 0.3, "quirk": ""}
    images = [_downsampled(Job("x", ("x.JPEG",), {**params, "label": k})) for k in range(10)]
    for a in range(10):
        for b in range(a + 1, 10):
            changed = np.abs(images[a] - images[b]) > 0.1
            assert changed.mean() > 0.03, (a, b)
    assert len({imagenet.class_design(k) for k in range(10)}) == 10
