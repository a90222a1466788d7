"""What every synthetic data set shares: the plan/render split, seeded randomness, encoders.

A generator first *plans* its data set from the seed alone (which files exist, every label,
every CSV row), then *renders* each planned item into file bytes. Rendering an item depends
only on the seed and the item's key, so items render in any order, in parallel, and a killed
run resumes by rendering only the items whose files are missing.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass, field
from typing import Any, Protocol

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SIZES = ("small", "full")


@dataclass(frozen=True)
class Job:
    """One item to render: its key, the files it writes (relative paths) and its parameters."""

    key: str
    files: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass
class Plan:
    """A whole data set: items to render and small files (CSV, lists) written at the end."""

    jobs: list[Job]
    extra_files: dict[str, bytes]


class Generator(Protocol):
    """A synthetic data set: one module per data set implements these two functions."""

    name: str
    count_help: str

    def plan(self, size: str, seed: int, count: int | None) -> Plan: ...

    def render(self, job: Job, size: str, seed: int) -> dict[str, bytes]: ...


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: int = 6) -> np.ndarray:
    """Smooth random field with roughly ``cells`` blobs along each axis, scaled to [-1, 1].

    A coarse random grid is upsampled with cubic splines one axis at a time (a separable
    tensor product), which costs a few multiply-adds per voxel even for 512x512x200 volumes.
    """
    coarse = rng.standard_normal(tuple(max(2, min(cells, s)) for s in shape))
    field_ = coarse
    for axis, size in enumerate(shape):
        matrix = _upsampling_matrix(size, coarse.shape[axis])
        field_ = np.moveaxis(np.tensordot(matrix, field_, axes=(1, axis)), 0, axis)
    field_ = field_.astype(np.float32)
    peak = float(np.abs(field_).max()) or 1.0
    return field_ / peak


def _upsampling_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) matrix of cubic-spline upsampling, column i the response to sample i."""
    eye = np.eye(n_in)
    columns = [
        ndimage.zoom(eye[i], n_out / n_in, order=3, mode="mirror", grid_mode=True)[:n_out]
        for i in range(n_in)
    ]
    return np.stack(columns, axis=1)


def ellipse(shape: tuple[int, int], center, radii, angle: float = 0.0) -> np.ndarray:
    """Boolean 2-D ellipse; ``center`` and ``radii`` in pixels (row, col), ``angle`` in radians."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    dy, dx = yy - center[0], xx - center[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dy + s * dx, -s * dy + c * dx
    return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 <= 1.0


def ellipsoid(shape: tuple[int, int, int], center, radii, wobble: np.ndarray | None = None):
    """Boolean 3-D ellipsoid; ``wobble`` (same shape, ~[-1, 1]) roughens its surface.

    Distances are computed only inside the ellipsoid's bounding box: large volumes hold many
    small ellipsoids.
    """
    reach = 1.0 if wobble is None else 1.12  # sqrt(1.25): the largest wobbled radius
    box = tuple(
        slice(max(0, int(np.floor(c - r * reach))), min(s, int(np.ceil(c + r * reach)) + 1))
        for s, c, r in zip(shape, center, radii, strict=True)
    )
    out = np.zeros(shape, bool)
    if any(b.start >= b.stop for b in box):
        return out
    grids = np.ogrid[box]
    dist = sum(
        ((g.astype(np.float32) - c) / r) ** 2 for g, c, r in zip(grids, center, radii, strict=True)
    )
    level = 1.0 if wobble is None else 1.0 + 0.25 * wobble[box]
    out[box] = dist <= level
    return out


# --------------------------------------------------------------------------- encoders


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def nifti_bytes(data: np.ndarray, affine: np.ndarray, dtype, compress: bool) -> bytes:
    """A single-file NIfTI-1 image; gzip without a time stamp, so equal input gives equal bytes."""
    image = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    image.set_data_dtype(dtype)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    raw = image.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0) if compress else raw


def polygon_mask(shape: tuple[int, int], points: list[tuple[float, float]]) -> np.ndarray:
    """Boolean mask of a polygon given as (x, y) points."""
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=255)
    return np.asarray(canvas) > 0


def csv_bytes(
    header: list[str] | str, rows: list[list[Any]], trailing_comma: bool = False
) -> bytes:
    """CSV text with ``\\n`` line ends; values must not contain commas or quotes."""
    end = "," if trailing_comma else ""
    head = header if isinstance(header, str) else ",".join(header)
    lines = [head] + [",".join(str(v) for v in row) + end for row in rows]
    return ("\n".join(lines) + "\n").encode()


def lines_bytes(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode() if lines else b""
