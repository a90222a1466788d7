"""What a run leaves behind besides checkpoints: ``metrics.jsonl``, TensorBoard events,
``env.json`` and the learning-curve plot. Only rank 0 writes.

TensorBoard gets every number of ``metrics.jsonl`` as a scalar (``<kind>/<name>``), the
validation figures as images (:meth:`RunLog.figures`) and, at the end, the run's
hyperparameters with its final scores (:meth:`RunLog.hparams`, TensorBoard's HParams tab);
with ``run.mlflow``, MLflow gets the same (:mod:`xdtrain.mlflow_log`).

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
    def __init__(self, run_dir: Path, keep_until_step: int | None = None, mlflow=None):
        self.run_dir = Path(run_dir)
        self.mlflow = mlflow  # an xdtrain.mlflow_log.MlflowLog, or None
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
        numbers = {
            key: value
            for key, value in row.items()
            if key not in ("kind", "epoch", "step", "time")
            and isinstance(value, int | float)
            and not isinstance(value, bool)
        }
        for key, value in numbers.items():
            self.tb.add_scalar(f"{row['kind']}/{key}", value, row["step"])
        if self.mlflow is not None:
            self.mlflow.metrics(row["kind"], numbers, row["step"])

    def figures(self, paths: dict[str, Path], step: int) -> None:
        """PNG figures (``{tag: path}``) as TensorBoard images at ``step``, and as MLflow
        artifacts under ``figures/step_<step>``."""
        import numpy as np
        from PIL import Image

        for tag, path in paths.items():
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.tb.add_image(tag, pixels, step, dataformats="HWC")
            if self.mlflow is not None:
                self.mlflow.artifact(Path(path), f"figures/step_{step}")

    def hparams(self, params: dict[str, object], scores: dict[str, float]) -> None:
        """The run's hyperparameters (``{name: int, float, str or bool}``) with its final
        scores (``{scalar tag: value}``, tags already written as scalars) in TensorBoard's
        HParams tab, written to this run's own event file (not a sub-run)."""
        from torch.utils.tensorboard.summary import hparams

        experiment, start, end = hparams(params, scores)
        writer = self.tb._get_file_writer()
        for summary in (experiment, start, end):
            writer.add_summary(summary)

    def sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.tb.flush()

    def close(self, status: str | None = None) -> None:
        """Flush and close; ``status`` (MLflow's FINISHED, KILLED, FAILED) ends the MLflow
        run too."""
        if self.closed:
            return
        self.sync()
        self._fh.close()
        self.tb.close()
        if self.mlflow is not None and status is not None:
            self.mlflow.finish(status)

    @property
    def closed(self) -> bool:
        return self._fh.closed


def flat_params(tree: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as ``{"train.epochs": 50, …}`` with values TensorBoard's and MLflow's
    hyperparameters take: numbers, texts and booleans; lists and None as their text."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flat_params(value, f"{name}.")
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


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
    """``learning_curve.png``: training loss by optimiser step (left axis) and the primary
    validation metric (right axis), one legend for both, titled with the run's name."""
    from xdtrain.plots import _pyplot, _save

    rows = read_metrics(Path(run_dir) / METRICS)
    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train" and r.get("loss")]
    val = [(r["step"], r.get(primary)) for r in rows if r["kind"] == "val"]
    val = [(s, v) for s, v in val if v is not None]
    if not train and not val:
        return None
    fig, ax = _pyplot().subplots(figsize=(6.4, 3.8), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), color="tab:blue", label="train loss (left)")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("train loss (mean over each log interval)", color="tab:blue")
    handles, labels = ax.get_legend_handles_labels()
    if val:
        other = ax.twinx()
        other.plot(
            *zip(*val, strict=True), "o--", color="tab:orange", label=f"val {primary} (right)"
        )
        other.set_ylabel(f"val {primary}", color="tab:orange")
        more = other.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    (other if val else ax).legend(  # below the axes: it hides no point of either curve
        handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8
    )
    ax.set_title(f"{Path(run_dir).name}: learning curve", fontsize=10)
    return _save(fig, Path(out or Path(run_dir) / "learning_curve.png"))
