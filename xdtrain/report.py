"""``xd-report DIR…``: the pretraining × task grid over seeds, with statistics and plots.

Runs are grouped by what their configs say: task, training fraction, full finetuning or
linear evaluation, and pretraining (``run.pretrain``, or else what ``model.encoder_weights``
points to: the data set of the SimCLR run that wrote it, ``scratch`` when there is none).
Each cell is the test score of the final model (the task's primary metric), mean ± standard
deviation over seeds, its difference to training from scratch, and Welch's t-test p-value
against scratch (the study's statistic). Unfinished and failed runs are listed, never
averaged.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xdtrain.config import load_config
from xdtrain.errors import UserError, run_cli
from xdtrain.fileio import atomic_write
from xdtrain.runlog import METRICS, read_metrics
from xdtrain.tasks import get_task

SCRATCH = "scratch"


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


def pretrain_label(config, folder: Path) -> str:
    if config.run.pretrain:
        return config.run.pretrain
    weights = config.model.encoder_weights
    if not weights:
        return SCRATCH
    source = Path(weights)
    if not source.is_absolute() and not source.exists():
        source = folder / weights
    saved = source.parent / "config.yaml"
    if saved.is_file():
        try:
            pre = load_config(saved)
            return f"{pre.task}-{pre.data.dataset}"
        except UserError:
            pass
    return source.stem


def read_run(folder: Path) -> Run | None:
    """The record of one run folder, or None when it holds no xd-train config."""
    try:
        config = load_config(folder / "config.yaml")
    except UserError as exc:
        return Run(folder, "?", "?", 1.0, "?", 0, "?", None, f"failed: {exc}", [])
    if config.task == "simclr":
        return None  # pretraining runs are rows of no cell
    task = get_task(config.task)
    rows = read_metrics(folder / METRICS)
    tests = [r for r in rows if r["kind"] == "test"]
    value = tests[-1].get(task.primary) if tests else None
    if tests and value is not None:
        status = "finished"
    elif tests:
        status = f"failed: no {task.primary} in its test row"
    else:
        status = "unfinished"
    curve = [
        (r["epoch"], r[task.primary])
        for r in rows
        if r["kind"] == "val" and r.get(task.primary) is not None
    ]
    return Run(
        path=folder,
        task=task.name,
        pretrain=pretrain_label(config, folder),
        fraction=config.data.fraction,
        mode="linear" if config.model.frozen_encoder else "full",
        seed=config.run.seed,
        metric=task.primary,
        value=value,
        status=status,
        curve=curve,
    )


def find_runs(roots: list[Path]) -> list[Run]:
    runs = []
    for root in roots:
        if not root.exists():
            raise UserError(f"{root}: no such folder")
        configs = [root / "config.yaml"] if (root / "config.yaml").is_file() else []
        configs += sorted(p for p in root.rglob("config.yaml") if p.parent != root)
        for config in configs:
            run = read_run(config.parent)
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


def cells(runs: list[Run]) -> list[dict]:
    """One row per (task, fraction, mode, pretraining) with statistics over seeds."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        if run.status == "finished":
            groups[(run.task, run.fraction, run.mode, run.pretrain)].append(run)
    out = []
    for key in sorted(groups, key=lambda k: (k[0], -k[1], k[2], k[3] != SCRATCH, k[3])):
        task, fraction, mode, pretrain = key
        values = [r.value for r in groups[key]]
        scratch = [r.value for r in groups.get((task, fraction, mode, SCRATCH), [])]
        mean = float(np.mean(values))
        row = {
            "task": task,
            "metric": groups[key][0].metric,
            "fraction": fraction,
            "mode": mode,
            "pretrain": pretrain,
            "seeds": len(values),
            "mean": mean,
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "delta_vs_scratch": mean - float(np.mean(scratch))
            if scratch and pretrain != SCRATCH
            else None,
            "p_welch": welch_p(values, scratch) if pretrain != SCRATCH else None,
            "values": values,
        }
        out.append(row)
    return out


def _fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def markdown(rows: list[dict], runs: list[Run]) -> str:
    lines = ["# Results", ""]
    lines.append(
        "Test score of the final model of each run (the task's primary metric), mean ± std "
        "over seeds; Δ against training from scratch in the same task, fraction and mode; "
        "p: Welch's t-test against scratch."
    )
    lines.append("")
    header = (
        "task",
        "metric",
        "fraction",
        "mode",
        "pretraining",
        "seeds",
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
            f"| {r['seeds']} | {_fmt(r['mean'])} ± {_fmt(r['std'])} "
            f"| {'–' if delta is None else f'{delta:+.3f}'} | {_fmt(r['p_welch'], 4)} |"
        )
    others = [r for r in runs if r.status != "finished"]
    if others:
        lines += ["", "## Not in the table", "", "| run | status |", "| --- | --- |"]
        lines += [f"| {r.path} | {r.status} |" for r in others]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], runs: list[Run]) -> tuple[str, str]:
    table = io.StringIO()
    fields = [
        "task",
        "metric",
        "fraction",
        "mode",
        "pretrain",
        "seeds",
        "mean",
        "std",
        "delta_vs_scratch",
        "p_welch",
    ]
    writer = csv.DictWriter(table, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    per_run = io.StringIO()
    writer = csv.writer(per_run, lineterminator="\n")
    writer.writerow(
        ["run", "task", "pretrain", "fraction", "mode", "seed", "metric", "value", "status"]
    )
    for r in runs:
        writer.writerow(
            [r.path, r.task, r.pretrain, r.fraction, r.mode, r.seed, r.metric, r.value, r.status]
        )
    return table.getvalue(), per_run.getvalue()


def figures(rows: list[dict], runs: list[Run], out: Path) -> list[Path]:
    from xdtrain import plots

    written = []
    columns = sorted({(r["task"], r["fraction"], r["mode"]) for r in rows})
    pretrains = sorted({r["pretrain"] for r in rows if r["pretrain"] != SCRATCH})
    if columns and pretrains:
        values = np.full((len(pretrains), len(columns)), np.nan)
        for r in rows:
            if r["pretrain"] != SCRATCH and r["delta_vs_scratch"] is not None:
                i = pretrains.index(r["pretrain"])
                values[i, columns.index((r["task"], r["fraction"], r["mode"]))] = r[
                    "delta_vs_scratch"
                ]
        names = [t if (f, m) == (1.0, "full") else f"{t} {f:g} {m}" for t, f, m in columns]
        written.append(
            plots.heatmap(values, pretrains, names, "Δ test score vs. scratch", out / "heatmap.png")
        )
    groups: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run.status == "finished":
            groups[run.task][run.pretrain].append(dict(run.curve))
    curves = {}
    for task, series in groups.items():
        curves[task] = {}
        for pretrain, seed_curves in series.items():
            epochs = sorted(set().union(*[c.keys() for c in seed_curves]))
            curves[task][pretrain] = [
                (e, float(np.mean([c[e] for c in seed_curves if e in c]))) for e in epochs
            ]
    if curves:
        written.append(plots.grouped_curves(curves, out / "curves.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="xd-report", description="Collect runs into the pretraining × task results grid."
    )
    parser.add_argument("dirs", nargs="+", help="run folders, or folders holding run folders")
    parser.add_argument("--out", default="report", help="output folder (default: report/)")
    args = parser.parse_args(argv)
    runs = find_runs([Path(d) for d in args.dirs])
    rows = cells(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table, per_run = write_csv(rows, runs)
    atomic_write(out / "results.csv", table)
    atomic_write(out / "runs.csv", per_run)
    text = markdown(rows, runs)
    atomic_write(out / "results.md", text)
    written = figures(rows, runs, out)
    sys.stdout.write(text)
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
