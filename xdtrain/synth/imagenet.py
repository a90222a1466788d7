"""Synthetic ImageNet-1k in the Kaggle layout (imagenet-object-localization-challenge).

::

    LOC_synset_mapping.txt          "<wnid> <names>" per line, in label order
    LOC_val_solution.csv            ImageId,PredictionString ("<wnid> x0 y0 x1 y1" per box),
                                    rows in no particular order
    LOC_train_solution.csv          the same for the train images that have boxes
    ILSVRC/Data/CLS-LOC/train/<wnid>/<wnid>_<n>.JPEG
    ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_<8 digits>.JPEG

Each class is a shape (disk, square, triangle, ring, cross) filled plainly or with stripes,
drawn at a random place, size, angle and colour on a smooth random background. Quirks of the
real release: one CMYK JPEG, one greyscale JPEG and one PNG file named ``.JPEG`` in train.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from xdtrain.rng import rng_for
from xdtrain.synth.common import (
    Job,
    Plan,
    csv_bytes,
    jpeg_bytes,
    lines_bytes,
    png_bytes,
    polygon_mask,
    smooth_noise,
)

name = "imagenet"
count_help = "training images per class"

# The first ten synsets of ImageNet-1k, in the official label order.
SYNSETS = [
    ("n01440764", "tench, Tinca tinca"),
    ("n01443537", "goldfish, Carassius auratus"),
    (
        "n01484850",
        "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias",
    ),
    ("n01491361", "tiger shark, Galeocerdo cuvieri"),
    ("n01494475", "hammerhead, hammerhead shark"),
    ("n01496331", "electric ray, crampfish, numbfish, torpedo"),
    ("n01498041", "stingray"),
    ("n01514668", "cock"),
    ("n01514859", "hen"),
    ("n01518878", "ostrich, Struthio camelus"),
]
SHAPES = ("disk", "square", "triangle", "ring", "cross")
FILLS = ("plain", "stripes")
# Where the quirks of the real release sit: (class index, image number within the class).
QUIRKS = {(0, 0): "cmyk", (1, 0): "grey", (2, 0): "png"}

SIZE = {"small": ((80, 128), (64, 112), 16), "full": ((340, 500), (280, 400), 100)}
ROOT = "ILSVRC/Data/CLS-LOC"


def class_design(label: int) -> tuple[str, str]:
    """The shape and fill that make class ``label`` recognisable."""
    return SHAPES[label % len(SHAPES)], FILLS[(label // len(SHAPES)) % len(FILLS)]


def _draw_params(rng: np.random.Generator, size: str) -> dict:
    (wlo, whi), (hlo, hhi), _ = SIZE[size]
    w, h = int(rng.integers(wlo, whi + 1)), int(rng.integers(hlo, hhi + 1))
    r = float(rng.uniform(0.22, 0.38)) * min(w, h)
    return {
        "w": w,
        "h": h,
        "cx": float(rng.uniform(r, w - r)),
        "cy": float(rng.uniform(r, h - r)),
        "r": r,
        "angle": float(rng.uniform(0, 2 * math.pi)),
    }


def shape_outline(shape: str, cx: float, cy: float, r: float, angle: float):
    """Polygon (x, y) points of a shape; disks and rings are 48-gons."""

    def turn(points):
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + c * x - s * y, cy + s * x + c * y) for x, y in points]

    if shape in ("disk", "ring"):
        return turn(
            [
                (r * math.cos(t), r * math.sin(t))
                for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)
            ]
        )
    if shape == "square":
        a = r * 0.85
        return turn([(-a, -a), (a, -a), (a, a), (-a, a)])
    if shape == "triangle":
        return turn(
            [
                (r * math.cos(t), r * math.sin(t))
                for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
            ]
        )
    if shape == "cross":
        a, b = r, r * 0.35
        return turn(
            [
                (-b, -a),
                (b, -a),
                (b, -b),
                (a, -b),
                (a, b),
                (b, b),
                (b, a),
                (-b, a),
                (-b, b),
                (-a, b),
                (-a, -b),
                (-b, -b),
            ]
        )
    raise ValueError(f"unknown shape {shape!r}")


def bounding_box(job_params: dict, label: int) -> tuple[int, int, int, int]:
    shape, _ = class_design(label)
    p = job_params
    pts = np.array(shape_outline(shape, p["cx"], p["cy"], p["r"], p["angle"]))
    x0, y0 = np.floor(pts.min(axis=0)).astype(int)
    x1, y1 = np.ceil(pts.max(axis=0)).astype(int)
    return max(0, x0), max(0, y0), min(p["w"] - 1, x1), min(p["h"] - 1, y1)


def plan(size: str, seed: int, count: int | None) -> Plan:
    per_class = count if count is not None else SIZE[size][2]
    val_per_class = max(2, per_class // 4)
    rng = rng_for(seed, name, "plan")
    jobs: list[Job] = []
    train_rows, val_rows = [], []
    for label, (wnid, _) in enumerate(SYNSETS):
        numbers = np.sort(rng.choice(np.arange(1, 20 * per_class + 50), per_class, replace=False))
        for i, n in enumerate(numbers):
            image_id = f"{wnid}_{int(n)}"
            params = {
                "label": label,
                **_draw_params(rng, size),
                "quirk": QUIRKS.get((label, i), ""),
            }
            jobs.append(Job(image_id, (f"{ROOT}/train/{wnid}/{image_id}.JPEG",), params))
            if i % 2 == 0:  # like the real release, only some train images have boxes
                train_rows.append([image_id, _prediction(wnid, params, label)])
    val_labels = np.repeat(np.arange(len(SYNSETS)), val_per_class)
    rng.shuffle(val_labels)
    for i, label in enumerate(val_labels.tolist()):
        image_id = f"ILSVRC2012_val_{i + 1:08d}"
        params = {"label": label, **_draw_params(rng, size), "quirk": ""}
        jobs.append(Job(image_id, (f"{ROOT}/val/{image_id}.JPEG",), params))
        val_rows.append([image_id, _prediction(SYNSETS[label][0], params, label)])
    header = ["ImageId", "PredictionString"]
    extra = {
        "LOC_synset_mapping.txt": lines_bytes([f"{w} {n}" for w, n in SYNSETS]),
        "LOC_val_solution.csv": csv_bytes(header, _unsorted(val_rows, rng)),
        "LOC_train_solution.csv": csv_bytes(header, train_rows),
    }
    return Plan(jobs, extra)


def _unsorted(rows: list, rng: np.random.Generator) -> list:
    """The release lists val images in no particular order; readers must not rely on one."""
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def _prediction(wnid: str, params: dict, label: int) -> str:
    x0, y0, x1, y1 = bounding_box(params, label)
    return f"{wnid} {x0} {y0} {x1} {y1}"


def render(job: Job, size: str, seed: int) -> dict[str, bytes]:
    p = job.params
    rng = rng_for(seed, name, job.key)
    w, h = p["w"], p["h"]
    base = rng.uniform(40, 215, size=3).astype(np.float32)
    tint = rng.uniform(20, 60, size=3).astype(np.float32)
    grain = 6 * rng.standard_normal((h, w, 3), dtype=np.float32)  # sensor noise, everywhere
    background = base + tint * np.stack([smooth_noise(rng, (h, w), 4) for _ in range(3)], -1)
    shape, fill = class_design(p["label"])
    mask = polygon_mask((h, w), shape_outline(shape, p["cx"], p["cy"], p["r"], p["angle"]))
    if shape == "ring":
        inner = shape_outline("disk", p["cx"], p["cy"], p["r"] * 0.55, p["angle"])
        mask &= ~polygon_mask((h, w), inner)
    colour = (base + rng.choice([-1, 1], size=3) * rng.uniform(90, 140, size=3)) % 256
    luma = np.array([0.299, 0.587, 0.114], np.float32)
    if abs(float((colour - base) @ luma)) < 60:  # keep the shape visible in greyscale too
        colour = colour * 0.35 if float(base @ luma) > 127 else 255 - (255 - colour) * 0.35
    foreground = np.broadcast_to(colour.astype(np.float32), (h, w, 3))
    if fill == "stripes":
        yy, xx = np.ogrid[0:h, 0:w]
        period = max(6.0, p["r"] / 2.5)
        theta = float(rng.uniform(0, math.pi))
        phase = (xx * math.cos(theta) + yy * math.sin(theta)) * (2 * math.pi / period)
        wave = np.sin(phase.astype(np.float32)) > 0
        foreground = np.where(wave[..., None], foreground, 255 - foreground)
    pixels = np.where(mask[..., None], foreground, background) + grain
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    (path,) = job.files
    if p["quirk"] == "cmyk":
        return {path: jpeg_bytes(image.convert("CMYK"), quality=90)}
    if p["quirk"] == "grey":
        return {path: jpeg_bytes(image.convert("L"), quality=90)}
    if p["quirk"] == "png":
        return {path: png_bytes(image)}
    return {path: jpeg_bytes(image, quality=90)}
