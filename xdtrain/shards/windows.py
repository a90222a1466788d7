"""CT intensity windows, and one slice in Hounsfield units to the image a shard stores.

A window ``(low, high)`` in HU maps ``low`` to 0 and ``high`` to the top of the stored range,
clipping outside: the radiologist's window of centre ``(low + high) / 2`` and width
``high - low``. Several windows give a channel each (soft tissue, lung, bone: what a reader
flips between), so a 3-channel encoder sees three views of one slice.
"""

from __future__ import annotations

import numpy as np

from xdtrain.errors import UserError
from xdtrain.shards.base import float_pair, quantise

# (low, high) in HU, from the usual centre/width presets: soft tissue L40 W400, lung L-600
# W1500, bone L400 W1800, brain L40 W80, liver L60 W160, mediastinum L50 W350.
PRESETS: dict[str, tuple[float, float]] = {
    "soft": (-160.0, 240.0),
    "lung": (-1350.0, 150.0),
    "bone": (-500.0, 1300.0),
    "brain": (0.0, 80.0),
    "liver": (-20.0, 140.0),
    "mediastinum": (-125.0, 225.0),
}
EXAMPLE = "soft/lung/bone, or -160,240, or -1350,150/soft"


def parse_windows(text: str) -> list[tuple[float, float]]:
    """``"soft/lung/bone"`` or ``"-160,240"`` (``/`` between windows) -> [(low, high), …].

    One window gives greyscale images; three give a 3-channel stack. Raises
    :class:`UserError` for anything else (two windows, an unknown preset, low >= high).
    """
    windows = []
    for item in text.split("/"):
        item = item.strip()
        if item in PRESETS:
            windows.append(PRESETS[item])
            continue
        try:  # the parsing (and checks) of every low,high option
            low, high = float_pair(item, "--windows", EXAMPLE)
        except UserError:
            raise UserError(
                f"--windows {text}: {item!r} is neither a preset ({', '.join(PRESETS)}) nor "
                f"low,high in HU with low below high; e.g. {EXAMPLE}"
            ) from None
        windows.append((low, high))
    if len(windows) not in (1, 3):
        raise UserError(
            f"--windows {text}: give one window (greyscale) or three (a 3-channel stack), "
            f"not {len(windows)}"
        )
    return windows


def square(plane: np.ndarray, fill: float) -> np.ndarray:
    """Pad the shorter side of an HxW plane with ``fill`` (centred) to make it square, so
    resizing never distorts anatomy."""
    rows, cols = plane.shape
    side = max(rows, cols)
    if rows == cols:
        return plane
    out = np.full((side, side), fill, plane.dtype)
    top, left = (side - rows) // 2, (side - cols) // 2
    out[top : top + rows, left : left + cols] = plane
    return out


def resize(plane: np.ndarray, size: int) -> np.ndarray:
    """A square float32 plane to ``size`` x ``size``: area averaging when shrinking (no
    aliasing of thin bone), bilinear when enlarging (OpenCV's ``INTER_AREA``/``INTER_LINEAR``)."""
    import cv2

    if plane.shape[0] == size:
        return plane
    interpolation = cv2.INTER_AREA if plane.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(plane, (size, size), interpolation=interpolation)


def render(
    values: np.ndarray, windows: list[tuple[float, float]], size: int, bits: int, fill: float
) -> np.ndarray:
    """One slice (HxW float, HU for CT) to ``size``x``size`` uint8/uint16: one channel per
    window (HxW for one window, HxWx3 for three).

    The plane is padded square with ``fill`` (air, -1024 HU, for CT), resized in HU, then
    windowed: resizing before windowing keeps small bright structures from being clipped first.
    """
    plane = resize(square(np.asarray(values, np.float32), fill), size)
    channels = [quantise((plane - low) / (high - low), bits) for low, high in windows]
    return channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)
