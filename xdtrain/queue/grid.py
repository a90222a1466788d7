"""``xd-queue grid``: the configs and jobs file of a pretraining × task × fraction × mode ×
seed grid. Each finetuning reads its pretraining's ``encoder.pt``, so the queue runs it after
that pretraining (:mod:`xdtrain.queue.depends`)."""

from __future__ import annotations

import csv
import io
import os
import re
import shlex
from pathlib import Path

from xdtrain.errors import UserError
from xdtrain.fileio import atomic_write
from xdtrain.queue.jobsfile import HEADER

PRETRAIN_PREFIX = "pt_simclr_"
TASK_PREFIX = "ft_"


def pretraining_sources(configs_root: Path) -> list[str]:
    """The SimCLR pretraining sources with a ``pt_simclr_<source>.yaml`` in ``configs_root``
    (imagenet, chestxray8, ct, or a user's own)."""
    return sorted(
        p.stem[len(PRETRAIN_PREFIX) :] for p in configs_root.glob(f"{PRETRAIN_PREFIX}*.yaml")
    )


def finetuning_tasks(configs_root: Path) -> list[str]:
    """The finetuning targets with a ``ft_<name>.yaml`` in ``configs_root``: the registry's
    tasks (imagenet, chestxray8, brats, lits) and data sets of one's own (``ct``: task
    ``classify`` on shards/ct)."""
    return sorted(p.stem[len(TASK_PREFIX) :] for p in configs_root.glob(f"{TASK_PREFIX}*.yaml"))


def _row(argv: list[str]) -> str:
    """A jobs-file row for ``argv``: shell-quoted arguments (a path with a space), the whole
    command CSV-quoted where it holds a comma (``--slurm exclude=n1,n2``)."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow([shlex.join(argv)])
    return buffer.getvalue()


def grid(args) -> int:
    """Write the configs and jobs file of a pretraining × task × fraction × seed grid."""
    out = Path(args.out)
    configs_root = Path(args.configs)
    pretrains = [p.strip() for p in args.pretrain.split(",") if p.strip()]
    tasks = [t.strip() for t in (args.tasks or ",".join(finetuning_tasks(configs_root))).split(",")]
    tasks = [t for t in tasks if t]
    sources, targets = pretraining_sources(configs_root), finetuning_tasks(configs_root)
    for name in pretrains:
        if name != "none" and name not in sources:
            raise UserError(
                f"--pretrain: {name!r} is none or one of {sources} (the "
                f"{PRETRAIN_PREFIX}<name>.yaml files in {configs_root}/)"
            )
    for name in tasks:
        if name not in targets:
            raise UserError(
                f"--tasks: {name!r} is not one of {targets} (the {TASK_PREFIX}<name>.yaml files "
                f"in {configs_root}/)"
            )
    for setting in args.pretrain_slurm:
        if not re.fullmatch(r"[A-Za-z][\w-]*=[\w.:,@+/-]+", setting):
            raise UserError(
                f"--pretrain-slurm {setting!r}: write KEY=VALUE, e.g. gpus-per-job=8 or "
                "time=3-00:00:00"
            )
    fractions = [float(f) for f in args.fractions.split(",")]
    (out / "configs").mkdir(parents=True, exist_ok=True)
    runs = out / "runs"
    jobs = [
        HEADER,
        f"# grid: pretrain {args.pretrain}; tasks {args.tasks}; seeds {args.seeds}; "
        f"fractions {args.fractions}; linear {args.linear}",
    ]

    def config(name: str, base: Path, overrides: dict) -> Path:
        lines = [f"_base_: {os.path.relpath(base.resolve(), (out / 'configs').resolve())}"]
        sections: dict[str, dict] = {}
        for key, value in overrides.items():
            section, _, leaf = key.partition(".")
            sections.setdefault(section, {})[leaf] = value
        for section, values in sections.items():
            lines.append(f"{section}:")
            lines += [f"  {k}: {v}" for k, v in values.items()]
        path = out / "configs" / f"{name}.yaml"
        atomic_write(path, "\n".join(lines) + "\n")
        return path

    encoders = {}
    for name in pretrains:
        if name == "none":
            continue
        path = config(
            f"pt_{name}",
            configs_root / f"{PRETRAIN_PREFIX}{name}.yaml",
            {"run.name": f"pt_{name}", "run.output_dir": str(runs)},
        )
        slurm = [item for setting in args.pretrain_slurm for item in ("--slurm", setting)]
        jobs.append(_row(["xd-train", str(path), *slurm]))
        encoders[name] = runs / f"pt_{name}" / "encoder.pt"
    modes = ["full", "linear"] if args.linear else ["full"]
    for task in tasks:
        for fraction in fractions:
            for mode in modes:
                for pretrain in pretrains:
                    if pretrain == "none" and mode == "linear":
                        continue  # a frozen random encoder answers no question
                    for seed in range(args.seeds):
                        name = f"ft_{task}_{pretrain}_f{fraction:g}_{mode}_s{seed}"
                        overrides = {
                            "run.name": name,
                            "run.output_dir": str(runs),
                            "run.seed": seed,
                            "run.pretrain": "scratch"
                            if pretrain == "none"
                            else f"simclr-{pretrain}",
                            "data.fraction": fraction,
                            "model.frozen_encoder": str(mode == "linear").lower(),
                        }
                        if pretrain != "none":
                            overrides["model.encoder_weights"] = str(encoders[pretrain])
                        path = config(name, configs_root / f"ft_{task}.yaml", overrides)
                        jobs.append(_row(["xd-train", str(path)]))
    atomic_write(out / "jobs.csv", "\n".join(jobs) + "\n")
    print(
        f"wrote {len(jobs) - 2} jobs to {out / 'jobs.csv'} and their configs to {out / 'configs'}/"
    )
    print(f"run them: xd-queue {out / 'jobs.csv'}; then: xd-report {runs}")
    return 0
