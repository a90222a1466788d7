"""Shared fixtures: one small copy of every synthetic data set per test session."""

from __future__ import annotations

import pytest

from xdtrain.synth import generate

# Small but complete: every quirk and every label appears at these counts.
COUNTS = {"imagenet": 4, "chestxray8": 60, "brats": 3, "lits": 3, "lits-nifti": 3}


@pytest.fixture(scope="session")
def raw(tmp_path_factory):
    """Root folder holding ``<name>/`` for every synthetic data set (seed 0, size small)."""
    root = tmp_path_factory.mktemp("raw")
    for name, count in COUNTS.items():
        generate(name, root, size="small", seed=0, count=count)
    return root
