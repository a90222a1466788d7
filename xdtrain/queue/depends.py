"""Which job waits for which: a job that reads what another job writes runs after it.

What a line reads and writes is taken from its command:

- ``xd-train CONFIG [--set …] [--run-dir D]``: the config as ``xd-train`` resolves it; it writes
  its run folder and reads ``data.shards``, ``model.encoder_weights`` and ``monitor.shards``.
  So a finetuning whose encoder is another line's ``<run>/encoder.pt`` (what ``xd-queue grid``
  writes) waits for that pretraining.
- ``xd-synth NAME --out D`` writes ``D/NAME`` (``all``: ``D``; ``D`` is ``datasets`` unless
  given); ``xd-shard --dataset X`` reads ``--src`` (``datasets/X``) and writes ``--out``
  (``shards/X``); any other ``xd-*`` command writes its ``--out`` and reads its other arguments
  and option values (``xd-eval RUN``, ``xd-report RUNS``, ``xd-shard verify DIR``, …);
  ``xd-eval RUN`` also writes into ``RUN`` (its scores), so a report of the runs after it in
  the file waits for it.

A read waits for every line that writes the same path, a folder around it or a path inside it
(``xd-report runs/`` waits for every run under ``runs/``); a line that writes where an earlier
line writes runs after it. ``--after REF`` adds a wait by hand. A cycle is refused.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from xdtrain.errors import UserError
from xdtrain.queue.jobsfile import Line, jobs


@dataclass
class Effects:
    """The absolute paths a job reads, writes (makes) and writes into; ``runs``: the
    ``xd-train`` run folders (one per seed with ``--seeds``)."""

    reads: list[Path] = field(default_factory=list)
    writes: list[Path] = field(default_factory=list)
    touches: list[Path] = field(default_factory=list)  # written into, not made (xd-eval RUN)
    runs: list[Path] = field(default_factory=list)


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--run-dir")
    parser.add_argument("--seeds", type=int, nargs="+")
    return parser


def _options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """``--name VALUE`` / ``--name=VALUE`` options (a flag followed by another option gets no
    value) and the positional arguments of ``argv`` (without the program)."""
    options, positional = {}, []
    items = argv[1:]
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--"):
            name, eq, value = item.partition("=")
            if not eq and i + 1 < len(items) and not items[i + 1].startswith("-"):
                value, i = items[i + 1], i + 1
            options[name] = value
        elif not item.startswith("-"):
            positional.append(item)
        i += 1
    return options, positional


def effects(argv: list[str], cwd: Path, where: str) -> Effects:
    """What the command ``argv``, started in ``cwd``, reads and writes; ``where`` names the
    line in errors (a config that cannot be read)."""
    if argv[0] == "xd-train":
        return _train_effects(argv, cwd, where)
    options, positional = _options(argv)
    found = Effects()
    path = lambda value: (cwd / value).resolve()  # noqa: E731
    if argv[0] == "xd-synth":  # xd-synth NAME [--out D] writes D/NAME (all: every NAME)
        root = path(options.get("--out") or "datasets")
        name = positional[0] if positional else "all"
        found.writes.append(root if name == "all" else root / name)
        return found
    if argv[0] == "xd-shard" and not (positional and positional[0] in ("verify", "info", "locate")):
        dataset = options.get("--dataset", "")
        found.reads.append(path(options.get("--src") or Path("datasets") / dataset))
        found.writes.append(path(options.get("--out") or Path("shards") / dataset))
        reads = [v for k, v in options.items() if k not in ("--src", "--out", "--dataset") and v]
        found.reads += [path(v) for v in reads]
        return found
    for name, value in options.items():
        if value:
            (found.writes if name == "--out" else found.reads).append(path(value))
    subcommand = argv[0] in ("xd-shard", "xd-analyze")  # xd-shard verify DIR, xd-analyze cka …
    found.reads += [path(p) for p in positional[1 if subcommand else 0 :]]
    if argv[0] == "xd-eval":  # it writes eval_<split>.json into each run
        found.touches += [path(p) for p in positional]
    return found


def _train_effects(argv: list[str], cwd: Path, where: str) -> Effects:
    from xdtrain.config import load_config, seed_runs
    from xdtrain.data import shard_folder

    args, _ = _train_parser().parse_known_args(argv[1:])
    try:
        config = load_config(cwd / args.config, args.set)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    runs = [
        (cwd / f).resolve() for _, f in seed_runs(config, args.config, args.run_dir, args.seeds)
    ]
    reads = [cwd / shard_folder(config.data)]
    for extra in (config.model.encoder_weights, config.monitor.shards):
        if extra:
            reads.append(cwd / Path(extra).expanduser())
    return Effects(reads=[p.resolve() for p in reads], writes=runs, runs=runs)


def dependencies(path: Path, lines: list[Line], cwd: Path) -> dict[int, set[int]]:
    """``{line number: the line numbers it waits for}`` for every job of the jobs file at
    ``path``; raises :class:`UserError` for an unknown ``--after`` or a cycle."""
    todo = jobs(lines)
    found = {}
    for line in todo:
        try:
            found[line.number] = effects(line.argv, cwd, f"{path}: line {line.number}")
        except UserError:
            if not line.finished:
                raise
            found[line.number] = Effects()  # a finished line whose config is gone
    made, touched = _Index(), _Index()  # what lines make; what they write into
    for number, effect in found.items():
        for target in effect.writes:
            made.add(target, number)
        for target in effect.touches:
            touched.add(target, number)

    waits: dict[int, set[int]] = {}
    for line in todo:
        effect = found[line.number]
        wanted = set()
        for target in effect.reads:
            wanted |= made.writers(target)
            # written into (xd-eval's scores in a run): by the lines before it in the file
            wanted |= {n for n in touched.writers(target) if n < line.number}
        for target in effect.writes:  # the same folder made twice: in the file's order
            wanted |= {n for n in made.writers(target) if n < line.number}
        for ref in line.after:
            wanted.add(_resolve_after(ref, path, line, found, cwd))
        wanted.discard(line.number)
        waits[line.number] = wanted
    check_cycles(path, waits)
    return waits


class _Index:
    """Line numbers by the paths they write: exactly there, or somewhere inside a folder."""

    def __init__(self) -> None:
        self.at: dict[Path, list[int]] = defaultdict(list)
        self.below: dict[Path, list[int]] = defaultdict(list)

    def add(self, target: Path, number: int) -> None:
        self.at[target].append(number)
        for parent in target.parents:
            self.below[parent].append(number)

    def writers(self, target: Path) -> set[int]:
        """The lines writing ``target``, a folder around it or a path inside it."""
        out = set(self.at.get(target, ())) | set(self.below.get(target, ()))
        for parent in target.parents:
            out.update(self.at.get(parent, ()))
        return out


def _resolve_after(ref: str, path: Path, line: Line, found: dict[int, Effects], cwd: Path) -> int:
    where = f"{path}: line {line.number}: --after {ref}"
    if ref.isdigit():
        if int(ref) not in found:
            raise UserError(f"{where}: line {ref} holds no job; give a job's line number")
        return int(ref)
    target = (cwd / ref).resolve()
    named = [
        number
        for number, effect in found.items()
        if any(run.name == ref or run == target for run in effect.runs)
    ]
    if len(named) != 1:
        what = "no" if not named else "more than one"
        raise UserError(
            f"{where}: {what} xd-train line writes a run named so; give the run's name, its "
            "folder or the line number"
        )
    return named[0]


def check_cycles(path: Path, waits: dict[int, set[int]]) -> None:
    """Refuses jobs that wait for each other, naming the lines of one cycle."""
    state: dict[int, int] = {}  # 1: on the current path, 2: done
    for start in waits:
        if state.get(start):
            continue
        stack = [(start, iter(sorted(waits[start])))]
        trail = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                trail.pop()
            elif state.get(child) == 1:
                cycle = trail[trail.index(child) :] + [child]
                raise UserError(
                    f"{path}: lines {' → '.join(map(str, cycle))} wait for each other (what one "
                    "reads, another writes); break the cycle"
                )
            elif not state.get(child):
                state[child] = 1
                trail.append(child)
                stack.append((child, iter(sorted(waits[child]))))


def order(waits: dict[int, set[int]]) -> list[int]:
    """The line numbers, each after the lines it waits for (the file's order otherwise)."""
    placed: set[int] = set()
    out: list[int] = []
    remaining = sorted(waits)
    while remaining:
        ready = [n for n in remaining if waits[n] <= placed]
        out += ready
        placed.update(ready)
        remaining = [n for n in remaining if n not in placed]
    return out
