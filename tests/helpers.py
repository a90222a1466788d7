"""Helpers the end-to-end tests share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# A GPU variant of a test is listed and reported as skipped, with the reason, on a machine
# without CUDA (``pytest -ra`` shows it): it never vanishes from the run silently.
NEEDS_CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: GPU variant not run"
)


def on_gpu(*values):
    """One ``parametrize`` entry that needs CUDA: ``on_gpu("gpu")``, ``on_gpu("dali", "gpu")``."""
    return pytest.param(*values, marks=NEEDS_CUDA)


# DALI pipeline devices: the CPU always, the GPU where there is one
DEVICES = ["cpu", on_gpu("gpu")]


def demo_args(config: str, shards: Path, run: Path, *settings: str) -> list[str]:
    """``xd-train`` arguments for ``configs/demo/<config>`` on ``shards``, written to ``run``,
    shrunk for tests (32 px, one DALI thread, no kNN monitor); ``settings`` are more
    ``KEY=VALUE`` (later ones win). The checkpoints are the library's defaults (last.pt
    every epoch and kept), not the demo's disk budget; no best.pt and no TensorBoard
    figures (their own tests switch them on)."""
    argv = [str(ROOT / "configs" / "demo" / config), "--run-dir", str(run)]
    # the demo's SimCLR configs watch kNN every epoch; the tests of the monitor switch it on
    defaults = (
        f"data.shards={shards}", "data.image_size=32", "data.workers=1", "monitor.every=0",
        "train.checkpoint_epochs=1", "train.keep_last=true", "train.save_best=false",
        "train.figures_every=0",
    )  # fmt: skip
    for setting in (*defaults, *settings):
        argv += ["--set", setting]
    return argv


def fail_at_close(monkeypatch, shards_before_failure: int) -> list[str]:
    """Make the shard writer fail (EIO) when it closes shard number ``shards_before_failure``,
    as a full or failing disk would: the run stops with that many shards recorded. Returns
    the list the names of the shards closed before are added to."""
    from xdtrain.shards import tar

    real_close, closed = tar.ShardWriter.close, []

    def failing_close(self):
        if len(closed) == shards_before_failure:
            raise OSError(5, "Input/output error")
        closed.append(self.path.name)
        return real_close(self)

    monkeypatch.setattr(tar.ShardWriter, "close", failing_close)
    return closed
