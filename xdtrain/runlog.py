"""What a run leaves behind besides checkpoints: ``metrics.jsonl``, TensorBoard events,
``env.json`` and the learning-curve plot. Only rank 0 writes.

``metrics.jsonl`` holds one JSON object per line, each with ``kind`` (``train``, ``val``,
``test``), ``epoch`` and ``step`` (the global optimiser step). A resumed run first drops the
rows written after its checkpoint (and the test row of a run that goes on training), so
every row appears once.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from xdtrain import __version__
from xdtrain.fileio import atomic_write

METRICS = "metrics.jsonl"
PACKAGES = ("torch", "torchvision", "nvidia-dali-cuda120", "webdataset", "numpy", "albumentations")


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a missing value reads as null
    return value


class RunLog:
    def __init__(self, run_dir: Path, keep_until_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS
        if keep_until_step is not None:
            kept = [
                r
                for r in read_metrics(self.path)
                if r.get("step", 0) <= keep_until_step and r.get("kind") != "test"
            ]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(
            str(self.run_dir / "tensorboard"),
            purge_step=keep_until_step + 1 if keep_until_step is not None else None,
        )

    def write(self, row: dict) -> None:
        row = {k: _clean(v) for k, v in row.items()} | {"time": round(time.time(), 3)}
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        for key, value in row.items():
            if key not in ("kind", "epoch", "step", "time") and isinstance(value, int | float):
                self.tb.add_scalar(f"{row['kind']}/{key}", value, row["step"])

    def sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.tb.flush()

    def close(self) -> None:
        self.sync()
        self._fh.close()
        self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    """Rows of a ``metrics.jsonl``; a torn last line (a killed writer) is ignored."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def environment(world_size: int, devices: list[str]) -> dict:
    """Versions, git commit, devices and command line: what ``env.json`` records."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "xdtrain": __version__,
        "packages": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "git": _git(),
        "world_size": world_size,
        "devices": devices,
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _git() -> dict | None:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def plot_curves(run_dir: Path, primary: str, out: Path | None = None) -> Path | None:
    """``learning_curve.png``: training loss by step and the primary validation metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(Path(run_dir) / METRICS)
    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train" and r.get("loss")]
    val = [(r["step"], r.get(primary)) for r in rows if r["kind"] == "val"]
    val = [(s, v) for s, v in val if v is not None]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss", color="tab:blue")
    if val:
        other = ax.twinx()
        other.plot(*zip(*val, strict=True), "o-", color="tab:orange", label=f"val {primary}")
        other.set_ylabel(f"val {primary}", color="tab:orange")
    ax.set_title(Path(run_dir).name)
    fig.tight_layout()
    target = Path(out or Path(run_dir) / "learning_curve.png")
    tmp = target.with_name(f".{target.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, target)
    return target
