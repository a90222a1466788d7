"""The packing driver: scan, split, shuffle, encode in parallel, write shards, resume.

Output of a run in ``OUT``::

    train-p001-000000.tar (+ .idx)   training samples of the patients in the 1 % fraction
    train-p010-000000.tar ...        ... in 10 % but not 1 %; then p050, p100 (the rest)
    val-000000.tar, test-000000.tar
    manifest.json                    written last: its presence means the run is complete

Training shards are grouped by *fraction tier* so that the nested 50/10/1 % subsets (chosen
by patient) are whole files: a 10 % run reads ``train-p001-*`` and ``train-p010-*``. Within
each tier and split, samples are shuffled (seeded) across the whole group, because DALI's
reader only shuffles within a small buffer.

Resume: ``.xd-shard-state.json`` records every finished shard and where in the group's
shuffled order it ended. A rerun with the same arguments first checks the recorded shards
(size and index; sha256 too where a shard was not flushed to disk) and starts after the last
intact one; since encoding is deterministic, the result is byte-identical to an
uninterrupted run. Volumes (BraTS, LiTS) are first encoded case by case into ``.spool/`` so
that their slices can be shuffled across cases while memory stays bounded.

Ownership: a run writes, replaces or deletes only what xd-shard recorded as its own: the
shards a manifest or the state file lists (the state file, saved before the first shard,
lists every group, and the one shard per group a killed run may have renamed into place
before recording it is its own too), the manifest, the state file, the spool and temporary
files of those names. Anything else in ``OUT`` stops the run before it touches anything;
``--force`` replaces xd-shard's own earlier output and never other files. Sample keys are
checked here too (:func:`_settle_keys`): a key no shard can hold skips its input, with the
reason, instead of crashing the run.

Durability: every shard, its index and the state file are flushed to disk (fsync) before
the shard is recorded, so a finished folder survives a power cut. ``fsync=False``
(``--no-fsync``) leaves write-back to the kernel, as ``tar`` does: a killed process still
loses nothing (files are renamed into place only when complete), and the check above finds
what a power cut lost from an unfinished run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing
import re
import shutil
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from rich.progress import Progress

from xdtrain import __version__
from xdtrain.errors import UserError
from xdtrain.fileio import atomic_write
from xdtrain.rng import rng_for
from xdtrain.shards import PACKERS
from xdtrain.shards import manifest as manifest_mod
from xdtrain.shards.base import Packer, Sample, Scan, SkipItem, Source
from xdtrain.shards.splits import SPLITS, assign_splits, fraction_tier_indices, tier_name
from xdtrain.shards.tar import ShardWriter, file_sha256, index_path, key_problem, parse_index

log = logging.getLogger(__name__)

STATE = ".xd-shard-state.json"
SPOOL = ".spool"


# --------------------------------------------------------------------------- encoding jobs


def _encode(dataset: str, options: dict, source: Source) -> tuple[list[Sample], str | None]:
    """Encode one source in a worker; a malformed input, or a sample key no shard can hold,
    comes back as a reason, not a crash."""
    try:
        samples = PACKERS[dataset].encode(source, options)
    except SkipItem as exc:
        return [], str(exc)
    for sample in samples:
        problem = key_problem(sample.key)
        if problem is not None:
            return [], problem
    return samples, None


def _apply(fn: Callable, batch: list) -> list:
    return [fn(item) for item in batch]


def ordered_map(
    fn: Callable, items: Iterable, pool: Executor | None, window: int, batch: int = 1
) -> Iterator[Any]:
    """``map(fn, items)`` in order, at most ``window`` batches of ``batch`` items in flight.

    Bounded memory whatever the number of items; batches amortise the cost of a task.
    """
    if pool is None:
        yield from map(fn, items)
        return
    source = iter(items)
    batches = iter(lambda: list(itertools.islice(source, batch)), [])
    pending: deque = deque()
    for chunk in itertools.islice(batches, window):
        pending.append(pool.submit(_apply, fn, chunk))
    while pending:
        results = pending.popleft().result()
        chunk = next(batches, None)
        if chunk is not None:
            pending.append(pool.submit(_apply, fn, chunk))
        yield from results


# --------------------------------------------------------------------------- state


def _load_state(out: Path) -> dict | None:
    """The record of an unfinished run in ``out`` (with any inputs and arguments), if any."""
    try:
        state = json.loads((out / STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("groups"), dict) else None


def _scan_digest(scan: Scan) -> str:
    """Identifies the inputs found (names, patients, fixed splits), so changed inputs repack."""
    digest = hashlib.sha256()
    for source in scan.sources:
        digest.update(f"{source.key}|{source.group}|{source.split}|{source.stratum}\n".encode())
    digest.update(json.dumps(scan.skipped, sort_keys=True).encode())
    return digest.hexdigest()


def _save_state(out: Path, state: dict, fsync: bool) -> None:
    atomic_write(out / STATE, json.dumps(state, separators=(",", ":")), fsync=fsync)


def _check_recorded(out: Path, state: dict, fsync: bool) -> None:
    """Drop, from the first damaged one on, the recorded shards of each group that are no
    longer as they were written (lost by a power cut before the kernel wrote them back)."""
    changed = False
    for name, record in state["groups"].items():
        for position, shard in enumerate(record["shards"]):
            problem = _shard_problem(out / shard["name"], shard)
            if problem is None:
                continue
            log.warning(
                "%s: %s since it was recorded; packing %s again from there",
                out / shard["name"],
                problem,
                name,
            )
            for dropped in record["shards"][position:]:
                (out / dropped["name"]).unlink(missing_ok=True)
                index_path(out / dropped["name"]).unlink(missing_ok=True)
            del record["shards"][position:]
            record["done"] = False
            record.pop("tail_skipped", None)
            changed = True
            break
    if changed:
        _save_state(out, state, fsync)


def _shard_problem(path: Path, shard: dict) -> str | None:
    """What is wrong with a recorded shard and its index, or None. Shards flushed to disk
    before they were recorded (the default) are only checked for presence and size."""
    try:
        if path.stat().st_size != shard["bytes"]:
            return "changed size"
        if shard.get("durable"):
            return None if index_path(path).is_file() else "missing its index"
        digest = file_sha256(path)
        refs = parse_index(index_path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return "missing or unreadable (it or its index)"
    if digest != shard["sha256"]:
        return "changed content"
    if len(refs) != shard["samples"] or (
        refs and max(o + n for _, o, n in refs[-1].parts) > shard["bytes"]
    ):
        return "a damaged index"
    return None


# --------------------------------------------------------------------------- the output folder

# The temporary files xd-shard's writers leave when killed: ``.<name>.tmp`` (a shard being
# written) and ``.<name>.<8 characters>.tmp`` (atomic_write), for its own kinds of names.
_TEMPORARY = re.compile(
    r"\.(?:(?:train-p\d{3}|val|test)-\d{6}\.(?:tar|idx)|manifest\.json|\.xd-shard-state\.json)"
    r"(?:\.[a-z0-9_]{8})?\.tmp"
)


def _own_files(manifest: dict | None, state: dict | None, groups: Iterable[str]) -> set[str]:
    """The names in ``--out`` that xd-shard recorded as its own.

    The state file's name; a manifest, its shards and their indexes; the spool, the recorded
    shards and, per group of the state (and ``groups``), the one shard after them, renamed
    into place by a killed run just before it could be recorded. Temporary files are told by
    their names (:data:`_TEMPORARY`).
    """
    own = {STATE}
    if manifest is not None:
        own |= {manifest_mod.NAME, SPOOL}  # the spool outlives the manifest by a moment
        for entry in manifest.get("splits", {}).values():
            own |= {name for shard in entry["shards"] for name in _shard_files(shard["name"])}
    if state is not None:
        own.add(SPOOL)
        recorded = {name: record["shards"] for name, record in state["groups"].items()}
        for group in {*recorded, *groups}:
            shards = recorded.get(group, [])
            own |= {name for shard in shards for name in _shard_files(shard["name"])}
            own |= _shard_files(f"{group}-{len(shards):06d}.tar")
    return own


def _shard_files(name: str) -> set[str]:
    """A shard and its index."""
    return {name, index_path(name).name}


def _refuse_foreign(out: Path, own: set[str]) -> None:
    """Stop, touching nothing, if ``out`` holds anything xd-shard did not record as its own."""
    foreign = sorted(
        path.name
        for path in out.iterdir()
        if path.name not in own and not _TEMPORARY.fullmatch(path.name)
    )
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise UserError(
            f"{out / foreign[0]}{more}: not written by xd-shard, which replaces only its own "
            "files; choose an empty --out or move these files out of it"
        )


def _clear_outputs(out: Path, own: set[str]) -> None:
    """Remove what an earlier xd-shard run wrote into ``out``: the names in ``own``."""
    for name in sorted(own):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _remove_temporaries(out: Path) -> None:
    """The temporary files of a killed run: xd-shard's kinds in ``out``, all in the spool."""
    for path in out.iterdir():
        if _TEMPORARY.fullmatch(path.name):
            path.unlink()
    for path in (out / SPOOL).glob(".*.tmp"):
        path.unlink()


def _earlier_manifest(out: Path, fingerprint: dict, force: bool) -> dict | None:
    """The manifest of a finished run in ``out`` (created if missing), if any; one of other
    inputs or arguments needs ``force``."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: not a folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    done = manifest_mod.load(out, missing_ok=True)
    if done is not None and not force and done.get("fingerprint") != fingerprint:
        raise UserError(
            f"{out} already holds shards packed from other inputs or with other arguments "
            f"({_differences(done.get('fingerprint') or {}, fingerprint)}); pass --force to "
            "replace them or choose another --out"
        )
    return done


def _differences(old: dict, new: dict) -> str:
    """What differs between two fingerprints, by name: ``options.windows, inputs``."""
    names = []
    for key in sorted(set(old) | set(new)):
        if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            inner = old[key], new[key]
            names += [
                f"{key}.{k}"
                for k in sorted(set(inner[0]) | set(inner[1]))
                if inner[0].get(k) != inner[1].get(k)
            ]
        elif old.get(key) != new.get(key):
            names.append(key)
    return ", ".join(names) or "unknown"


def _earlier_state(out: Path, fingerprint: dict, force: bool) -> dict | None:
    """The state file of an unfinished run in ``out``, if any; one of other inputs or
    arguments is resumed by its own command, or replaced with ``force``."""
    state = _load_state(out)
    if state is not None and not force and state.get("fingerprint") != fingerprint:
        raise UserError(
            f"{out} holds an unfinished xd-shard run with other inputs or arguments; rerun "
            "its command to finish it, pass --force to replace it, or choose another --out"
        )
    return state


def _prepare_out(out: Path, done, state, fresh: dict, resume: bool, fsync: bool) -> dict:
    """Make ``out`` ready to write into; return the state to continue from.

    Nothing is touched while ``out`` holds anything not recorded as xd-shard's own. To
    ``resume``, the recorded shards of ``state`` are checked; otherwise the earlier run's
    files are removed and the ``fresh`` state, listing the groups to write, is saved before
    any shard, so the folder of a killed run always names what is its own.
    """
    own = _own_files(done, state, fresh["groups"] if resume else ())
    _refuse_foreign(out, own)
    if resume:
        _check_recorded(out, state, fsync)
    else:
        _clear_outputs(out, own)
        state = fresh
        _save_state(out, state, fsync)
    _remove_temporaries(out)
    return state


# --------------------------------------------------------------------------- main entry


def pack(
    packer: Packer,
    src: Path,
    out: Path,
    *,
    options: dict,
    seed: int,
    ratios: dict[str, float],
    fractions: tuple[float, ...],
    shard_bytes: int,
    workers: int = 1,
    strict: bool = False,
    force: bool = False,
    fsync: bool = True,
    progress: Progress | None = None,
) -> dict:
    """Pack ``src`` into shards in ``out``; return the manifest."""
    if src.exists() and not src.is_dir():
        raise UserError(f"{src}: a file, not a folder; pass --src with the folder that holds it")
    if not src.is_dir():
        raise UserError(
            f"{src}: source folder not found; pass --src with the raw {packer.name} "
            "data set (xd-synth writes a small one)"
        )
    scan = packer.scan(src, options)
    _settle_keys(scan)
    if strict and scan.skipped:
        first = scan.skipped[0]
        raise UserError(
            f"{first['input']}: {first['reason']} (--strict; "
            f"{len(scan.skipped)} input(s) would be skipped)"
        )
    if not scan.sources:
        if scan.skipped:  # the reason shared by all of them, not "check --src"
            first = scan.skipped[0]
            raise UserError(
                f"{src}: all {len(scan.skipped)} {packer.name} input(s) were skipped (first: "
                f"{first['input']}: {first['reason']})"
            )
        raise UserError(f"{src}: no usable {packer.name} inputs found; check --src")
    shown = scan.scrub or str  # paths as written: without identifiers the scan has read
    if scan.scrub is not None and scan.scrub.names_a_value(str(out.resolve())):
        raise UserError(
            f"--out: its path holds a name or ID of the export ("
            f"{scan.scrub(str(out.resolve()))}); shard folders travel into run folders and "
            "reports: name it without patient names or IDs"
        )
    fingerprint = {
        "dataset": packer.name,
        "src": shown(str(src.resolve())),
        "inputs": _scan_digest(scan),
        "seed": seed,
        "splits": ratios,
        "fractions": list(fractions),
        "shard_bytes": shard_bytes,
        # options starting with "_" say where this process finds things (the pseudonym key
        # file), not what is packed: a key moved elsewhere packs the same shards
        "options": {
            k: shown(v) if isinstance(v, str) else v
            for k, v in options.items()
            if not k.startswith("_")
        },
        **(
            {"pseudonym_key": scan.info["pseudonyms"]["key_id"]}
            if "pseudonyms" in scan.info
            else {}
        ),
        "tool": __version__,
    }
    # as the state file and the manifest hold it: options of tuples compare equal to lists
    fingerprint = json.loads(json.dumps(fingerprint))
    done = _earlier_manifest(out, fingerprint, force)
    if done is not None and not force:
        return done  # packed from the same inputs with the same arguments: nothing to do
    state = _earlier_state(out, fingerprint, force)
    plan = plan_groups(packer, scan, ratios=ratios, fractions=fractions, seed=seed, options=options)
    fresh = {"fingerprint": fingerprint, "groups": {}}
    for group_name, _ in plan:
        fresh["groups"][group_name] = {"shards": [], "done": False}
    resume = state is not None and not force  # _earlier_state refused one of another run
    state = _prepare_out(out, done, state, fresh, resume, fsync)

    # Workers start from a fresh server process, not a fork of this one: they must not
    # inherit (and, through reference counting, copy) the scan of a million-image data set.
    context = multiprocessing.get_context("forkserver")
    if workers > 1 and packer.cpu_bound(options):
        pool = ProcessPoolExecutor(workers, mp_context=context)
    else:  # plain copying is fastest in this process: no bytes shipped between processes
        pool = None
    run = _Run(packer, out, options, shard_bytes, pool, workers, strict, fsync, progress)
    try:
        if packer.volumetric:
            refs = _spool(run, scan)
        for group_name, sources in plan:
            if state["groups"].get(group_name, {}).get("done"):
                continue
            if packer.volumetric:
                units = shuffled([ref for s in sources for ref in refs[s.key]], seed, group_name)
            else:
                units = shuffled(sources, seed, group_name)
            _write_group(run, group_name, units, state)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    written = sum(len(g["shards"]) for g in state["groups"].values())
    if written == 0:
        skipped = [s for g in state["groups"].values() for s in g.get("tail_skipped", [])]
        skipped += _spool_record(out)[0] if packer.volumetric else []
        first = f" (first: {skipped[0]['input']}: {skipped[0]['reason']})" if skipped else ""
        raise UserError(
            f"{src}: no samples written; all {len(scan.sources)} {packer.name} "
            f"input(s) were skipped or held no kept slices{first}"
        )
    skips, notes = _spool_record(out) if packer.volumetric else ([], [])
    scan.skipped.extend(skips)
    scan.notes.extend(notes)
    manifest = manifest_mod.build(packer, scan, state, fingerprint)
    manifest_mod.save(out, manifest, fsync=fsync)
    (out / STATE).unlink(missing_ok=True)
    shutil.rmtree(out / SPOOL, ignore_errors=True)
    return manifest


def _settle_keys(scan: Scan) -> None:
    """Skip, with the reason and before any work, every source whose key no shard can hold or
    another source already holds (the packers derive valid, unique keys; this is the
    driver's guard, so that a key is never a crash in the middle of a run)."""
    taken: set[str] = set()
    bad: dict[int, str] = {}
    for i, source in enumerate(scan.sources):
        problem = key_problem(source.key)
        if problem is None and source.key in taken:
            problem = f"sample key {source.key} is another input's too"
        if problem is None:
            taken.add(source.key)
        else:
            bad[i] = problem
    if not bad:
        return
    for i, problem in bad.items():
        scan.skipped.append({"input": scan.sources[i].describe(), "reason": problem})
    scan.sources = [s for i, s in enumerate(scan.sources) if i not in bad]


def _decide(scan: Scan, decision: str, count: int, detail: str) -> None:
    """Count a decision of the run in the manifest's ``decisions``."""
    entry = {"decision": decision, "count": count, "detail": detail}
    scan.info.setdefault("decisions", []).append(entry)


def plan_groups(
    packer: Packer,
    scan: Scan,
    *,
    ratios: dict[str, float],
    fractions: tuple[float, ...],
    seed: int,
    options: dict,
) -> list[tuple[str, list[Source]]]:
    """Assign splits and fraction tiers; return ``[(group name, sources)]`` in writing order."""
    _assign_splits(packer, scan, ratios, seed, options)
    _assign_tiers(scan, fractions, seed)
    return _plan_groups(scan.sources, fractions)


def shuffled(units: list, seed: int, group_name: str) -> list:
    """The seeded order in which a group's units (sources or slices) are written."""
    units = sorted(units, key=lambda unit: unit.key)
    order = rng_for(seed, "order", group_name).permutation(len(units))
    return [units[i] for i in order.tolist()]


def _assign_splits(packer, scan: Scan, ratios, seed, options) -> None:
    """Give every source a split: the release's where it fixes one, else one per group.

    Dictionaries here hold only the groups being split (patients, official val images), never
    one entry per source of a million-image training set.
    """
    fixed: dict[str, str] = {}
    if not packer.groups_are_keys:  # a patient with one fixed-split film follows that film
        for source in scan.sources:
            fixed_split = source.split
            if (
                fixed_split is not None
                and fixed.setdefault(source.group, fixed_split) != fixed_split
            ):
                raise UserError(
                    f"{source.group}: the release puts this patient in two splits "
                    f"({fixed[source.group]}, {source.split})"
                )
    free: dict[str, str] = {}
    weights: Counter = Counter()
    for source in scan.sources:
        if source.split is None and source.group not in fixed:
            free.setdefault(source.group, source.stratum)
            weights[source.group] += 1
    assigned = assign_splits(free, packer.split_ratios(ratios, options), seed, dict(weights))
    moved = 0
    for source in scan.sources:
        if source.split is None and source.group in fixed:
            source.split = fixed[source.group]
            note = f"moved to {source.split}: patient {source.group} has inputs fixed there"
            scan.notes.append({"input": source.describe(), "note": note})
            moved += 1
        elif source.split is None:
            source.split = assigned[source.group]
    if moved:
        _decide(scan, "inputs moved to their patient's fixed split", moved, "listed in notes")


def _assign_tiers(scan: Scan, fractions: tuple[float, ...], seed: int) -> None:
    """Give every training source the smallest data fraction that holds its group."""
    train = sorted((s for s in scan.sources if s.split == "train"), key=lambda s: s.group)
    groups = [[*members] for _, members in itertools.groupby(train, key=lambda s: s.group)]
    choices = [*sorted(fractions), 1.0]
    indices = fraction_tier_indices(len(groups), fractions, seed)
    for members, index in zip(groups, indices.tolist(), strict=True):
        for source in members:
            source.tier = choices[index]


def _plan_groups(sources: list[Source], fractions) -> list[tuple[str, list]]:
    """``[(group name, sources)]`` in writing order: train tiers small to large, val, test."""
    by_name: dict[str, list[Source]] = {}
    tier_names = [tier_name(f) for f in sorted(fractions)] + [tier_name(1.0)]
    for name in [f"train-{t}" for t in tier_names] + [s for s in SPLITS if s != "train"]:
        by_name[name] = []
    for source in sources:
        name = f"train-{tier_name(source.tier)}" if source.split == "train" else source.split
        by_name[name].append(source)
    return [(name, group) for name, group in by_name.items() if group]


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _Run:
    """The settings of one packing run that writing groups and spooling volumes share."""

    packer: Packer
    out: Path
    options: dict
    shard_bytes: int
    pool: Executor | None
    workers: int
    strict: bool
    fsync: bool
    progress: Progress | None


def _write_group(run: _Run, group_name: str, units: list, state: dict) -> None:
    packer, out, progress, fsync = run.packer, run.out, run.progress, run.fsync
    record = state["groups"].setdefault(group_name, {"shards": [], "done": False})
    start = record["shards"][-1]["next"] if record["shards"] else 0
    task = progress.add_task(group_name, total=len(units), completed=start) if progress else None
    if packer.volumetric:
        reader = _SpoolReader(out / SPOOL)
        results = ((reader.read(unit), None) for unit in units[start:])
    else:
        encode = partial(_encode, packer.name, run.options)
        results = ordered_map(encode, units[start:], run.pool, window=run.workers * 4, batch=16)

    writer: ShardWriter | None = None
    stats = _ShardStats(not packer.groups_are_keys)
    position, number = start, len(record["shards"])
    # A finished shard is closed (fsynced if asked), renamed and recorded on a helper thread
    # while the next one is written; one at a time, so records stay in order and errors
    # surface at the next.
    finisher = ThreadPoolExecutor(max_workers=1)
    finishing = None

    def finish(writer, stats, position):
        nonlocal finishing
        if finishing is not None:
            finishing.result()
        finishing = finisher.submit(
            _finish_shard, writer, stats, position, record, out, state, fsync
        )

    try:
        for unit, (samples, reason) in zip(units[start:], results, strict=True):
            position += 1
            if reason is not None:
                skip = {"input": unit.describe(), "reason": reason}
                if run.strict:
                    raise UserError(f"{skip['input']}: {reason} (--strict)")
                stats.skipped.append(skip)
            for sample in samples:
                if writer is None:
                    writer = ShardWriter(out / f"{group_name}-{number:06d}.tar", fsync=fsync)
                    number += 1
                writer.add(sample.key, sample.parts)
                stats.add(sample, unit.group)
            if progress and position % 64 == 0:
                progress.update(task, completed=position)
            if writer is not None and writer.size >= run.shard_bytes:
                finish(writer, stats, position)
                writer, stats = None, _ShardStats(not packer.groups_are_keys)
        if writer is not None:
            finish(writer, stats, position)
            writer, stats = None, _ShardStats(not packer.groups_are_keys)
        if finishing is not None:
            finishing.result()
        if stats.skipped:  # inputs skipped after the last shard closed
            record["tail_skipped"] = stats.skipped
        record["done"] = True
        _save_state(out, state, fsync)
        if progress:
            progress.update(task, completed=position)
    finally:
        finisher.shutdown(wait=True)
        if writer is not None and not writer.closed:
            writer.abort()
        if packer.volumetric:
            reader.close()


class _ShardStats:
    """What the manifest needs to know of one shard.

    Patient ids are kept only where there are patients: ImageNet's "groups" are its 1.28
    million image keys, which the state file, rewritten after every shard, must not carry.
    """

    def __init__(self, keep_groups: bool):
        self.keep_groups = keep_groups
        self.groups: set[str] = set()
        self.count = 0
        self.classes: Counter = Counter()
        self.skipped: list[dict] = []
        self.notes: list[dict] = []

    def add(self, sample: Sample, group: str) -> None:
        if self.keep_groups:
            self.groups.add(group)
        self.count += 1
        self.classes.update(sample.labels)
        if sample.note:
            self.notes.append(sample.note)

    def record(self) -> dict:
        return {
            "groups": sorted(self.groups),
            "group_count": len(self.groups) if self.keep_groups else self.count,
            "classes": {str(k): v for k, v in sorted(self.classes.items())},
            "skipped": self.skipped,
            "notes": self.notes,
        }


def _finish_shard(writer: ShardWriter, stats: _ShardStats, position, record, out, state, fsync):
    info = writer.close()
    record["shards"].append({**asdict(info), "next": position, "durable": fsync, **stats.record()})
    _save_state(out, state, fsync)


# --------------------------------------------------------------------------- volumes


def _spool(run: _Run, scan: Scan) -> dict[str, list]:
    """Encode every volume into ``.spool/<key>.tar``; return its sample references."""
    progress = run.progress
    spool = run.out / SPOOL
    spool.mkdir(exist_ok=True)
    todo = [s for s in scan.sources if not (spool / f"{s.key}.json").exists()]
    task = (
        progress.add_task(
            "volumes", total=len(scan.sources), completed=len(scan.sources) - len(todo)
        )
        if progress
        else None
    )
    encode = partial(_encode, run.packer.name, run.options)
    for source, (samples, reason) in zip(
        todo, ordered_map(encode, todo, run.pool, run.workers * 2), strict=True
    ):
        if reason is not None and run.strict:
            raise UserError(f"{source.describe()}: {reason} (--strict)")
        meta: dict[str, Any] = {"skipped": reason, "input": source.describe()}
        if samples:
            writer = ShardWriter(spool / f"{source.key}.tar")
            try:
                for sample in samples:
                    writer.add(sample.key, sample.parts)
                writer.close()
            except BaseException:
                writer.abort()
                raise
        meta["labels"] = [list(s.labels) for s in samples]
        meta["notes"] = [s.note for s in samples if s.note]
        atomic_write(spool / f"{source.key}.json", json.dumps(meta))
        if progress:
            progress.advance(task)
    refs: dict[str, list] = {}
    for source in scan.sources:
        meta = json.loads((spool / f"{source.key}.json").read_text())
        if not meta["labels"]:
            refs[source.key] = []
            continue
        index = parse_index(index_path(spool / f"{source.key}.tar").read_text())
        refs[source.key] = [
            _VolumeUnit(source, ref, tuple(labels))
            for ref, labels in zip(index, meta["labels"], strict=True)
        ]
    return refs


def _spool_record(out: Path) -> tuple[list[dict], list[dict]]:
    """Volumes skipped while spooling, and notes on the ones kept."""
    skips, notes = [], []
    for path in sorted((out / SPOOL).glob("*.json")):
        meta = json.loads(path.read_text())
        if meta["skipped"]:
            skips.append({"input": meta["input"], "reason": meta["skipped"]})
        notes.extend(meta["notes"])
    return skips, notes


class _VolumeUnit(tuple):
    """(source, sample reference, labels): one spooled slice."""

    def __new__(cls, source, ref, labels):
        return super().__new__(cls, (source, ref, labels))

    @property
    def group(self) -> str:
        return self[0].group

    @property
    def key(self) -> str:
        return self[1].key

    def describe(self) -> str:
        return self[0].describe()


class _SpoolReader:
    """Reads spooled samples back by offset, keeping a few files open."""

    def __init__(self, folder: Path, keep: int = 32):
        self.folder, self.keep = folder, keep
        self.files: dict[str, Any] = {}

    def read(self, unit: _VolumeUnit) -> list[Sample]:
        source, ref, labels = unit
        fh = self.files.pop(source.key, None) or open(self.folder / f"{source.key}.tar", "rb")  # noqa: SIM115
        self.files[source.key] = fh
        if len(self.files) > self.keep:
            oldest = next(iter(self.files))
            self.files.pop(oldest).close()
        return [Sample(ref.key, ref.read(fh), labels)]

    def close(self) -> None:
        for fh in self.files.values():
            fh.close()
        self.files.clear()


def shard_size(text: str) -> int:
    """``"256MB"`` -> bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
    }
    number = text.strip().upper().rstrip()
    digits = number.rstrip("KMGIB")
    unit = number[len(digits) :].strip()
    try:
        value = float(digits) * units[unit]
    except (ValueError, KeyError):
        raise UserError(f"--shard-size {text}: expected a size like 256MB or 64KiB") from None
    if value < 1024:
        raise UserError(f"--shard-size {text}: too small; use at least 1KiB")
    return int(value)
