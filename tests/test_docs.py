"""The documentation stays true: the config reference is generated from the schema, and the
short commands of README.md and docs/*.md run as written on generated data."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from xdtrain.config_reference import DOC, reference

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Commands the test does not run, each with the reason; everything else must run.
LONG = [
    (r"^(time )?make ", "runs the demo or the suite itself"),
    (r"/data/", "needs a real data set"),
    (r"torchrun|torch\.distributed\.run", "several processes or GPUs"),
    (r"^xd-train (?!.*--print-config)", "trains for minutes"),
    (r"^xd-queue (?!grid\s)", "runs a grid of trainings"),
    (r"/tmp/bench", "reads the full-size benchmark data"),
    (r"tools/", "a benchmark or the GPU check"),
    (r"--size full", "full-size data takes minutes"),
    (r"^xd-report grid/", "needs the grid's runs"),
]


def test_config_reference_is_generated_from_the_schema():
    assert DOC.read_text() == reference(), (
        "docs/config.md is stale: run `python -m xdtrain.config_reference > docs/config.md`"
    )


def test_every_config_key_has_a_meaning():
    rows = [line for line in reference().splitlines() if line.startswith("| `")]
    assert len(rows) > 40
    for row in rows:
        assert row.rstrip().rstrip("|").split("|")[-1].strip(), row


def commands() -> list[tuple[str, str]]:
    """``(file, command)`` of every ``bash`` block line, continuations joined."""
    found = []
    for path in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#\s.*$", "", line).strip()
                if line and not line.startswith("#"):
                    found.append((path.name, line))
    return found


def long_reason(command: str) -> str | None:
    for pattern, reason in LONG:
        if re.search(pattern, command):
            return reason
    return None


@pytest.fixture(scope="module")
def sandbox(packed, tmp_path_factory):
    """A working folder like a user's after `make demo`: configs, data sets in the real
    layouts, the default shard folders, and small finished runs at the documented paths."""
    from xdtrain.train import main as train_main

    root = tmp_path_factory.mktemp("sandbox")
    os.symlink(ROOT / "configs", root / "configs")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    run = lambda argv: subprocess.run(argv, cwd=root, env=env, check=True, capture_output=True)  # noqa: E731
    run([str(BIN / "xd-synth"), "all", "--out", "datasets", "--quiet"])
    for name in ("imagenet", "chestxray8", "brats", "lits"):
        src = "datasets/lits-nifti" if name == "lits" else f"datasets/{name}"
        run([str(BIN / "xd-shard"), "--dataset", name, "--src", src, "--quiet"])
    tiny = [
        "--set",
        "data.image_size=32",
        "--set",
        "data.batch_size=4",
        "--set",
        "data.workers=1",
        "--set",
        "train.epochs=1",
    ]
    cwd = Path.cwd()
    os.chdir(root)
    try:
        train_main(["configs/demo/pt_simclr_imagenet.yaml", *tiny])
        for task in ("brats", "chestxray8", "lits"):
            train_main(
                [f"configs/demo/ft_{task}.yaml", "--set", f"run.name=ft_{task}_scratch", *tiny]
            )
    finally:
        os.chdir(cwd)
    return root, env


def test_documented_commands_run_as_written(sandbox):
    root, env = sandbox
    ran, skipped = [], []
    for source, command in commands():
        reason = long_reason(command)
        if reason:
            skipped.append((command, reason))
            continue
        argv = shlex.split(command)
        done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{source}: `{command}` failed:\n{done.stderr[-2000:]}"
        ran.append(command)
    assert len(ran) >= 12, ran
    kinds = {c.split()[0] if not c.startswith("python") else " ".join(c.split()[:3]) for c in ran}
    assert {"xd-shard", "xd-synth", "xd-eval", "xd-report", "xd-queue"} <= kinds, kinds
