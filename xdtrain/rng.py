"""Seeded random streams keyed by names, so each decision has its own reproducible stream."""

from __future__ import annotations

import zlib

import numpy as np


def rng_for(seed: int, *parts: str | int) -> np.random.Generator:
    """An independent, reproducible random stream for ``(seed, *parts)``."""
    words = [seed & 0xFFFFFFFF]
    for part in parts:
        words.append(zlib.crc32(part.encode()) if isinstance(part, str) else int(part) & 0xFFFFFFFF)
    return np.random.default_rng(words)
