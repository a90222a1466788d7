"""``xd-report DIR…``: the pretraining × task grid over seeds, with statistics and plots.

Runs are grouped by what their configs say: task, training fraction, full finetuning or
linear evaluation, and pretraining (``run.pretrain``, or else what ``model.encoder_weights``
points to: the data set of the SimCLR run that wrote it, ``scratch`` when there is none).
Within such a group, runs are pooled only when they agree on every setting that defines the
experiment: every config key but those in :data:`NOT_DEFINING`, the content of the shards
they read (``shards``), the number of processes (``world_size`` in ``env.json``), the
pretraining run their encoder came from (``pretrain.*``) and, for ChestX-ray8, the findings
averaged into the test AUROC (``auroc_classes``, ``auroc_without``). Runs that differ are
split into rows labelled with the differing settings, never averaged together.

Each row is the test score of the final model (the task's primary metric), mean ± standard
deviation over distinct seeds (runs that repeat a seed with the same settings are averaged
into that one seed), its difference to training from scratch with the same settings, and
Welch's t-test p-value against that scratch (the study's statistic). Unfinished and failed
runs are listed, never averaged. What the reader must know (split rows, repeated seeds,
rows without a matching scratch, findings left out of a mean AUROC) is listed under Notes
and printed to stderr.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from xdtrain.config import MonitorConfig, config_to_dict, load_config
from xdtrain.errors import UserError, run_cli
from xdtrain.fileio import atomic_write
from xdtrain.provenance import KEPT, encoder_changed, find_by_sha, read_env
from xdtrain.runlog import METRICS, read_metrics
from xdtrain.shards import PACKERS
from xdtrain.shards.manifest import content_digest
from xdtrain.shards.manifest import load as load_manifest
from xdtrain.shards.tar import file_sha256
from xdtrain.tasks import get_task
from xdtrain.tasks.chestxray8 import FINDINGS

SCRATCH = "scratch"

# Config keys that do not define the experiment: runs that differ only in these are pooled.
NOT_DEFINING = {
    "run.seed": "the replicate: what the statistics run over",
    "run.name": "the run folder's name",
    "run.output_dir": "where the run folder lives",
    "run.debug": "anomaly checks and a loader in the main process; the same computation",
    "run.pretrain": "makes the pretraining label, already a grouping key",
    "model.encoder_weights": "a path: the encoder is identified by the pretraining run's "
    "settings (pretrain.*) or the file's sha256 instead",
    "data.shards": "a path: the data is identified by its content instead (shards)",
    "data.workers": "decoding threads: speed only",
    "data.device": "where the same decoding graph runs: speed only",
    "train.log_every": "how often train rows are logged",
    "train.checkpoint_minutes": "how often last.pt is written",
    "train.checkpoint_epochs": "how often last.pt is written",
    "train.keep_last": "whether last.pt stays once the run finished",
    "train.save_best": "whether best.pt is written; never the model of the test score",
    "train.figures_every": "validation figures in TensorBoard: what is shown only",
    "run.mlflow": "a copy of the log in MLflow",
    "run.mlflow_uri": "where that copy goes",
    "train.max_nonfinite": "a guard that stops a diverged run; a finished run never hit it",
    "train.compile": "the same model, compiled: speed only",
    "train.channels_last": "memory layout of the same tensors: speed only",
} | {
    f"monitor.{f.name}": "the kNN monitor looks at the encoder, never changes it"
    for f in fields(MonitorConfig)
}
# Keys the rows are grouped by already (with the pretraining).
GROUPING = ("task", "data.fraction", "model.frozen_encoder")
WORLD_SIZE = "world_size"  # from env.json: processes, so global batch = batch_size x this
SHARDS = "shards"  # the content digest of the shard folder read: what was packed, not where
AUROC_CLASSES = "auroc_classes"  # from the test row: findings averaged into auroc_mean
AUROC_WITHOUT = "auroc_without"  # the findings left out of it, when any

Settings = tuple[tuple[str, str], ...]  # sorted (key, value as text): hashable, comparable


@dataclass
class Run:
    path: Path
    task: str
    pretrain: str
    fraction: float
    mode: str  # "full" or "linear"
    seed: int
    metric: str
    value: float | None  # test score of the final model; None when unfinished
    status: str  # "finished", "unfinished", "failed: …"
    curve: list[tuple[int, float]]
    settings: Settings = ()  # the defining settings (see NOT_DEFINING)
    pretrain_settings: Settings = ()  # what defines the encoder it started from (pretrain.*)
    dropped: list[str] = field(default_factory=list)  # findings with no test AUROC
    encoder_note: str | None = None  # the encoder file it read has changed since

    @property
    def family(self) -> tuple[str, float, str]:
        """(task, fraction, mode): the runs whose rows are compared with each other."""
        return (self.task, self.fraction, self.mode)


def find_recorded(path: str, folder: Path) -> Path | None:
    """``path`` as a run's config wrote it: absolute, or relative to the folder training ran
    in, which is the current one or one above the run folder (``checkpoints/...``)."""
    candidate = Path(path)
    if candidate.is_absolute():
        return candidate if candidate.exists() else None
    for base in (Path.cwd(), *folder.resolve().parents):
        if (base / candidate).exists():
            return base / candidate
    return None


class Inputs:
    """What runs read, identified independently of paths: the shards by content, an encoder
    by the pretraining run that wrote it (or its sha256). Each shard folder and encoder is
    looked at once per report, however many runs read it."""

    def __init__(self):
        self._shards: dict[Path, str] = {}
        self._encoders: dict[Path, tuple[str | None, Settings]] = {}
        self._sha256: dict[Path, str] = {}

    def shards(self, config, folder: Path, env: dict) -> str:
        """The content digest of the shards a run read (``env.json``, else their manifest)."""
        recorded = (env.get("shards") or {}).get("content")
        if recorded:
            return recorded[:12]
        found = find_recorded(config.data.shards or f"shards/{config.data.dataset}", folder)
        if found is None:
            return "unknown"
        if found not in self._shards:
            try:
                self._shards[found] = content_digest(load_manifest(found))[:12]
            except (UserError, KeyError, TypeError):
                self._shards[found] = "unknown"
        return self._shards[found]

    def pretraining(self, config, folder: Path, env: dict) -> tuple[str, Settings]:
        """``(label, pretrain.* settings)`` of a run: ``run.pretrain`` or the data set of the
        SimCLR run that wrote its encoder (``scratch`` without one); the defining settings of
        that run, its seed included, else the weights file's sha256."""
        weights = config.model.encoder_weights
        if not weights:
            return config.run.pretrain or SCRATCH, ()
        recorded = env.get("encoder") or {}
        digest = recorded.get("sha256")
        source = Path(recorded["path"]) if recorded.get("path") else None
        if source is None or not source.exists():
            source = find_recorded(weights, folder)
        if source is not None and digest and self.sha256(source) != digest:
            # changed since the run read it (its pretraining trained longer, or a copy over
            # it): the bytes it read are identified by their sha256, where they are kept
            source = find_by_sha(source.parent, digest)
        if source is None:
            label, settings = None, (("pretrain.weights", digest[:12] if digest else "unknown"),)
        else:
            if source not in self._encoders:
                self._encoders[source] = self._encoder(source, digest)
            label, settings = self._encoders[source]
        return config.run.pretrain or label or Path(weights).stem, settings

    def sha256(self, path: Path) -> str:
        """A file's sha256, computed once per report."""
        if path not in self._sha256:
            self._sha256[path] = file_sha256(path)
        return self._sha256[path]

    def _encoder(self, source: Path, digest: str | None) -> tuple[str | None, Settings]:
        saved = source.parent / "config.yaml"
        try:
            pre = load_config(saved) if saved.is_file() else None
        except UserError:
            pre = None
        if pre is None:
            digest = digest or file_sha256(source)
            return None, (("pretrain.weights", digest[:12]),)
        settings = dict(defining_settings(pre, saved.parent, None, self))
        settings["run.seed"] = str(pre.run.seed)  # another pretraining seed: another encoder
        return f"{pre.task}-{data_name(pre)}", tuple(
            sorted((f"pretrain.{k}", v) for k, v in settings.items())
        )


def _text(value) -> str:
    """A setting's value as written in labels: strings bare, everything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def world_size(env: dict) -> int | None:
    """Processes a run trained with (its ``env.json``); None when it is not recorded."""
    try:
        return int(env[WORLD_SIZE])
    except (KeyError, TypeError, ValueError):
        return None


def defining_settings(config, folder: Path, test_row: dict | None, inputs: Inputs) -> Settings:
    """The settings that define a run's experiment: every config key but the grouping keys
    and :data:`NOT_DEFINING`; ``shards``, the content of the shard folder it read (not its
    path); ``world_size`` (``"unknown"`` without ``env.json``); and, when its test row has
    one, ``auroc_classes`` and the findings left out of the mean (``auroc_without``). The
    encoder a run started from is defined apart (:meth:`Inputs.pretraining`)."""
    env = read_env(folder)
    flat = _flatten(config_to_dict(config))
    settings = {k: _text(v) for k, v in flat.items() if k not in NOT_DEFINING and k not in GROUPING}
    settings[SHARDS] = inputs.shards(config, folder, env)
    size = world_size(env)
    settings[WORLD_SIZE] = "unknown" if size is None else str(size)
    if test_row is not None and test_row.get(AUROC_CLASSES) is not None:
        settings[AUROC_CLASSES] = str(test_row[AUROC_CLASSES])
        dropped = dropped_findings(test_row)
        if dropped:  # which findings, not only how many: means without others differ too
            settings[AUROC_WITHOUT] = ", ".join(dropped)
    return tuple(sorted(settings.items()))


def dropped_findings(test_row: dict | None) -> list[str]:
    """Findings whose test AUROC is null (undefined: one class only), so left out of
    ``auroc_mean``: the first :data:`FINDINGS` ``auroc/<name>`` entries of a ChestX-ray8
    test row (the 15th, No Finding, is never in the mean)."""
    if not test_row:
        return []
    names = [k for k in test_row if k.startswith("auroc/")][:FINDINGS]
    return [k.removeprefix("auroc/") for k in names if test_row[k] is None]


def data_name(config) -> str:
    """What a run's data are called in the report: the data set (``imagenet``, ``brats``), or,
    for a data set of one's own (``dicom``, ``nifti``), its shard folder's name (``ct``), so
    that two exports packed into two folders are two columns."""
    packer = PACKERS.get(config.data.dataset)
    if packer is None or hasattr(packer, "layout"):  # a public data set's fixed layout
        return config.data.dataset
    return Path(config.data.shards or f"shards/{config.data.dataset}").name


def task_label(config, task) -> str:
    """A task's column: its name, or for a task on any data set (``classify``) the data's."""
    return task.name if task.dataset is not None else data_name(config)


def read_run(folder: Path, inputs: Inputs | None = None) -> Run | None:
    """The record of one run folder, or None when it holds no finetuning config."""
    try:
        config = load_config(folder / "config.yaml")
    except UserError as exc:
        return Run(folder, "?", "?", 1.0, "?", 0, "?", None, f"failed: {exc}", [])
    if config.task == "simclr":
        return None  # pretraining runs are rows of no cell
    task = get_task(config.task)
    rows = read_metrics(folder / METRICS)
    tests = [r for r in rows if r["kind"] == "test"]
    test = tests[-1] if tests else None
    value = test.get(task.primary) if test else None
    if test and value is not None:
        status = "finished"
    elif test:
        status = f"failed: no {task.primary} in its test row"
    else:
        status = "unfinished"
    curve = [
        (r["epoch"], r[task.primary])
        for r in rows
        if r["kind"] == "val" and r.get(task.primary) is not None
    ]
    inputs = inputs or Inputs()
    pretrain, pretrain_settings = inputs.pretraining(config, folder, read_env(folder))
    return Run(
        path=folder,
        task=task_label(config, task),
        pretrain=pretrain,
        fraction=config.data.fraction,
        mode="linear" if config.model.frozen_encoder else "full",
        seed=config.run.seed,
        metric=task.primary,
        value=value,
        status=status,
        curve=curve,
        settings=defining_settings(config, folder, test, inputs),
        pretrain_settings=pretrain_settings,
        dropped=dropped_findings(test) if task.name == "chestxray8" else [],
        encoder_note=encoder_changed(read_env(folder)),
    )


def find_runs(roots: list[Path]) -> list[Run]:
    runs, inputs = [], Inputs()
    for root in roots:
        if not root.exists():
            raise UserError(f"{root}: no such folder")
        configs = [root / "config.yaml"] if (root / "config.yaml").is_file() else []
        configs += sorted(
            p
            for p in root.rglob("config.yaml")
            if p.parent != root and not p.parent.name.startswith(KEPT)
        )  # a run trained longer keeps its earlier finish in finished_epoch<N>/: not a run
        for config in configs:
            run = read_run(config.parent, inputs)
            if run is not None:
                runs.append(run)
    if not runs:
        raise UserError(f"{', '.join(map(str, roots))}: no finetuning runs found (config.yaml)")
    return runs


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Welch's two-sided t-test p-value (unequal variances); None with fewer than 2 each."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None
    if np.std(a) == 0 and np.std(b) == 0:
        return None if np.mean(a) == np.mean(b) else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def varying_keys(settings: list[Settings]) -> list[str]:
    """Keys whose values are not the same in all of ``settings`` (sorted; a key missing from
    some counts as differing)."""
    values: dict[str, set] = defaultdict(set)
    for s in settings:
        for key, value in s:
            values[key].add(value)
    present = [dict(s) for s in settings]
    return sorted(k for k, v in values.items() if len(v) > 1 or any(k not in p for p in present))


def settings_label(settings: Settings, keys: list[str]) -> str:
    """``"train.epochs=25, world_size=2"``: the values of ``keys`` in ``settings``."""
    given = dict(settings)
    return ", ".join(f"{k}={given.get(k, '–')}" for k in keys)


def per_seed(runs: list[Run]) -> dict[int, list[Run]]:
    """Runs by seed (sorted); several runs of one seed are one seed."""
    seeds: dict[int, list[Run]] = defaultdict(list)
    for run in runs:
        seeds[run.seed].append(run)
    return dict(sorted(seeds.items()))


def seed_curve(runs: list[Run]) -> dict[int, float]:
    """Validation curve of one seed: {epoch: mean over the seed's runs that have it}."""
    epochs: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for epoch, value in run.curve:
            epochs[epoch].append(value)
    return {e: float(np.mean(v)) for e, v in sorted(epochs.items())}


def mean_curve(seeds: dict[int, list[Run]]) -> list[tuple[int, float]]:
    """Validation curve of a row: per epoch, the mean over its seeds' curves."""
    curves = [seed_curve(runs) for runs in seeds.values()]
    epochs = sorted(set().union(*[c.keys() for c in curves])) if curves else []
    return [(e, float(np.mean([c[e] for c in curves if e in c]))) for e in epochs]


def _row(family: tuple, pretrain: str, settings: Settings, runs: list[Run], label: str) -> dict:
    task, fraction, mode = family
    seeds = per_seed(runs)
    values = [float(np.mean([r.value for r in rs])) for rs in seeds.values()]
    return {
        "task": task,
        "metric": runs[0].metric,
        "fraction": fraction,
        "mode": mode,
        "pretrain": pretrain,
        "settings": label,
        "seeds": len(values),
        "runs": len(runs),
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
        "delta_vs_scratch": None,
        "p_welch": None,
        "values": values,
        "seed_runs": seeds,
        "settings_all": settings,
        "curve": mean_curve(seeds),
    }


def _compare(row: dict, scratch: dict | None) -> None:
    """Δ and Welch's p of ``row`` against the scratch row of the same settings."""
    if row["pretrain"] == SCRATCH or scratch is None:
        return
    row["delta_vs_scratch"] = row["mean"] - scratch["mean"]
    row["p_welch"] = welch_p(row["values"], scratch["values"])


def cells(runs: list[Run]) -> list[dict]:
    """One row per (task, fraction, mode, pretraining, defining settings, encoder), with
    statistics over distinct seeds; ``settings`` names the settings that vary within the
    (task, fraction, mode) family, and the ``pretrain.*`` settings that vary between encoders
    of one pretraining label; empty when none do. Δ and p are against the scratch row whose
    settings are the same, None when there is none."""
    families: dict[tuple, dict[tuple[str, Settings, Settings], list[Run]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for run in runs:
        if run.status == "finished":
            families[run.family][(run.pretrain, run.settings, run.pretrain_settings)].append(run)
    out = []
    for family, groups in families.items():
        keys = varying_keys([s for _, s, _ in groups])
        encoders = encoder_keys(groups)
        rows = []
        for (pretrain, settings, encoder), group in groups.items():
            label = ", ".join(
                part
                for part in (
                    settings_label(settings, keys),
                    settings_label(encoder, encoders[pretrain]),
                )
                if part
            )
            row = _row(family, pretrain, settings, group, label)
            row["encoder_all"] = encoder
            rows.append(row)
        scratch = {r["settings_all"]: r for r in rows if r["pretrain"] == SCRATCH}
        for row in rows:
            _compare(row, scratch.get(row["settings_all"]))
        out += rows
    return sorted(
        out,
        key=lambda r: (
            r["task"],
            -r["fraction"],
            r["mode"],
            r["settings"],
            r["pretrain"] != SCRATCH,
            r["pretrain"],
        ),
    )


def encoder_keys(groups) -> dict[str, list[str]]:
    """Per pretraining label, the ``pretrain.*`` settings in which its encoders differ."""
    by_label: dict[str, set[Settings]] = defaultdict(set)
    for pretrain, _, encoder in groups:
        by_label[pretrain].add(encoder)
    return {label: varying_keys(list(encoders)) for label, encoders in by_label.items()}


def _where(row: dict) -> str:
    """``"lits 1 full simclr-imagenet [train.epochs=25]"``: a row, named in notes."""
    name = f"{row['task']} {row['fraction']:g} {row['mode']} {row['pretrain']}"
    return f"{name} [{row['settings']}]" if row["settings"] else name


def notes(rows: list[dict], runs: list[Run]) -> list[str]:
    """What the table cannot show: split families, repeated seeds, rows without a matching
    scratch, findings left out of a mean AUROC. One line each."""
    out = [
        f"{run.path.name}: {run.encoder_note}; it is identified by the sha256 it read"
        for run in runs
        if run.encoder_note
    ]
    families = defaultdict(list)
    for row in rows:
        families[(row["task"], row["fraction"], row["mode"])].append(row)
    for (task, fraction, mode), family in families.items():
        keys = varying_keys([r["settings_all"] for r in family])
        if keys:
            out.append(
                f"{task} {fraction:g} {mode}: runs differ in {', '.join(keys)}; split into "
                "rows by these settings, never averaged together"
            )
        out += _scratch_notes(family, keys)
        for label, encoder in encoder_keys(
            [(r["pretrain"], r["settings_all"], r["encoder_all"]) for r in family]
        ).items():
            if encoder:
                out.append(
                    f"{task} {fraction:g} {mode} {label}: the encoders come from pretraining "
                    f"runs that differ in {', '.join(encoder)}; split into rows, never averaged"
                )
    for row in rows:
        for seed, seed_runs in row["seed_runs"].items():
            if len(seed_runs) > 1:
                folders = ", ".join(str(r.path) for r in seed_runs)
                out.append(
                    f"{_where(row)}: seed {seed} ran {len(seed_runs)} times ({folders}); "
                    "their mean counts as one seed"
                )
    for run in runs:
        if run.status == "finished" and run.dropped:
            averaged = dict(run.settings).get(AUROC_CLASSES, "?")
            out.append(
                f"{run.path}: {run.metric} averages {averaged} of {FINDINGS} findings; no "
                f"test AUROC (one class only) for {', '.join(run.dropped)}"
            )
    return out


def _differences(mine: Settings, other: Settings, keys: list[str]) -> str:
    """``"train.epochs=10, world_size=1"``: the values of ``other`` where it differs."""
    a, b = dict(mine), dict(other)
    return ", ".join(f"{k}={b.get(k, '–')}" for k in keys if a.get(k) != b.get(k))


def _scratch_notes(family: list[dict], keys: list[str]) -> list[str]:
    """Notes on the pretrained rows of one family that have no scratch row to compare with."""
    scratch = [r["settings_all"] for r in family if r["pretrain"] == SCRATCH]
    out = []
    for row in family:
        if row["pretrain"] == SCRATCH or row["delta_vs_scratch"] is not None:
            continue
        if not scratch:
            out.append(f"{_where(row)}: no scratch run in this task, fraction and mode; Δ and p –")
            continue
        theirs = "; ".join(_differences(row["settings_all"], s, keys) for s in scratch)
        out.append(
            f"{_where(row)}: no scratch run with the same settings (scratch has {theirs}); "
            "Δ and p –"
        )
    return out


def _fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def markdown(rows: list[dict], runs: list[Run], remarks: list[str]) -> str:
    lines = ["# Results", ""]
    lines.append(
        "Test score of the final model of each run (the task's primary metric), mean ± std "
        "over n distinct seeds; Δ against training from scratch in the same task, fraction, "
        "mode and settings; p: Welch's t-test against that scratch. Settings: what differs "
        "between the rows of a task, fraction and mode (see Notes)."
    )
    lines.append("")
    header = (
        "task",
        "metric",
        "fraction",
        "mode",
        "pretraining",
        "settings",
        "n (seeds)",
        "runs",
        "mean ± std",
        "Δ vs scratch",
        "p (Welch)",
    )
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + " --- |" * len(header))
    for r in rows:
        delta = r["delta_vs_scratch"]
        lines.append(
            f"| {r['task']} | {r['metric']} | {r['fraction']:g} | {r['mode']} | {r['pretrain']} "
            f"| {r['settings']} | {r['seeds']} | {r['runs']} | {_fmt(r['mean'])} ± "
            f"{_fmt(r['std'])} | {'–' if delta is None else f'{delta:+.3f}'} "
            f"| {_fmt(r['p_welch'], 4)} |"
        )
    if remarks:
        lines += ["", "## Notes", ""]
        lines += [f"- {note}" for note in remarks]
    others = [r for r in runs if r.status != "finished"]
    if others:
        lines += ["", "## Not in the table", "", "| run | status |", "| --- | --- |"]
        lines += [f"| {r.path} | {r.status} |" for r in others]
    return "\n".join(lines) + "\n"


def analysis_section(out: Path, analysis: str | None) -> str:
    """The link to an ``xd-analyze grid`` folder and its figures (what pretraining leaves
    in the encoders), or nothing when there is none."""
    import os

    folder = Path(analysis) if analysis else out / "analysis"
    index = folder / "index.md"
    if not index.is_file():
        if analysis:
            raise UserError(f"{folder}: no index.md; run `xd-analyze grid RUNS --out {folder}`")
        return ""
    where = Path(os.path.relpath(folder.resolve(), out.resolve()))
    lines = ["", "## Feature-space analysis", ""]
    lines.append(
        f"CKA between encoders, probes of frozen encoders and domain maps: "
        f"[{where / 'index.md'}]({where / 'index.md'})."
    )
    figures = sorted(p.name for p in folder.glob("*.png"))
    shown = [f for f in figures if "same_stage" in f or f.startswith("map_")]
    shown += [f for f in figures if "_to_finetuned" in f or "to_finetuned" in f]
    for name in dict.fromkeys(shown):
        lines += ["", f"![{name[:-4]}]({where / name})"]
    return "\n".join(lines) + "\n"


ROW_FIELDS = [
    "task",
    "metric",
    "fraction",
    "mode",
    "pretrain",
    "settings",
    "seeds",
    "runs",
    "mean",
    "std",
    "delta_vs_scratch",
    "p_welch",
]


def _run_labels(rows: list[dict]) -> dict[int, str]:
    """``id(run)`` -> the ``settings`` label of the row that finished run is in."""
    return {
        id(run): row["settings"]
        for row in rows
        for seed_runs in row["seed_runs"].values()
        for run in seed_runs
    }


def write_csv(rows: list[dict], runs: list[Run]) -> tuple[str, str]:
    table = io.StringIO()
    writer = csv.DictWriter(
        table, fieldnames=ROW_FIELDS, extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    per_run = io.StringIO()
    writer = csv.writer(per_run, lineterminator="\n")
    writer.writerow(
        [
            "run",
            "task",
            "pretrain",
            "fraction",
            "mode",
            "seed",
            "metric",
            "value",
            "status",
            "settings",
            "world_size",
        ]
    )
    labels = _run_labels(rows)
    for r in runs:
        writer.writerow(
            [
                r.path,
                r.task,
                r.pretrain,
                r.fraction,
                r.mode,
                r.seed,
                r.metric,
                r.value,
                r.status,
                labels.get(id(r), ""),
                dict(r.settings).get(WORLD_SIZE, ""),
            ]
        )
    return table.getvalue(), per_run.getvalue()


def _share(fraction: float) -> str:
    """``"10% train"``: a training fraction as written in figures."""
    return f"{fraction * 100:g}% train"


def _column(row: dict) -> str:
    """Heatmap column name of a row: the task and its metric, mode and training fraction,
    and the settings that split the task's rows when any."""
    parts = [f"{row['task']}: {row['metric']}", f"{row['mode']}, {_share(row['fraction'])}"]
    if row["settings"]:
        parts.append(row["settings"].replace(", ", "\n"))
    return "\n".join(parts)


def _mean_std(row: dict) -> str:
    """``"0.912 ± 0.004"`` (the mean alone with one seed)."""
    std = row["std"]
    return f"{row['mean']:.3f}" if std is None else f"{row['mean']:.3f} ± {std:.3f}"


def _p_text(p: float | None) -> str:
    """``"p=0.03"``; ``"p=n/a"`` where Welch's test had too few seeds or no variance."""
    return "p=n/a" if p is None else f"p={p:.2g}"


def _cell_text(row: dict, scratch: dict | None) -> str:
    """What a heatmap cell says: scratch, its score and n; a pretrained row, its Δ, score, n
    and Welch's p against ``scratch`` (its own scratch row), or that there is none."""
    score = f"{_mean_std(row)}\nn={row['seeds']}"
    if row["pretrain"] == SCRATCH:
        return f"{score}\n(reference)"
    if scratch is None or row["delta_vs_scratch"] is None:
        return f"{score}, no scratch"
    return f"Δ {row['delta_vs_scratch']:+.3f}\n{score}, {_p_text(row['p_welch'])}"


def heatmap_table(rows: list[dict]) -> tuple[np.ndarray, list[str], list[str], list[list[str]]]:
    """The test scores as a pretraining × (task, fraction, mode, settings) matrix, coloured
    by Δ against scratch: ``(values [P, C]: Δ, NaN where there is none (scratch itself, or no
    scratch with the same settings); pretrainings, scratch first; column names; cell texts)``.
    A cell says the row's mean ± std over its n distinct seeds, and for a pretrained row Δ and
    Welch's p against the scratch row it was compared with (:func:`_compare`), which sits in
    the same column; "–" where no row is."""
    scratch = {
        (r["task"], r["fraction"], r["mode"], r["settings_all"]): r
        for r in rows
        if r["pretrain"] == SCRATCH
    }
    columns: dict[tuple, dict[str, dict]] = defaultdict(dict)
    placed = set()
    for r in rows:
        if r["pretrain"] == SCRATCH:
            continue
        cell = columns[(r["task"], -r["fraction"], r["mode"], r["settings"])]
        cell[r["pretrain"]] = r
        match = scratch.get((r["task"], r["fraction"], r["mode"], r["settings_all"]))
        if match is not None:
            cell[SCRATCH] = match
            placed.add(id(match))
    for r in scratch.values():  # scratch rows no pretrained row was compared with
        if id(r) not in placed:
            columns[(r["task"], -r["fraction"], r["mode"], r["settings"])][SCRATCH] = r
    keys = sorted(columns)
    others = sorted({r["pretrain"] for r in rows if r["pretrain"] != SCRATCH})
    pretrains = ([SCRATCH] if scratch else []) + others
    values = np.full((len(pretrains), len(keys)), np.nan)
    texts = [["–"] * len(keys) for _ in pretrains]
    names = []
    for j, key in enumerate(keys):
        cell = columns[key]
        names.append(_column(next(iter(cell.values()))))
        for pretrain, r in cell.items():
            i = pretrains.index(pretrain)
            texts[i][j] = _cell_text(r, cell.get(SCRATCH))
            if pretrain != SCRATCH and r["delta_vs_scratch"] is not None:
                values[i, j] = r["delta_vs_scratch"]
    return values, pretrains, names, texts


def _curve_label(row: dict) -> str:
    """``"simclr-imagenet, linear, 10% train [world_size=2] (n=3)"``: one line of curves.png."""
    label = f"{row['pretrain']}, {row['mode']}, {_share(row['fraction'])}"
    if row["settings"]:
        label += f" [{row['settings']}]"
    return f"{label} (n={row['seeds']})"


def curve_series(rows: list[dict]) -> dict[str, dict[str, list[tuple[int, float, float | None]]]]:
    """Validation curves, one panel per task and one line per row (pretraining, mode,
    fraction, settings), labelled with its n seeds: ``{task: {line label: [(epoch, mean over
    seeds, std over seeds or None with fewer than 2)]}}``; the mean is the row's ``curve``."""
    out: dict[str, dict[str, list]] = defaultdict(dict)
    for r in rows:
        label = _curve_label(r)
        while label in out[r["task"]]:  # never merge two rows into one line
            label += "'"
        curves = [seed_curve(runs) for runs in r["seed_runs"].values()]
        points = []
        for epoch, mean in r["curve"]:
            seeds = [c[epoch] for c in curves if epoch in c]
            std = float(np.std(seeds, ddof=1)) if len(seeds) > 1 else None
            points.append((epoch, mean, std))
        out[r["task"]][label] = points
    return dict(out)


HEATMAP_TITLE = (
    "Test score of the final model: mean ± std over n seeds\n"
    "Δ and p (Welch's t-test) against scratch of the same task, mode, fraction and settings"
)


def figures(rows: list[dict], out: Path) -> list[Path]:
    """``heatmap.png`` (every row's score, n and p; coloured by Δ against scratch) and
    ``curves.png`` (validation curves: mean over seeds, ± std band)."""
    from xdtrain import plots

    written = []
    values, pretrains, names, texts = heatmap_table(rows)
    if values.size:
        written.append(
            plots.heatmap(
                values,
                pretrains,
                names,
                HEATMAP_TITLE,
                out / "heatmap.png",
                colorbar="Δ test score vs scratch (the task's primary metric)",
                texts=texts,
                xlabel="task: metric, mode, training fraction [settings]",
                ylabel="pretraining",
            )
        )
    curves = curve_series(rows)
    if curves:
        ylabels = {r["task"]: f"val {r['metric']}" for r in rows}
        title = "Validation metric by epoch: mean over n seeds, band ± 1 std (n ≥ 2)"
        written.append(plots.grouped_curves(curves, out / "curves.png", ylabels, title))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="xd-report", description="Collect runs into the pretraining × task results grid."
    )
    parser.add_argument("dirs", nargs="+", help="run folders, or folders holding run folders")
    parser.add_argument("--out", default="report", help="output folder (default: report/)")
    parser.add_argument(
        "--analysis",
        help="folder written by `xd-analyze grid` to link (default: OUT/analysis when it has one)",
    )
    args = parser.parse_args(argv)
    runs = find_runs([Path(d) for d in args.dirs])
    rows = cells(runs)
    remarks = notes(rows, runs)
    out = Path(args.out)
    linked = analysis_section(out, args.analysis)
    out.mkdir(parents=True, exist_ok=True)
    table, per_run = write_csv(rows, runs)
    atomic_write(out / "results.csv", table)
    atomic_write(out / "runs.csv", per_run)
    text = markdown(rows, runs, remarks) + linked
    atomic_write(out / "results.md", text)
    written = figures(rows, out)
    sys.stdout.write(text)
    for note in remarks:
        print(f"xd-report: note: {note}", file=sys.stderr)
    finished = sum(r.status == "finished" for r in runs)
    print(
        f"\n{finished} finished run(s), {len(runs) - finished} not in the table; report in {out}/"
    )
    for path in written:
        print(f"wrote {path}")
    return 0


def entry() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
