"""Which bytes a run read, recorded in its folder, and what changed since.

``env.json`` records, when a run starts, the sha256 of the shard folder's ``manifest.json``
(and its content digest, which ignores paths) and of the encoder weights it loaded. A resume
refuses inputs that changed since; ``xd-eval`` and ``xd-report`` say when a run's encoder is
no longer the file at that path. A finished run that is trained longer keeps what it had
finished with in ``finished_epoch<N>/``: runs that loaded its ``encoder.pt`` still find the
bytes they read (by sha256).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from xdtrain.errors import UserError
from xdtrain.fileio import atomic_write
from xdtrain.shards.manifest import content_digest
from xdtrain.shards.manifest import load as load_manifest
from xdtrain.shards.tar import file_sha256

ENV = "env.json"
KEPT = "finished_epoch"  # + the epoch: the folder a finished run's results are kept in
# what a finished run leaves: moved (results of that finish) or copied (still in use)
FINISHED_MOVED = ("final.pt", "encoder.pt", "eval_*.json", "roc_*.png", "confusion_*.png",
                  "overlays_*.png", "dice_*.png", "cases_*.csv", "classes_*.csv")  # fmt: skip
FINISHED_COPIED = ("config.yaml", ENV, "metrics.jsonl")


def inputs_identity(shards: Path, encoder_weights: str | None) -> dict:
    """``{"shards": {...}, "encoder": {...}}``: the shard folder's absolute path, its
    manifest's sha256 and content digest; the encoder file's absolute path and sha256."""
    shards = Path(shards).resolve()
    out = {
        "shards": {
            "folder": str(shards),
            "manifest_sha256": file_sha256(shards / "manifest.json"),
            "content": content_digest(load_manifest(shards)),
        }
    }
    if encoder_weights:
        path = Path(encoder_weights).resolve()
        out["encoder"] = {"path": str(path), "sha256": file_sha256(path)}
    return out


def read_env(folder: Path) -> dict:
    """A run's ``env.json``, or ``{}`` when it is missing or unreadable."""
    try:
        env = json.loads((Path(folder) / ENV).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return env if isinstance(env, dict) else {}


def check_resume(folder: Path, identity: dict) -> None:
    """Refuse to resume a run whose inputs changed since it started (:class:`UserError`)."""
    recorded = read_env(folder)
    for what, key in (("shards", "content"), ("encoder", "sha256")):
        before = (recorded.get(what) or {}).get(key)
        now = (identity.get(what) or {}).get(key)
        if before and before != now:
            where = (identity.get(what) or recorded[what]).get("folder") or recorded[what].get(
                "path"
            )
            kept = find_by_sha(Path(where).parent, before) if what == "encoder" else None
            restore = f"copy {kept} back to {where}" if kept else "restore them"
            raise UserError(
                f"{folder}/{ENV}: the {what} this run started from changed since ({where}: "
                f"{before[:12]} then, {str(now)[:12]} now); resuming would mix them. To "
                f"resume, {restore}; or start over with --force"
            )


def write_env(folder: Path, env: dict, resumed_at: int | None) -> None:
    """Write ``env.json`` when a run starts; on a resume add ``env`` to its ``resumes`` list,
    keeping what the first start recorded."""
    path = Path(folder) / ENV
    recorded = read_env(folder) if resumed_at is not None else {}
    if recorded:
        entry = {k: v for k, v in env.items() if k not in ("shards", "encoder")}
        recorded.setdefault("resumes", []).append(entry | {"resumed_at_step": resumed_at})
        env = recorded
    atomic_write(path, json.dumps(env, indent=1) + "\n")


def encoder_changed(env: dict) -> str | None:
    """A one-line note when the encoder a run read is no longer the file at its path."""
    recorded = env.get("encoder") or {}
    path, digest = recorded.get("path"), recorded.get("sha256")
    if not path or not digest:
        return None
    file = Path(path)
    if file.is_file() and file_sha256(file) == digest:
        return None
    found = find_by_sha(file.parent, digest) if file.parent.is_dir() else None
    kept = f"; the bytes it read are kept in {found}" if found else ""
    if not file.is_file():
        return f"the encoder it read, {path}, is gone{kept}"
    return f"the encoder it read, {path}, has changed since (sha256 {digest[:12]}){kept}"


def find_by_sha(run: Path, digest: str) -> Path | None:
    """The ``encoder.pt`` kept in a ``finished_epoch*/`` folder of ``run`` with that sha256."""
    for candidate in sorted(Path(run).glob(f"{KEPT}*/encoder.pt")):
        if file_sha256(candidate) == digest:
            return candidate
    return None


def keep_finished(folder: Path, epoch: int) -> Path:
    """Before a finished run trains longer: move its final model and encoder (and copy its
    config, environment and metrics) into ``finished_epoch<epoch>/``, which xdtrain never
    overwrites. Returns that folder."""
    folder = Path(folder)
    target = folder / f"{KEPT}{epoch}"
    if target.exists():
        raise UserError(f"{target}: exists already; move it away before training this run longer")
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name in FINISHED_COPIED:
        if (folder / name).exists():
            shutil.copy2(folder / name, staging / name)
    moved = [path for pattern in FINISHED_MOVED for path in sorted(folder.glob(pattern))]
    for path in moved:  # linked (or copied) first: nothing is lost if this is interrupted
        try:
            (staging / path.name).hardlink_to(path)
        except OSError:  # a file system without hard links
            shutil.copy2(path, staging / path.name)
    staging.rename(target)
    for path in moved:
        path.unlink(missing_ok=True)
    return target
