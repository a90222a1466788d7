"""Checkpoints: everything a run needs to continue exactly, written atomically.

A checkpoint holds tensors and plain Python values only (``weights_only=True`` loads it, so
nothing unpickles arbitrary objects): model, optimiser, scheduler and grad-scaler states,
the position (epoch, step in epoch, global step), the RNG states, the counters, and the
resolved config.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch

from xdtrain.errors import UserError, first_line
from xdtrain.fileio import atomic_write


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(),
        "python": _python_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state():
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def _python_state():
    version, internal, gauss = random.getstate()
    return (version, torch.tensor(internal, dtype=torch.int64), gauss)


def save(path: Path, state: dict) -> Path:
    """Write ``state`` to ``path`` through a temporary file, fsync and rename."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return atomic_write(path, buffer.getvalue())


def load(path: Path) -> dict:
    """Read a checkpoint; one-line errors for a missing or damaged file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint; check the run folder")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"{path}: damaged checkpoint ({first_line(exc, 160)}); delete it to restart from "
            "the one before, or start over with --force"
        ) from None
