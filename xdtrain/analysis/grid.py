"""``xd-analyze grid RUNS_DIR``: the whole feature-space analysis of an experiment grid.

The runs are found as ``xd-report`` finds them (and labelled the same way): SimCLR runs are
the pretrained encoders (``simclr-imagenet``, ``simclr-ct``), finished finetuning runs the
finetuned ones, grouped by task, pretraining, mode and fraction. For every task, on a fixed
sample of its test split (read as the task's runs read it):

- **what finetuning keeps**: CKA between each pretrained encoder and the encoders finetuned
  from it (full finetuning; a linear evaluation leaves the encoder as it was), averaged
  over seeds, stage x stage;
- **where the pretrained start ends up**: CKA between the encoder finetuned from scratch and
  the one finetuned from each pretraining (same mode and fraction, seeds paired);
- **how the pretrainings differ** on this task's images: CKA between pretrained encoders;
- **what a frozen encoder already knows**: kNN and linear probes per stage, on a sample of
  the train split, for each pretrained encoder and an untrained one of the same
  architecture (the floor a pretraining must clear);

and for every pretrained encoder a **domain map** of all the grid's data sets.
Features are stored beside each run (``<run>/features/``) and reused by a rerun. Everything
goes to ``--out``: ``index.md`` (the figures, with what each answers), ``analysis.json``
(every number) and the figures.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xdtrain.analysis import figures, measures
from xdtrain.analysis.features import RANDOM, Encoder, Features, encoder_source, extract
from xdtrain.config import Config, DataConfig, load_config
from xdtrain.errors import UserError
from xdtrain.fileio import atomic_write

log = logging.getLogger("xdtrain.analysis")
INDEX = "index.md"
RESULTS = "analysis.json"


@dataclass
class Finetuned:
    """A finished finetuning run: its encoder and where it sits in the grid."""

    encoder: Encoder
    pretrain: str
    mode: str  # full | linear
    fraction: float
    seed: int
    read: dict = field(default_factory=dict)  # env.json's encoder: path and sha256 it read
    start: str | None = None  # key of the encoder it started from (see _starts)

    @property
    def group(self) -> tuple[str, str, float]:
        return (self.pretrain, self.mode, self.fraction)


@dataclass
class Task:
    """One task of the grid: its data (as its runs read it) and its finetuned encoders."""

    name: str
    data: DataConfig
    runs: list[Finetuned] = field(default_factory=list)


@dataclass
class Grid:
    pretrained: dict[str, Encoder]  # label -> encoder (SimCLR runs)
    starts: dict[str, Encoder]  # earlier encoders of a SimCLR run trained on since (kept)
    pretrain_data: dict[str, DataConfig]  # label -> the data it was pretrained on
    tasks: dict[str, Task]
    skipped: list[str]


def find(root: Path) -> Grid:
    """The pretrained and finetuned encoders under ``root`` (see the module docs)."""
    from xdtrain.provenance import KEPT, read_env
    from xdtrain.report import Inputs, data_name, read_run, task_label
    from xdtrain.tasks import get_task

    if not root.is_dir():
        raise UserError(f"{root}: no such folder of runs")
    pretrained: dict[str, Encoder] = {}
    pretrain_data: dict[str, DataConfig] = {}
    tasks: dict[str, Task] = {}
    skipped: list[str] = []
    inputs = Inputs()
    configs = sorted(p for p in root.rglob("config.yaml") if not p.parent.name.startswith(KEPT))
    for path in configs:
        folder = path.parent
        try:
            config = load_config(path)
        except UserError as exc:
            skipped.append(f"{folder}: {exc}")
            continue
        if not (folder / "encoder.pt").is_file():
            skipped.append(f"{folder}: unfinished (no encoder.pt)")
            continue
        data = _absolute(config, folder)
        if config.task == "simclr":
            label = f"simclr-{data_name(config)}"
            if label in pretrained:
                skipped.append(f"{folder}: a second {label} encoder (the first is analysed)")
                continue
            pretrained[label] = dataclasses.replace(encoder_source(folder), label=label)
            pretrain_data[label] = data
            continue
        run = read_run(folder, inputs)
        if run is None or run.status != "finished":
            skipped.append(f"{folder}: {run.status if run else 'not a run'}")
            continue
        name = task_label(config, get_task(config.task))
        task = tasks.setdefault(name, Task(name, data))
        if (data.shards, data.image_size, data.channels) != (
            task.data.shards,
            task.data.image_size,
            task.data.channels,
        ):
            skipped.append(f"{folder}: reads other data than {name}'s first run")
            continue
        read = read_env(folder).get("encoder") or {}
        task.runs.append(
            Finetuned(encoder_source(folder), run.pretrain, run.mode, run.fraction, run.seed, read)
        )
    if not pretrained and not tasks:
        raise UserError(f"{root}: no finished SimCLR or finetuning run (config.yaml, encoder.pt)")
    grid = Grid(pretrained, {}, pretrain_data, tasks, skipped)
    _starts(grid)
    return grid


def _starts(grid: Grid) -> None:
    """Which encoder each finetuned run started from, by the sha256 it recorded: the SimCLR
    run's ``encoder.pt``, or, when that run trained longer since, the copy it kept in
    ``finished_epoch<N>/``. A run whose start is gone has no pretrained → finetuned pair."""
    from xdtrain.provenance import find_by_sha

    for task in grid.tasks.values():
        for run in task.runs:
            digest, path = run.read.get("sha256"), run.read.get("path")
            if run.pretrain == "scratch" or not digest:
                continue
            current = grid.pretrained.get(run.pretrain)
            if current is not None and current.sha256 == digest:
                run.start = run.pretrain
                continue
            kept = find_by_sha(Path(path).parent, digest) if path else None
            if kept is None:
                grid.skipped.append(
                    f"{run.encoder.home}: the encoder it started from ({path}) has changed "
                    "and no copy is kept: no pretrained → finetuned pair"
                )
                continue
            label = f"{run.pretrain} ({kept.parent.name})"
            grid.starts.setdefault(label, dataclasses.replace(encoder_source(kept), label=label))
            run.start = label


def _absolute(config: Config, folder: Path) -> DataConfig:
    """The run's data with its shard folder found (absolute in a config xd-train wrote)."""
    from xdtrain.report import find_recorded

    data = config.data
    shards = data.shards or f"shards/{data.dataset}"
    found = find_recorded(shards, folder)
    # the whole train split: probes train on a sample of it whatever fraction a run used
    return dataclasses.replace(data, shards=str(found or Path(shards).resolve()), fraction=1.0)


@dataclass
class Options:
    split: str = "test"
    samples: int = 512  # test sample per data set
    train_samples: int = 1024  # bank / probe training sample
    seed: int = 0
    cka_batch: int | None = None
    k: int = 20
    temperature: float = 0.07
    method: str = "tsne"
    random_baseline: bool = True


def analyse(root: Path, out: Path, options: Options, say: Callable[[str], None] = print) -> dict:
    """Run the grid's analysis; write ``out/index.md``, ``out/analysis.json`` and figures."""
    grid = find(root)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"runs": str(root.resolve()), "options": dataclasses.asdict(options)}
    result["skipped"] = grid.skipped
    sections: list[str] = []
    result["tasks"] = {}
    for name, task in sorted(grid.tasks.items()):
        say(f"xd-analyze: {name}: {len(task.runs)} finetuned, {len(grid.pretrained)} pretrained")
        done, text = _task(name, task, grid, out, options)
        result["tasks"][name] = done
        sections.append(text)
    maps, text = _maps(grid, out, options, say)
    result["maps"] = maps
    sections.append(text)
    atomic_write(out / RESULTS, json.dumps(result, indent=1) + "\n")
    atomic_write(out / INDEX, _index(grid, options, sections))
    return result


def _random(grid: Grid, task: Task, options: Options) -> list[Encoder]:
    arches = sorted(
        {e.arch for e in grid.pretrained.values()} | {r.encoder.arch for r in task.runs}
    )
    if not options.random_baseline:
        return []
    return [encoder_source(f"{RANDOM}{a}", options.seed) for a in arches]


def _task(name: str, task: Task, grid: Grid, out: Path, options: Options) -> tuple[dict, str]:
    o = options
    pre = list(grid.pretrained.values())
    pre += [grid.starts[k] for k in sorted({r.start for r in task.runs} & set(grid.starts))]
    baseline = _random(grid, task, o)
    fine = [r.encoder for r in task.runs]
    test_paths = extract(
        [*pre, *baseline, *fine], task.data, o.split, samples=o.samples, seed=o.seed, out=out
    )
    # finetuned runs are told apart by their folder, the others by their label
    names = [e.label for e in (*pre, *baseline)] + [_key(run) for run in task.runs]
    test = {n: Features.load(p) for n, p in zip(names, test_paths, strict=True)}
    n = len(next(iter(test.values())).keys)
    lines = [f"## {name}", "", f"{n} {o.split} samples of {task.data.shards}.", ""]
    done: dict = {"data": task.data.shards, "split": o.split, "samples": n}
    done |= {"pairs": [], "probes": {}}
    # CKA pairs, averaged over seeds
    pairs = _pairs(task, grid)
    diagonals: dict[str, list[float]] = {}
    for label, members in pairs.items():
        results = [measures.similarity(test[a], test[b], o.cka_batch) for a, b in members]
        matrix = np.nanmean(np.array([r["matrix"] for r in results], dtype=float), axis=0)
        first = results[0]
        slug = _slug(f"cka_{name}_{label}")
        path = figures.cka_heatmap(
            matrix, first["stages_a"], first["stages_b"], _side(label, 0), _side(label, 1),
            out / f"{slug}.png",
            title=f"{name}: {label}" + _seeds(len(results)),
            samples=first["samples"],
        )  # fmt: skip
        if first["stages_a"] == first["stages_b"]:  # one architecture: a diagonal
            diagonals[label] = [float(matrix[i, i]) for i in range(min(matrix.shape))]
        done["pairs"].append(
            {"pair": label, "seeds": len(results), "matrix": matrix.tolist(), "runs": members,
             "samples": first["samples"], "per_seed": [r["matrix"] for r in results]}
        )  # fmt: skip
        lines.append(f"![{label}]({path.name})")
    stages = list(next(iter(test.values())).stages)
    diagonals = {k: v for k, v in diagonals.items() if len(v) == len(stages)}
    if diagonals:
        path = figures.cka_diagonals(
            diagonals, stages, out / f"{_slug('cka_' + name)}_same_stage.png",
            title=f"{name}: same-stage CKA per encoder pair (n = {n} {o.split} samples)",
        )  # fmt: skip
        lines.insert(4, f"![same-stage CKA]({path.name})\n")
    # probes of the frozen pretrained encoders and the untrained baseline
    probe_encoders = [*pre, *baseline]
    if probe_encoders:
        train_paths = extract(
            probe_encoders, task.data, "train", samples=o.train_samples, seed=o.seed,
            out=out,
        )  # fmt: skip
        for enc, path in zip(probe_encoders, train_paths, strict=True):
            done["probes"][enc.label] = measures.probes(
                Features.load(path), test[enc.label], o.k, o.temperature, o.seed
            )
        lines += _probe_figures(name, done["probes"], out)
    lines.append("")
    return done, "\n".join(lines)


def _seeds(count: int) -> str:
    return f", mean of {count} seeds" if count > 1 else ""


def _key(run: Finetuned) -> str:
    return str(run.encoder.home)


def _pairs(task: Task, grid: Grid) -> dict[str, list[tuple[str, str]]]:
    """``{pair label: [(features key a, features key b) per seed]}``."""
    pairs: dict[str, list[tuple[str, str]]] = defaultdict(list)
    groups: dict[tuple, list[Finetuned]] = defaultdict(list)
    for run in task.runs:
        groups[run.group].append(run)
    for (pretrain, mode, fraction), runs in sorted(groups.items()):
        where = f"{mode}, {fraction:.0%}"
        if mode == "full":  # a linear evaluation's encoder is its start, unchanged
            for run in sorted(runs, key=lambda r: r.seed):
                if run.start is not None:
                    pairs[f"{pretrain} → finetuned ({where})"].append((run.start, _key(run)))
        scratch = groups.get(("scratch", mode, fraction), [])
        if pretrain != "scratch" and scratch:
            label = f"scratch-finetuned vs {pretrain}-finetuned ({where})"
            pairs[label] += [(_key(a), _key(b)) for a, b in _by_seed(scratch, runs)]
    labels = sorted(grid.pretrained)
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            pairs[f"{a} vs {b}"].append((a, b))
    return dict(pairs)


def _by_seed(a: list[Finetuned], b: list[Finetuned]) -> list[tuple[Finetuned, Finetuned]]:
    """Runs of two groups paired by seed; the runs of seeds only one group has are paired
    in seed order after those."""
    seeds = {r.seed for r in a} & {r.seed for r in b}
    first = {r.seed: r for r in a}
    pairs = [(first[r.seed], r) for r in sorted(b, key=lambda r: r.seed) if r.seed in seeds]
    rest_a = sorted((r for r in a if r.seed not in seeds), key=lambda r: r.seed)
    rest_b = sorted((r for r in b if r.seed not in seeds), key=lambda r: r.seed)
    return pairs + list(zip(rest_a, rest_b, strict=False))


def _side(label: str, which: int) -> str:
    """The name of one side of a pair label (for the heatmap's axes)."""
    if " → " in label:
        a, _, rest = label.partition(" → ")
        return a if which == 0 else f"finetuned from {a}"
    a, _, b = label.partition(" vs ")
    b = b.split(" (")[0]
    return a if which == 0 else b


def _probe_figures(name: str, results: dict, out: Path) -> list[str]:
    lines = []
    any_result = next(iter(results.values()))
    stages = list(any_result["stages"])
    metrics = [k for k in any_result["stages"][stages[-1]] if k in figures.METRIC_NAMES]
    for metric in metrics:
        path = figures.probe_curves(
            measures.probe_series(results, metric), stages, metric,
            out / f"{_slug(f'probe_{name}_{metric}')}.png",
            title=f"{name}: {figures.METRIC_NAMES[metric]} of frozen encoders "
            f"(train n = {any_result['train_samples']}, test n = {any_result['test_samples']})",
            chance=any_result["chance"].get(metric),
        )  # fmt: skip
        lines.append(f"![{metric}]({path.name})")
    return lines


def _maps(grid: Grid, out: Path, o: Options, say) -> tuple[dict, str]:
    """A domain map per pretrained encoder over every data set of the grid."""
    datasets: dict[str, DataConfig] = {}
    for task in grid.tasks.values():
        datasets.setdefault(task.data.shards, task.data)
    for data in grid.pretrain_data.values():
        datasets.setdefault(data.shards, data)
    names = {shards: Path(shards).name for shards in datasets}
    lines, done = ["## Domain maps", ""], {}
    if len(datasets) < 2:
        return done, "\n".join(lines + ["(one data set only: no map)", ""])
    for label, enc in sorted(grid.pretrained.items()):
        say(f"xd-analyze: domain map of {len(datasets)} data sets through {label}")
        feats = {}
        for shards, data in datasets.items():
            (path,) = extract([enc], data, o.split, samples=o.samples, seed=o.seed, out=out)
            feats[names[shards]] = Features.load(path)
        mapped = measures.domain_map(feats, method=o.method, seed=o.seed)
        path = figures.domain_map(
            mapped["coords"], mapped["groups"], out / f"{_slug('map_' + label)}.png",
            title=f"{', '.join(feats)} through {label} ({mapped['stage']})",
            method=o.method, separation=mapped["separation"],
        )  # fmt: skip
        done[label] = {
            "datasets": list(feats),
            "separation": mapped["separation"],
            "stage": mapped["stage"],
            "method": o.method,
            "samples": {k: len(v.keys) for k, v in feats.items()},
        }
        lines.append(f"![domain map through {label}]({path.name})")
    return done, "\n".join(lines + [""])


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in text.replace(" → ", "_to_"))
    while "__" in keep:
        keep = keep.replace("__", "_")
    return keep.strip("_")[:120]


def _index(grid: Grid, o: Options, sections: list[str]) -> str:
    head = [
        "# Feature-space analysis",
        "",
        f"Encoders: {', '.join(sorted(grid.pretrained)) or 'no pretrained encoder'}; tasks: "
        f"{', '.join(sorted(grid.tasks)) or 'none'}. Each task's figures use a fixed sample of "
        f"up to {o.samples} {o.split} samples (seed {o.seed}); probes train on up to "
        f"{o.train_samples} train samples. What each figure answers: docs/analysis.md. Numbers: "
        f"[{RESULTS}]({RESULTS}).",
        "",
        "- **Same-stage CKA** (one line per encoder pair): how much of each stage's "
        "representation finetuning keeps (pretrained → finetuned), or how alike two encoders "
        "are, stage by stage. 1: the same up to rotation and scale.",
        "- **CKA heatmaps** (stage × stage): which stage of one encoder each stage of the other "
        "resembles.",
        "- **Probes**: per stage, how well a frozen encoder's embeddings predict the task's "
        "labels (kNN and linear), against an untrained encoder and chance.",
        "- **Domain maps**: whether one encoder keeps the data sets apart.",
        "",
    ]
    if grid.skipped:
        head += ["Not analysed:", "", *[f"- {s}" for s in grid.skipped], ""]
    return "\n".join(head + sections)
