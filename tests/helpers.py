"""Helpers the end-to-end tests share."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def demo_args(config: str, shards: Path, run: Path, *settings: str) -> list[str]:
    """``xd-train`` arguments for ``configs/demo/<config>`` on ``shards``, written to ``run``,
    shrunk for tests (32 px, one DALI thread); ``settings`` are more ``KEY=VALUE``."""
    argv = [str(ROOT / "configs" / "demo" / config), "--run-dir", str(run)]
    for setting in (f"data.shards={shards}", "data.image_size=32", "data.workers=1", *settings):
        argv += ["--set", setting]
    return argv
