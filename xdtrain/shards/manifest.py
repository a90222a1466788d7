"""``manifest.json``: what a shard folder holds and every decision that made it.

It lists the source, the arguments, the preprocessing, the class names, per split the
samples, patients (groups) and shards with their sha256, and every input that was skipped
or converted, with the reason. ``decisions`` counts what the packer decided that a user
might not expect (``{"decision", "count", "detail"}``: keys renamed, films moved or left
out, the table read), each one also in ``notes``, ``skipped`` or ``preprocessing``. It is
written last, so its presence means the folder is complete; ``xd-shard verify`` re-checks
the shards against it.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter
from pathlib import Path

from rich.table import Table
from rich.text import Text

from xdtrain import __version__
from xdtrain.errors import UserError
from xdtrain.fileio import atomic_write
from xdtrain.shards.splits import SPLITS, tier_name
from xdtrain.shards.tar import INDEX_VERSION, file_sha256, index_path

NAME = "manifest.json"
FORMAT = "xdtrain-shards/1"


def load(folder: Path, missing_ok: bool = False) -> dict | None:
    path = Path(folder) / NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        if missing_ok:
            return None
        raise UserError(
            f"{path}: no manifest; is this a folder written by xd-shard "
            "(or an unfinished run — rerun it)?"
        ) from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable manifest ({exc}); repack the data set") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not an xd-shard manifest (format {manifest.get('format')!r})")
    return manifest


def save(folder: Path, manifest: dict, fsync: bool = True) -> None:
    atomic_write(Path(folder) / NAME, json.dumps(manifest, indent=1) + "\n", fsync=fsync)


def build(packer, scan, state, fingerprint) -> dict:
    """Assemble the manifest from the scan and the per-shard records of the run."""
    splits: dict[str, dict] = {}
    skipped = list(scan.skipped)
    notes = list(scan.notes)
    for group_name, record in state["groups"].items():
        split, _, tier = group_name.partition("-")
        entry = splits.setdefault(
            split,
            {"samples": 0, "groups": set(), "count": 0, "classes": Counter(), "shards": []},
        )
        for shard in record["shards"]:
            entry["samples"] += shard["samples"]
            entry["groups"].update(shard["groups"])
            entry["count"] += shard["group_count"]
            entry["classes"].update({int(k): v for k, v in shard["classes"].items()})
            entry["shards"].append(
                {k: shard[k] for k in ("name", "samples", "bytes", "sha256")}
                | {"tier": tier, "classes": shard["classes"]}  # class index -> samples
            )
            skipped.extend(shard["skipped"])
            notes.extend(shard["notes"])
        skipped.extend(record.get("tail_skipped", []))
    for entry in splits.values():
        groups, count = sorted(entry.pop("groups")), entry.pop("count")
        if packer.groups_are_keys:  # no patients: each sample is its own group
            entry["patients"] = count
        else:
            entry["patients"] = len(groups)
            entry["patient_ids"] = groups
        entry["classes"] = {
            scan.classes[k]: entry["classes"].get(k, 0) for k in range(len(scan.classes))
        }
    ordered = {s: splits[s] for s in SPLITS if s in splits}
    preprocessing = {k: v for k, v in scan.info.items() if k != "decisions"}
    return {
        "format": FORMAT,
        "dataset": packer.name,
        "tool": f"xdtrain {__version__}",
        "source": fingerprint["src"],
        "seed": fingerprint["seed"],
        "split_shares": fingerprint["splits"],
        "fractions": {tier_name(f): f for f in fingerprint["fractions"]},
        "shard_bytes": fingerprint["shard_bytes"],
        "options": fingerprint["options"],
        "classes": scan.classes,
        "components": packer.components,
        "preprocessing": preprocessing,
        "splits": ordered,
        "skipped": skipped,
        "notes": notes,
        "decisions": scan.info.get("decisions", []),
        "fingerprint": fingerprint,
    }


def content_digest(manifest: dict) -> str:
    """sha256 of what a shard folder holds, whatever its path: the data set, the packing
    options, the fraction tiers and every shard's sha256 per split. Equal digests mean runs
    read the same samples in the same splits."""
    content = {
        "dataset": manifest["dataset"],
        "options": manifest.get("options", {}),
        "fractions": manifest.get("fractions", {}),
        "splits": {
            name: [[s.get("sha256"), s.get("tier"), s["samples"]] for s in entry["shards"]]
            for name, entry in manifest["splits"].items()
        },
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def shards(manifest: dict, split: str, fraction: float = 1.0) -> list[str]:
    """Shard file names of ``split``; for train, only the tiers inside ``fraction``."""
    entry = manifest["splits"].get(split)
    if entry is None:
        return []
    keep = None
    if split == "train":
        keep = {tier_name(f) for f in manifest["fractions"].values() if f <= fraction + 1e-9}
        if fraction >= 1.0:
            keep.add(tier_name(1.0))
    return [s["name"] for s in entry["shards"] if keep is None or s["tier"] in keep]


# --------------------------------------------------------------------------- verify


def index_from_tar(path: Path) -> str:
    """The DALI index of a tar file, computed independently of the writer (tarfile)."""
    samples: list[list[str]] = []
    last = None
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            part = f"{ext} {member.offset_data} {member.size} {member.name}"
            if key == last:
                samples[-1].append(part)
            else:
                samples.append([part])
                last = key
    lines = [f"{INDEX_VERSION} {len(samples)}"] + [" ".join(s) for s in samples]
    return "\n".join(lines) + "\n"


def verify(folder: Path) -> tuple[int, list[str]]:
    """Re-check every shard against the manifest; return (shards checked, problems)."""
    folder = Path(folder)
    manifest = load(folder)
    problems: list[str] = []
    checked = 0
    for split, entry in manifest["splits"].items():
        total = 0
        for shard in entry["shards"]:
            checked += 1
            path = folder / shard["name"]
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            if file_sha256(path) != shard["sha256"]:
                problems.append(f"{path}: sha256 differs from the manifest (damaged or replaced)")
                continue
            try:
                expected = index_from_tar(path)
            except tarfile.TarError as exc:
                problems.append(f"{path}: not a readable tar ({exc})")
                continue
            count = int(expected.split("\n", 1)[0].split()[1])
            if count != shard["samples"]:
                problems.append(f"{path}: {count} samples, the manifest says {shard['samples']}")
            idx = index_path(path)
            if not idx.is_file():
                problems.append(f"{idx}: missing DALI index")
            elif idx.read_text() != expected:
                problems.append(f"{idx}: does not match its tar file")
            total += count
        if total != entry["samples"] and not any(split in p for p in problems):
            problems.append(
                f"{split}: {total} samples in shards, the manifest says {entry['samples']}"
            )
    return checked, problems


# --------------------------------------------------------------------------- info


def info_table(manifest: dict) -> Table:
    table = Table(title=Text(f"{manifest['dataset']}: {manifest['source']}"), title_justify="left")
    for column in ("split", "shards", "samples", "patients", "MB"):
        table.add_column(column, justify="left" if column == "split" else "right")
    classes = manifest["classes"]
    show = len(classes) <= 6  # one column per class; else the range over classes
    for name in classes if show else ["samples per class"]:
        table.add_column(name, justify="right")
    for split, entry in manifest["splits"].items():
        size = sum(s["bytes"] for s in entry["shards"]) / 1e6
        row = [
            split,
            str(len(entry["shards"])),
            str(entry["samples"]),
            str(entry["patients"]),
            f"{size:.1f}",
        ]
        counts = [entry["classes"].get(name, 0) for name in classes]
        row += [str(c) for c in counts] if show else [f"{min(counts)}–{max(counts)}"]
        table.add_row(*row)
    table.caption = f"{len(classes)} classes; {counts_line(manifest)}; fractions " + (
        ", ".join(manifest["fractions"]) or "none"
    )
    return table


def counts_line(manifest: dict) -> str:
    """``3 input(s) skipped; 5 note(s); 2 decision(s)``."""
    return (
        f"{len(manifest['skipped'])} input(s) skipped; {len(manifest['notes'])} note(s); "
        f"{len(manifest.get('decisions', []))} decision(s)"
    )


def decisions_table(manifest: dict) -> Table:
    """What the packer decided that a user might not expect, with how often."""
    table = Table(title="decisions (all are in manifest.json)", title_justify="left")
    table.add_column("decision")
    table.add_column("count", justify="right")
    table.add_column("detail")
    for entry in manifest.get("decisions", []):
        table.add_row(Text(entry["decision"]), str(entry["count"]), Text(entry["detail"]))
    return table


def entries_table(entries: list[dict], kind: str, field: str, limit: int = 10) -> Table:
    """The first ``limit`` skipped inputs (``field`` "reason") or notes ("note")."""
    table = Table(title=f"{kind} ({len(entries)}; all are in manifest.json)", title_justify="left")
    table.add_column("input")
    table.add_column(field)
    for item in entries[:limit]:  # as text: paths may hold [brackets] Rich would eat
        table.add_row(Text(item["input"]), Text(item[field]))
    if len(entries) > limit:
        table.add_row("…", f"{len(entries) - limit} more")
    return table
