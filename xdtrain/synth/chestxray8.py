"""Synthetic NIH ChestX-ray8 (ChestX-ray14) in its release layout.

::

    Data_Entry_2017.csv      Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,...
    train_val_list.txt       image names, one per line (patient-disjoint from test_list.txt)
    test_list.txt
    images_001/images/<patient:08d>_<follow-up:03d>.png   8-bit greyscale (one RGBA, as in
    images_002/images/...                                  the real release)

A frontal chest film: body, two dark lung fields with ribs, spine, heart and diaphragm, whose
anatomy is fixed per patient (follow-ups look alike). Each of the 14 findings adds its own
visible pattern; ``No Finding`` images carry none. Labels in ``Finding Labels`` are joined
by ``|`` in the order of :data:`FINDINGS`.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from scipy import ndimage

from xdtrain.rng import rng_for
from xdtrain.synth.common import Job, Plan, csv_bytes, ellipse, lines_bytes, png_bytes
from xdtrain.synth.common import smooth_noise as noise

name = "chestxray8"
count_help = "images"

FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
SIZE = {"small": (128, 300), "full": (1024, 1000)}
TEST_SHARE = 0.2
RGBA_INDEX = 2  # the image (in name order) stored as RGBA, like a few in the real release


def plan(size: str, seed: int, count: int | None) -> Plan:
    total = count if count is not None else SIZE[size][1]
    rng = rng_for(seed, name, "plan")
    rows, test_patients = [], set()
    patient = 0
    while len(rows) < total:
        patient += 1
        visits = min(int(rng.geometric(0.45)), 6, total - len(rows))
        age, gender = int(rng.integers(12, 90)), str(rng.choice(["M", "F"]))
        if rng.random() < TEST_SHARE:
            test_patients.add(patient)
        for visit in range(visits):
            rows.append(_row(rng, patient, visit, age, gender))
    # Both lists must be non-empty whatever the count.
    ids = sorted({r["patient"] for r in rows})
    if len(ids) > 1 and not test_patients & set(ids):
        test_patients.add(ids[-1])
    if set(ids) <= test_patients and len(ids) > 1:
        test_patients.discard(ids[0])
    rows.sort(key=lambda r: r["image"])
    n_folders = min(12, max(3, math.ceil(len(rows) / 10000)))
    per_folder = math.ceil(len(rows) / n_folders)
    jobs = []
    for i, row in enumerate(rows):
        folder = f"images_{i // per_folder + 1:03d}/images"
        params = {"labels": row["labels"], "patient": row["patient"], "rgba": i == RGBA_INDEX}
        jobs.append(Job(row["image"], (f"{folder}/{row['image']}",), params))
    table = [
        [
            r["image"],
            "|".join(r["labels"]) or NO_FINDING,
            r["visit"],
            r["patient"],
            r["age"],
            r["gender"],
            r["view"],
            r["width"],
            r["height"],
            r["spacing"],
            r["spacing"],
        ]
        for r in rows
    ]
    test = [r["image"] for r in rows if r["patient"] in test_patients]
    train_val = [r["image"] for r in rows if r["patient"] not in test_patients]
    extra = {
        "Data_Entry_2017.csv": csv_bytes(HEADER, table, trailing_comma=True),
        "train_val_list.txt": lines_bytes(train_val),
        "test_list.txt": lines_bytes(test),
    }
    return Plan(jobs, extra)


def _row(rng: np.random.Generator, patient: int, visit: int, age: int, gender: str) -> dict:
    labels: list[str] = []
    if rng.random() > 0.4:
        k = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
        picked = set(rng.choice(len(FINDINGS), size=k, replace=False).tolist())
        labels = [f for i, f in enumerate(FINDINGS) if i in picked]
    width = int(rng.integers(2000, 3056))
    return {
        "image": f"{patient:08d}_{visit:03d}.png",
        "labels": labels,
        "visit": visit,
        "patient": patient,
        "age": min(age + visit, 95),
        "gender": gender,
        "view": str(rng.choice(["PA", "AP"], p=[0.6, 0.4])),
        "width": width,
        "height": int(width + rng.integers(-200, 200)),
        "spacing": str(rng.choice(["0.143", "0.139", "0.168"])),
    }


def _anatomy(seed: int, patient: int) -> dict:
    rng = rng_for(seed, name, "patient", patient)
    return {
        "lung_w": rng.uniform(0.13, 0.16),
        "lung_h": rng.uniform(0.27, 0.32),
        "lung_y": rng.uniform(0.42, 0.47),
        "heart": rng.uniform(0.10, 0.12),
        "body": rng.uniform(0.5, 0.6),
        "shift": rng.uniform(-0.02, 0.02),
    }


def render(job: Job, size: str, seed: int) -> dict[str, bytes]:
    s = SIZE[size][0]
    rng = rng_for(seed, name, job.key)
    a = _anatomy(seed, job.params["patient"])
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    img = np.full((s, s), 0.04, np.float32)
    body = ellipse((s, s), (0.56 * s, (0.5 + a["shift"]) * s), (0.52 * s, 0.46 * s))
    img[body] = a["body"] + 0.05 * noise(rng, (s, s), 5)[body]
    cx = 0.5 + a["shift"]
    lungs = []
    for side in (-1, 1):
        lung = ellipse(
            (s, s), (a["lung_y"] * s, (cx + side * 0.18) * s), (a["lung_h"] * s, a["lung_w"] * s)
        )
        lung &= yy < a["lung_y"] + 0.2 + 0.05 * np.cos((xx - cx) * 8)  # the diaphragm dome
        lungs.append(lung)
    lung_l, lung_r = lungs
    both = lung_l | lung_r
    ribs = 0.05 * (np.sin(yy * 2 * math.pi * 9 + np.abs(xx - cx) * 6) > 0.6)
    img[both] = 0.2 + ribs[both]
    spine = np.abs(xx - cx) < 0.03
    img[spine & body] = 0.7
    heart_r = a["heart"]
    labels = set(job.params["labels"])
    if "Cardiomegaly" in labels:
        heart_r *= 1.7
    heart = ellipse(
        (s, s), ((a["lung_y"] + 0.13) * s, (cx + 0.04) * s), (heart_r * 0.9 * s, heart_r * s)
    )
    img[heart & body] = 0.66
    _findings(img, labels, rng, s, xx, yy, cx, a, lung_l, lung_r)
    img += rng.normal(0, 0.015, img.shape).astype(np.float32)
    pixels = np.clip(img * 255, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "L")
    if job.params["rgba"]:
        image = image.convert("RGBA")
    return {job.files[0]: png_bytes(image)}


def _findings(img, labels, rng, s, xx, yy, cx, a, lung_l, lung_r) -> None:
    """Draw each finding's pattern into ``img`` (in place)."""
    both = lung_l | lung_r
    side = [lung_l, lung_r][int(rng.integers(0, 2))]
    rows, cols = np.nonzero(side)
    top, bottom = rows.min() / s, rows.max() / s
    left, right = cols.min() / s, cols.max() / s
    if "Emphysema" in labels:  # hyperlucent lungs with sparse vessels
        img[both] = np.minimum(img[both], 0.08)
    if "Atelectasis" in labels:  # a dense horizontal plate in the lower lung
        band = side & (np.abs(yy - (bottom - 0.08)) < 0.025)
        img[band] = 0.75
    if "Effusion" in labels:  # fluid filling the lung base, meniscus on top
        level = bottom - 0.12 + 0.03 * np.cos((xx - (left + right) / 2) * 12)
        img[side & (yy > level)] = 0.8
    if "Infiltration" in labels:  # diffuse patchy opacity over both lungs
        blot = noise(rng, (s, s), 12) > 0.25
        img[both & blot] += 0.3
    if "Mass" in labels:  # one large round opacity
        cy_, cx_ = rng.uniform(top + 0.1, bottom - 0.1), rng.uniform(left + 0.05, right - 0.05)
        img[ellipse((s, s), (cy_ * s, cx_ * s), (0.075 * s, 0.075 * s))] = 0.9
    if "Nodule" in labels:  # several small round opacities
        for _ in range(5):
            cy_ = rng.uniform(top + 0.05, bottom - 0.05)
            cx_ = rng.uniform(left + 0.02, right - 0.02)
            img[ellipse((s, s), (cy_ * s, cx_ * s), (0.028 * s, 0.028 * s))] = 0.95
    if "Pneumonia" in labels:  # a cloudy consolidation in the mid lung, soft edges
        cloud = ellipse(
            (s, s), ((top + bottom) / 2 * s, (left + right) / 2 * s), (0.09 * s, 0.06 * s)
        )
        img[cloud] = 0.55 + 0.15 * noise(rng, (s, s), 10)[cloud]
    if "Pneumothorax" in labels:  # black rim of free air along the lateral lung edge
        edge = side & ~ellipse(
            (s, s),
            ((top + bottom) / 2 * s, (left + right) / 2 * s),
            ((bottom - top) / 2 * 0.8 * s, (right - left) / 2 * 0.55 * s),
        )
        img[edge] = 0.0
    if "Consolidation" in labels:  # the upper lobe uniformly white
        img[side & (yy < top + 0.15)] = 0.85
    if "Edema" in labels:  # perihilar butterfly haze with horizontal septal lines
        hilum = both & (np.abs(xx - cx) < 0.2) & (np.abs(yy - a["lung_y"]) < 0.12)
        lines = np.sin(yy * 2 * math.pi * 30) > 0.7
        img[hilum] = 0.5 + 0.25 * lines[hilum]
    if "Fibrosis" in labels:  # a coarse reticular net in the upper zones
        net = (np.sin(xx * 2 * math.pi * 22) > 0.8) | (np.sin(yy * 2 * math.pi * 22) > 0.8)
        upper = both & (yy < a["lung_y"])
        img[upper & net] = 0.8
    if "Pleural_Thickening" in labels:  # a bright band along both outer lung borders
        for lung in (lung_l, lung_r):
            ring = lung & ~_shrink(lung, max(2, int(0.03 * s)))
            img[ring] = 0.9
    if "Hernia" in labels:  # a round gas-filled mass behind the heart, air-fluid level
        center = ((a["lung_y"] + 0.2) * s, cx * s)
        blob = ellipse((s, s), center, (0.07 * s, 0.09 * s))
        img[blob] = 0.85
        img[blob & (yy * s < center[0])] = 0.1


def _shrink(mask: np.ndarray, pixels: int) -> np.ndarray:
    return ndimage.binary_erosion(mask, iterations=pixels)
