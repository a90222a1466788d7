"""Shared fixtures: one small copy of every synthetic data set per test session."""

from __future__ import annotations

import os

import pytest

from xdtrain.synth import generate

# Small but complete: every quirk and every label appears at these counts.
COUNTS = {"imagenet": 4, "chestxray8": 60, "brats": 3, "lits": 3, "lits-nifti": 3}


@pytest.fixture(scope="session", autouse=True)
def pseudonym_key(tmp_path_factory):
    """Every test (and the commands it starts) keeps its pseudonym key in a temporary folder,
    never in the user's ~/.config."""
    from xdtrain.shards.pseudonyms import KEY_ENV

    path = tmp_path_factory.mktemp("key") / "pseudonym.key"
    os.environ[KEY_ENV] = str(path)
    return path


@pytest.fixture(scope="session")
def raw(tmp_path_factory):
    """Root folder holding ``<name>/`` for every synthetic data set (seed 0, size small)."""
    root = tmp_path_factory.mktemp("raw")
    for name, count in COUNTS.items():
        generate(name, root, size="small", seed=0, count=count)
    return root


# Shard folders of every data set, packed from ``raw`` into small shards (several per split).
PACK_ARGS = {
    "imagenet": ("imagenet", "imagenet", ["--shard-size", "20KB"]),
    "chestxray8": ("chestxray8", "chestxray8", ["--shard-size", "20KB", "--size", "64"]),
    "brats": ("brats", "brats", ["--shard-size", "60KB"]),
    "lits": ("lits", "lits", ["--shard-size", "20KB"]),
    "lits-nifti": ("lits", "lits-nifti", ["--shard-size", "20KB"]),
}


@pytest.fixture(scope="session")
def packed(raw, tmp_path_factory):
    """``{name: shard folder}`` for every entry of :data:`PACK_ARGS`."""
    from xdtrain.shards.cli import main

    root = tmp_path_factory.mktemp("shards")
    folders = {}
    for name, (dataset, src, extra) in PACK_ARGS.items():
        out = root / name
        argv = ["--dataset", dataset, "--src", str(raw / src), "--out", str(out), "--quiet"]
        assert main(argv + ["--workers", "1", *extra]) == 0
        folders[name] = out
    return folders


@pytest.fixture(scope="session")
def grid_runs(packed, tmp_path_factory):
    """A SimCLR run and LiTS runs from scratch and from its encoder, two seeds each (one
    epoch of 4-sample batches at 32 px: tiny runs for xd-eval, xd-report and xd-analyze)."""
    from helpers import demo_args

    from xdtrain.train import main as train_main

    def tiny(config, shards, run, *extra):
        return [*demo_args(config, shards, run, "data.batch_size=4", "train.epochs=1"), *extra]

    root = tmp_path_factory.mktemp("runs")
    pre = root / "pt"
    assert train_main(tiny("pt_simclr_imagenet.yaml", packed["imagenet"], pre)) == 0
    for seed in (0, 1):
        scratch = tiny(
            "ft_lits.yaml", packed["lits"], root / f"scratch{seed}", "--set", f"run.seed={seed}"
        )
        assert train_main(scratch) == 0
        weights = [
            "--set",
            f"model.encoder_weights={pre / 'encoder.pt'}",
            "--set",
            f"run.seed={seed}",
        ]
        assert train_main(tiny("ft_lits.yaml", packed["lits"], root / f"pre{seed}", *weights)) == 0
    return root


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A single-node Slurm cluster (``tools/slurm_local.py``) for the session; its
    ``SLURM_CONF`` is set for the tests and the commands they start. Skipped, with the reason,
    where Slurm cannot start; with ``XD_REQUIRE_SLURM=1`` (CI) that is a failure instead."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import slurm_local

    root = tmp_path_factory.mktemp("slurm")
    try:
        env = slurm_local.start(root)
    except slurm_local.Unavailable as exc:
        if os.environ.get("XD_REQUIRE_SLURM") == "1":
            pytest.fail(f"Slurm did not start: {exc}")
        pytest.skip(f"no local Slurm: {exc}")
    before = os.environ.get("SLURM_CONF")
    os.environ.update(env)
    yield env
    slurm_local.stop(root)
    if before is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = before
