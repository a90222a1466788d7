"""xd-eval, xd-report and xd-queue on tiny runs."""

from __future__ import annotations

import codecs
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, demo_args
from scipy import stats

from xdtrain.config import load_config, save_config
from xdtrain.errors import UserError
from xdtrain.evaluate import main as eval_main
from xdtrain.queue import main as queue_main
from xdtrain.queue import parse
from xdtrain.report import main as report_main
from xdtrain.runlog import read_metrics
from xdtrain.train import main as train_main

BIN = Path(sys.executable).parent


def tiny(config: str, shards: Path, run: Path, *extra: str) -> list[str]:
    return [*demo_args(config, shards, run, "data.batch_size=4", "train.epochs=1"), *extra]


def test_eval_reproduces_the_runs_own_test_row_and_draws(grid_runs, capsys):
    run = grid_runs / "pre0"
    assert eval_main([str(run), "--split", "test"]) == 0
    report = json.loads((run / "eval_test.json").read_text())
    test_row = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "test"][-1]
    for key, value in report["metrics"].items():
        assert test_row[key] == pytest.approx(value, abs=1e-9), key
    for plot in report["plots"]:
        assert Path(plot).read_bytes()[:4] == b"\x89PNG"
    assert {Path(p).name for p in report["plots"]} == {"overlays_test.png", "dice_test.png"}
    # dice_liver is shown in the per-region table: row liver, column dice
    out = capsys.readouterr().out.splitlines()
    (head,) = [line for line in out if "class / region" in line]
    liver = f"{report['metrics']['dice_liver']:.4f}"
    assert "dice" in head and any("liver" in line and liver in line for line in out), out


def test_eval_classification_plots(packed, tmp_path):
    run = tmp_path / "cx8"
    assert train_main(tiny("ft_chestxray8.yaml", packed["chestxray8"], run)) == 0
    assert eval_main([str(run), "--split", "val", "--checkpoint", "last"]) == 0
    assert (run / "roc_val_last.png").exists() and (run / "eval_val_last.json").exists()
    im = tmp_path / "im"
    assert train_main(tiny("ft_imagenet.yaml", packed["imagenet"], im)) == 0
    assert eval_main([str(im), "--batch-size", "3"]) == 0
    assert (im / "confusion_test.png").exists()


def test_eval_with_a_missing_or_damaged_checkpoint_says_so(grid_runs, tmp_path):
    with pytest.raises(UserError, match="no config.yaml"):
        eval_main([str(tmp_path)])
    with pytest.raises(UserError, match=r"none.pt: no checkpoint \(--checkpoint takes final"):
        eval_main([str(grid_runs / "pre1"), "--checkpoint", str(tmp_path / "none.pt")])
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((grid_runs / "pre1" / "final.pt").read_bytes()[:5000])
    with pytest.raises(UserError, match="damaged checkpoint") as info:
        eval_main([str(grid_runs / "pre1"), "--checkpoint", str(damaged)])
    assert "\n" not in str(info.value)
    other = tmp_path / "other.pt"
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, other)
    with pytest.raises(UserError, match="does not fit the run's unet_resnet18"):
        eval_main([str(grid_runs / "pre1"), "--checkpoint", str(other)])


def test_report_table_statistics_and_heatmap(grid_runs, tmp_path, capsys):
    unfinished = grid_runs / "unfinished"
    unfinished.mkdir(exist_ok=True)
    (unfinished / "config.yaml").write_text((grid_runs / "pre0" / "config.yaml").read_text())
    out = tmp_path / "report"
    assert report_main([str(grid_runs), "--out", str(out)]) == 0
    text = (out / "results.md").read_text()
    assert "simclr-imagenet" in text and "scratch" in text
    assert "unfinished" in text and str(unfinished) in text  # listed, not averaged
    rows = {r["pretrain"]: r for r in _csv(out / "results.csv")}
    scores = {
        name: [_test(grid_runs / f"{name}{s}")["dice_liver"] for s in (0, 1)]
        for name in ("scratch", "pre")
    }
    pre = rows["simclr-imagenet"]  # named after the SimCLR run that wrote the encoder
    assert int(pre["seeds"]) == 2 and int(rows["scratch"]["seeds"]) == 2
    assert pre["settings"] == rows["scratch"]["settings"] == ""  # the same settings
    assert float(pre["mean"]) == pytest.approx(np.mean(scores["pre"]))
    delta = np.mean(scores["pre"]) - np.mean(scores["scratch"])
    assert float(pre["delta_vs_scratch"]) == pytest.approx(delta)
    import matplotlib.image

    heat = matplotlib.image.imread(out / "heatmap.png")
    assert heat.ndim == 3 and heat.shape[0] > 100 and heat.shape[1] > 100 and heat.std() > 0
    assert (out / "curves.png").exists() and (out / "runs.csv").exists()


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path) as fh:
        return list(csv.DictReader(fh))


def _test(run: Path) -> dict:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "test"][-1]


# Run folders written directly (config.yaml, env.json, metrics.jsonl), with chosen scores.

PRIMARY = {"lits": "dice_liver", "chestxray8": "auroc_mean"}
CX8 = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia", "No Finding",
]  # fmt: skip


def _run(
    folder: Path,
    value: float,
    seed: int = 0,
    pretrain: str = "",
    task: str = "lits",
    settings: tuple[str, ...] = (),
    world_size: int = 1,
    test: dict | None = None,
    curve: tuple[float, ...] = (),
) -> Path:
    """A finished finetuning run of ``configs/demo/ft_<task>.yaml`` with ``settings``
    (``KEY=VALUE``), scoring ``value`` on the test split; ``curve``: validation scores of
    epochs 0, 1, …; ``test``: more entries of the test row."""
    config = load_config(
        ROOT / "configs" / "demo" / f"ft_{task}.yaml",
        [f"run.seed={seed}", f"run.pretrain={pretrain}", f"run.name={folder.name}", *settings],
    )
    folder.mkdir(parents=True)
    save_config(config, folder / "config.yaml")
    (folder / "env.json").write_text(json.dumps({"world_size": world_size}))
    primary = PRIMARY[task]
    rows = [{"kind": "train", "epoch": 0, "step": 1, "loss": 1.0}]
    rows += [
        {"kind": "val", "epoch": e, "step": 2 * (e + 1), primary: v} for e, v in enumerate(curve)
    ]
    rows.append({"kind": "test", "epoch": len(curve), "step": 99, primary: value, **(test or {})})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _report(root: Path, capsys) -> tuple[list[dict], str, str]:
    """results.csv rows, results.md and stderr of ``xd-report root``."""
    out = root.parent / f"{root.name}_report"
    assert report_main([str(root), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    return _csv(out / "results.csv"), (out / "results.md").read_text(), err


def _welch(a: list[float], b: list[float]) -> float:
    expected = stats.ttest_ind(a, b, equal_var=False).pvalue
    assert np.isfinite(expected)  # the values are chosen so that scipy gives a number
    return float(expected)


def _auroc_row(missing: tuple[str, ...] = ()) -> dict:
    """ChestX-ray8 test-row entries: per-class AUROC, null for ``missing``."""
    row = {f"auroc/{name}": None if name in missing else 0.7 for name in CX8}
    row["auroc_classes"] = 14 - len([m for m in missing if m != "No Finding"])
    return row


SCRATCH = (0.60, 0.64)  # two seeds each, chosen so that Welch's p is a number
PRE = (0.70, 0.76)
OTHER = (0.90, 0.97)


@pytest.mark.parametrize(
    "task, setting, label",
    [
        ("lits", {"settings": ("optim.lr=0.01",)}, "optim.lr=0.01"),
        ("lits", {"settings": ("train.epochs=40",)}, "train.epochs=40"),
        ("lits", {"settings": ("data.batch_size=16",)}, "data.batch_size=16"),
        ("lits", {"settings": ("data.image_size=96",)}, "data.image_size=96"),
        ("lits", {"settings": ("train.deterministic=true",)}, "train.deterministic=true"),
        ("lits", {"world_size": 2}, "world_size=2"),
        (
            "chestxray8",
            {"test": _auroc_row(("Hernia",))},
            "auroc_classes=13, auroc_without=Hernia",
        ),
    ],
)
def test_report_splits_runs_that_differ_in_a_defining_setting(
    tmp_path, capsys, task, setting, label
):
    root = tmp_path / "runs"
    base = {"test": _auroc_row()} if task == "chestxray8" else {}
    for seed in (0, 1):
        _run(root / f"scratch{seed}", SCRATCH[seed], seed, task=task, **base)
        _run(root / f"pre{seed}", PRE[seed], seed, "simclr-imagenet", task, **base)
        _run(root / f"other{seed}", OTHER[seed], seed, "simclr-imagenet", task, **setting)
    rows, text, err = _report(root, capsys)
    key = label.split("=")[0]
    keys = "auroc_classes, auroc_without" if key == "auroc_classes" else key
    usual = {
        "optim.lr": "0.002",
        "train.epochs": "25",  # configs/demo/ft_lits.yaml
        "data.batch_size": "32",
        "data.image_size": "32",
        "train.deterministic": "false",
        "world_size": "1",
        "auroc_classes": "14, auroc_without=–",
    }
    assert len(rows) == 3, rows  # scratch, pretrained, pretrained with the other setting
    by_settings = {(r["pretrain"], r["settings"]): r for r in rows}
    ours = f"{key}={usual[key]}"
    assert set(by_settings) == {
        ("scratch", ours),
        ("simclr-imagenet", ours),
        ("simclr-imagenet", label),
    }
    pre, other = by_settings[("simclr-imagenet", ours)], by_settings[("simclr-imagenet", label)]
    assert float(pre["mean"]) == pytest.approx(np.mean(PRE), abs=1e-12)
    assert float(pre["delta_vs_scratch"]) == pytest.approx(np.mean(PRE) - np.mean(SCRATCH))
    assert float(pre["p_welch"]) == pytest.approx(_welch(list(PRE), list(SCRATCH)), rel=1e-9)
    assert float(other["mean"]) == pytest.approx(np.mean(OTHER), abs=1e-12)
    assert other["delta_vs_scratch"] == "" and other["p_welch"] == ""  # no matching scratch
    assert int(other["seeds"]) == 2 and int(pre["seeds"]) == 2
    notes = text.split("## Notes")[1]
    assert f"runs differ in {keys}; split into rows" in notes
    assert f"[{label}]: no scratch run with the same settings (scratch has {ours})" in notes
    assert f"runs differ in {keys}" in err


def _differ_by(root: Path, settings: tuple[str, ...], key: str) -> None:
    """The demo's runs plus the docs' torchrun example: 25 epochs on 2 processes."""
    for seed in (0, 1):
        _run(root / f"scratch{seed}", SCRATCH[seed], seed, settings=settings)
        _run(root / f"pre{seed}", PRE[seed], seed, "simclr-imagenet", settings=settings)
    for seed in (0, 1):
        _run(
            root / f"ddp{seed}", OTHER[seed], seed, "simclr-imagenet",
            settings=(*settings, key), world_size=2,
        )  # fmt: skip


def test_report_labels_rows_with_every_differing_setting(tmp_path, capsys):
    root = tmp_path / "runs"
    _differ_by(root, ("train.epochs=10",), "train.epochs=25")
    rows, text, err = _report(root, capsys)
    labels = {r["settings"] for r in rows}
    assert labels == {"train.epochs=10, world_size=1", "train.epochs=25, world_size=2"}
    assert "runs differ in train.epochs, world_size" in text
    assert "(scratch has train.epochs=10, world_size=1)" in text


def test_report_pools_runs_that_differ_only_in_keys_that_do_not_define_the_experiment(
    tmp_path, capsys
):
    root = tmp_path / "runs"
    for seed, extra in enumerate(
        [
            ("data.workers=1", "train.log_every=5", "data.shards=/a", "train.compile=true"),
            ("data.workers=3", "train.log_every=9", "data.shards=/b", "data.device=cpu"),
        ]
    ):
        _run(root / f"scratch{seed}", SCRATCH[seed], seed, settings=extra)
        _run(
            root / f"pre{seed}", PRE[seed], seed, "simclr-imagenet",
            settings=(*extra, f"train.checkpoint_minutes={seed + 1}", "train.channels_last=false"),
        )  # fmt: skip
    rows, text, _ = _report(root, capsys)
    assert [(r["pretrain"], r["settings"], r["seeds"]) for r in rows] == [
        ("scratch", "", "2"),
        ("simclr-imagenet", "", "2"),
    ]
    assert float(rows[1]["p_welch"]) == pytest.approx(_welch(list(PRE), list(SCRATCH)), rel=1e-9)
    assert "## Notes" not in text


def test_report_counts_a_repeated_seed_once_and_names_its_folders(tmp_path, capsys):
    root = tmp_path / "runs"
    first = _run(root / "scratch0", 0.60, 0)
    again = _run(root / "scratch0_again", 0.66, 0)  # the same seed and settings
    _run(root / "scratch1", 0.70, 1)
    pre = [0.80, 0.83, 0.89]
    for seed, value in enumerate(pre):
        _run(root / f"pre{seed}", value, seed, "simclr-imagenet")
    rows, text, err = _report(root, capsys)
    scratch, pretrained = rows
    per_seed = [(0.60 + 0.66) / 2, 0.70]
    assert (scratch["seeds"], scratch["runs"]) == ("2", "3")
    assert float(scratch["mean"]) == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert float(scratch["std"]) == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
    assert float(pretrained["p_welch"]) == pytest.approx(_welch(pre, per_seed), rel=1e-9)
    assert float(pretrained["delta_vs_scratch"]) == pytest.approx(np.mean(pre) - 0.665)
    note = f"seed 0 ran 2 times ({first}, {again}); their mean counts as one seed"
    assert note in text and note in err
    header = next(line for line in text.splitlines() if line.startswith("| task"))
    assert "| n (seeds) |" in header
    assert "| 2 | 3 | 0.665 ± 0.049 |" in text and "| 3 | 3 | 0.840 ± 0.046 |" in text


def test_report_warns_of_findings_left_out_of_the_mean_auroc(tmp_path, capsys):
    root = tmp_path / "runs"
    full = _auroc_row(("No Finding",))  # No Finding is never in the mean: no warning
    short = _auroc_row(("Hernia", "Edema", "No Finding"))
    for seed in (0, 1):
        _run(root / f"scratch{seed}", SCRATCH[seed], seed, task="chestxray8", test=full)
    run = _run(root / "pre0", 0.7, 0, "simclr-imagenet", "chestxray8", test=short)
    rows, text, err = _report(root, capsys)
    warning = f"{run}: auroc_mean averages 12 of 14 findings; no test AUROC (one class only) for "
    assert warning + "Edema, Hernia" in text and warning + "Edema, Hernia" in err
    assert text.count("averages") == 1 and "No Finding" not in text
    assert {r["settings"] for r in rows} == {
        "auroc_classes=14, auroc_without=–",
        "auroc_classes=12, auroc_without=Edema, Hernia",
    }


def test_report_heatmap_and_curves_keep_every_row_apart(tmp_path, capsys):
    from xdtrain.report import cells, curve_series, find_runs, heatmap_table

    root = tmp_path / "runs"
    curves = {"scratch": (0.1, 0.2), "pre": (0.3, 0.5), "ddp": (0.6, 0.8)}
    for seed in (0, 1):
        shift = 0.01 * seed
        for name, pretrain, extra, world in [
            ("scratch", "", (), 1),
            ("pre", "simclr-imagenet", (), 1),
            ("ddp", "simclr-imagenet", (), 2),
            ("linear", "simclr-imagenet", ("model.frozen_encoder=true",), 1),
            ("tenth", "simclr-imagenet", ("data.fraction=0.1",), 1),
        ]:
            points = tuple(v + shift for v in curves.get(name, (0.0, 0.05)))
            _run(
                root / f"{name}{seed}", PRE[seed] if name != "scratch" else SCRATCH[seed],
                seed, pretrain, settings=extra, world_size=world, curve=points,
            )  # fmt: skip
    rows = cells(find_runs([root]))
    lines = curve_series(rows)["lits"]
    assert set(lines) == {
        "scratch, full, 100% train [world_size=1] (n=2)",
        "simclr-imagenet, full, 100% train [world_size=1] (n=2)",
        "simclr-imagenet, full, 100% train [world_size=2] (n=2)",
        "simclr-imagenet, linear, 100% train (n=2)",
        "simclr-imagenet, full, 10% train (n=2)",
    }
    for label, expected in [("[world_size=2]", (0.605, 0.805)), ("[world_size=1]", (0.305, 0.505))]:
        epochs, values, stds = zip(
            *lines[f"simclr-imagenet, full, 100% train {label} (n=2)"], strict=True
        )
        assert epochs == (0, 1) and values == pytest.approx(expected, abs=1e-12)  # seed mean
        assert stds == pytest.approx((np.std((0, 0.01), ddof=1),) * 2)  # over the seeds
    values, pretrains, columns, texts = heatmap_table(rows)
    assert pretrains == ["scratch", "simclr-imagenet"]
    assert columns == [
        "lits: dice_liver\nfull, 100% train\nworld_size=1",
        "lits: dice_liver\nfull, 100% train\nworld_size=2",
        "lits: dice_liver\nlinear, 100% train",
        "lits: dice_liver\nfull, 10% train",
    ]
    delta = f"{np.mean(PRE) - np.mean(SCRATCH):+.3f}"
    p = f"{_welch(list(PRE), list(SCRATCH)):.2g}"
    pre, scratch = (f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" for v in (PRE, SCRATCH))
    assert texts == [
        [f"{scratch}\nn=2\n(reference)", "–", "–", "–"],
        [f"Δ {delta}\n{pre}\nn=2, p={p}"] + [f"{pre}\nn=2, no scratch"] * 3,
    ]
    assert values[1, 0] == pytest.approx(np.mean(PRE) - np.mean(SCRATCH))
    assert np.isnan(values[1, 1:]).all() and np.isnan(values[0]).all()


def _pretraining(folder: Path, *settings: str) -> Path:
    """A SimCLR run folder (config.yaml, encoder.pt) with ``settings``; its encoder path."""
    config = load_config(ROOT / "configs" / "demo" / "pt_simclr_imagenet.yaml", list(settings))
    folder.mkdir(parents=True)
    save_config(config, folder / "config.yaml")
    (folder / "encoder.pt").write_bytes(repr(settings).encode())
    return folder / "encoder.pt"


def test_report_splits_runs_whose_encoders_come_from_different_pretraining_runs(tmp_path, capsys):
    """Two SimCLR runs (1 and 100 epochs) give encoders of one label, simclr-imagenet:
    their finetuned runs are two rows, each compared with the same scratch row."""
    root = tmp_path / "runs"
    short = _pretraining(root / "pt_short", "train.epochs=1")
    long = _pretraining(root / "pt_long", "train.epochs=100")
    for seed in (0, 1):
        _run(root / f"scratch{seed}", SCRATCH[seed], seed)
        weights = [f"model.encoder_weights={short}"]
        _run(root / f"short{seed}", PRE[seed], seed, settings=weights)
        weights = [f"model.encoder_weights={long}"]
        _run(root / f"long{seed}", OTHER[seed], seed, settings=weights)
    rows, text, err = _report(root, capsys)
    by_label = {(r["pretrain"], r["settings"]): r for r in rows}
    assert set(by_label) == {
        ("scratch", ""),
        ("simclr-imagenet", "pretrain.train.epochs=1"),
        ("simclr-imagenet", "pretrain.train.epochs=100"),
    }
    for label, values in (("1", PRE), ("100", OTHER)):
        row = by_label[("simclr-imagenet", f"pretrain.train.epochs={label}")]
        assert int(row["seeds"]) == 2 and int(row["runs"]) == 2
        assert float(row["delta_vs_scratch"]) == pytest.approx(np.mean(values) - np.mean(SCRATCH))
        assert float(row["p_welch"]) == pytest.approx(_welch(list(values), list(SCRATCH)))
    assert "pretraining runs that differ in pretrain.train.epochs" in text
    assert "pretrain.train.epochs" in err and "ran 2 times" not in text


def _manifest(folder: Path, digest: str) -> Path:
    """A LiTS shard folder's manifest whose test shard has the sha256 ``digest``."""
    folder.mkdir(parents=True)
    shard = {"name": "test-000000.tar", "samples": 5, "sha256": digest, "tier": None}
    manifest = {
        "format": "xdtrain-shards/1",
        "dataset": "lits",
        "options": {"slices": "liver"},
        "fractions": {},
        "splits": {"test": {"samples": 5, "shards": [shard]}},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_report_splits_runs_that_read_differently_packed_shards(tmp_path, capsys):
    """Runs on two shard folders with other test shards are two rows; the same content
    packed into another folder is the same data (the path does not define the run)."""
    root = tmp_path / "runs"
    one = _manifest(tmp_path / "one", "a" * 64)
    copy = _manifest(tmp_path / "copy", "a" * 64)
    other = _manifest(tmp_path / "other", "b" * 64)
    for seed in (0, 1):
        _run(root / f"scratch{seed}", SCRATCH[seed], seed, settings=[f"data.shards={one}"])
        _run(root / f"scratchcopy{seed}", SCRATCH[seed], seed + 2, settings=[f"data.shards={copy}"])
        _run(root / f"scratch_other{seed}", OTHER[seed], seed, settings=[f"data.shards={other}"])
        pre = [f"data.shards={other}"]
        _run(root / f"pre{seed}", PRE[seed], seed, "simclr-imagenet", settings=pre)
    rows, text, _ = _report(root, capsys)
    scratch = [r for r in rows if r["pretrain"] == "scratch"]
    assert sorted(int(r["seeds"]) for r in scratch) == [2, 4]  # one and copy pooled
    (pre,) = [r for r in rows if r["pretrain"] != "scratch"]
    # compared with the scratch runs on the same shards only
    assert float(pre["delta_vs_scratch"]) == pytest.approx(np.mean(PRE) - np.mean(OTHER))
    assert pre["settings"].startswith("shards=") and "runs differ in shards" in text


def test_report_finds_a_relative_encoder_path_from_anywhere(tmp_path, capsys, monkeypatch):
    """A config's relative encoder path (relative to where training ran) still names the
    pretraining when xd-report runs from another folder."""
    project = tmp_path / "project"
    _pretraining(project / "checkpoints" / "pt", "train.epochs=3")
    relative = "checkpoints/pt/encoder.pt"
    for seed in (0, 1):
        _run(project / "checkpoints" / f"scratch{seed}", SCRATCH[seed], seed)
        weights = [f"model.encoder_weights={relative}"]
        _run(project / "checkpoints" / f"pre{seed}", PRE[seed], seed, settings=weights)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rows, _, _ = _report(project / "checkpoints", capsys)
    assert {r["pretrain"] for r in rows} == {"scratch", "simclr-imagenet"}


# --------------------------------------------------------------------------- xd-queue


def _jobs(path: Path, commands: list[str]) -> Path:
    path.write_text(
        "command,status\n# a comment that stays\n" + "".join(f"{c},\n" for c in commands)
    )
    return path


@pytest.mark.parametrize("executor", ["local", "slurm"])
def test_queue_refuses_non_xd_commands_and_shell_syntax_before_running_anything(tmp_path, executor):
    """Both executors check every line before the first job starts or is submitted."""
    ok = f"xd-synth imagenet --out {tmp_path / 'a'} --count 1 --quiet"
    for bad, message in [
        ("ls -la", "only xd-\\* commands run"),
        (f"xd-synth imagenet --out {tmp_path} ; rm -rf /", "shell syntax is not run"),
        ("xd-synth imagenet $(whoami)", "shell syntax is not run"),
    ]:
        jobs = _jobs(tmp_path / "jobs.csv", [ok, bad])
        before = jobs.read_text()
        with pytest.raises(UserError, match=message) as info:
            queue_main([str(jobs), "--executor", executor])
        assert "line 4" in str(info.value)
        assert jobs.read_text() == before and not (tmp_path / "a").exists()


def test_queue_survives_sigkill_and_resumes_with_the_interrupted_job(tmp_path):
    out = tmp_path / "data"
    jobs = _jobs(
        tmp_path / "jobs.csv",
        [
            f"xd-synth imagenet --out {out} --count 1 --quiet",
            f"xd-synth brats --out {out} --count 3 --size full --workers 1 --quiet",
            f"xd-synth lits --out {out} --count 1 --quiet",
        ],
    )
    proc = subprocess.Popen([str(BIN / "xd-queue"), str(jobs)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        lines = parse(jobs)
        if lines[3].status.startswith("running"):
            time.sleep(0.5)
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    statuses = [line.status for line in parse(jobs) if line.command]
    assert statuses[0] == "done" and statuses[1].startswith("running: pid ") and statuses[2] == ""
    assert "# a comment that stays" in jobs.read_text()
    assert subprocess.run([str(BIN / "xd-queue"), str(jobs)], capture_output=True).returncode == 0
    statuses = [line.status for line in parse(jobs) if line.command]
    assert statuses == ["done", "done", "done"]
    logs = jobs.with_name("jobs.csv.logs")
    # logs are named by the line's number in the file (its header is line 1)
    assert (logs / "job0003.log").read_text().count("$ xd-synth") == 1  # not rerun
    assert (logs / "job0004.log").read_text().count("$ xd-synth") == 2  # rerun
    assert (out / "brats").is_dir() and (out / "lits").is_dir()


def test_queue_marks_a_failed_job_with_its_log(tmp_path):
    jobs = _jobs(tmp_path / "jobs.csv", [f"xd-shard --dataset brats --src {tmp_path / 'none'}"])
    assert queue_main([str(jobs)]) == 1
    (line,) = [line for line in parse(jobs) if line.command]
    assert line.status.startswith("failed: ") and Path(line.status[8:]).is_file()
    message = (
        f"error: {tmp_path / 'none'}: source folder not found; pass --src with the raw brats "
        "data set (xd-synth writes a small one)"
    )
    assert message in Path(line.status[8:]).read_text().splitlines()


def test_grid_writes_loadable_configs_and_jobs(tmp_path):
    out = tmp_path / "grid"
    argv = [
        "grid",
        "--pretrain",
        "none,imagenet",
        "--tasks",
        "brats,lits",
        "--seeds",
        "2",
        "--fractions",
        "1.0,0.1",
        "--linear",
        "--configs",
        str(ROOT / "configs"),
        "--out",
        str(out),
    ]
    assert queue_main(argv) == 0
    lines = [line for line in parse(out / "jobs.csv") if line.command]
    # 1 pretraining; per task and fraction: scratch full, imagenet full and linear; x 2 seeds
    assert len(lines) == 1 + 2 * 2 * 3 * 2
    assert lines[0].argv[1].endswith("pt_imagenet.yaml")
    for line in lines:
        config = load_config(line.argv[1])
        assert config.run.output_dir == str(out / "runs")
    linear = load_config(out / "configs" / "ft_lits_imagenet_f0.1_linear_s1.yaml")
    assert linear.model.frozen_encoder and linear.data.fraction == 0.1 and linear.run.seed == 1
    assert linear.model.encoder_weights == str(out / "runs" / "pt_imagenet" / "encoder.pt")
    assert linear.run.pretrain == "simclr-imagenet"
    with pytest.raises(UserError, match="--tasks"):
        queue_main(["grid", "--tasks", "mnist", "--out", str(out)])


def test_grid_takes_the_hospital_ct_as_pretraining_source_and_task(tmp_path):
    """ct is a pt_simclr_ct.yaml and an ft_ct.yaml (task classify): intra- against
    cross-domain pretraining in one grid; the default tasks are every ft_*.yaml."""
    out = tmp_path / "grid"
    configs = ["--configs", str(ROOT / "configs"), "--out", str(out), "--seeds", "1"]
    assert queue_main(["grid", "--pretrain", "none,imagenet,ct", "--tasks", "ct", *configs]) == 0
    lines = [line for line in parse(out / "jobs.csv") if line.command]
    assert [Path(line.argv[1]).name for line in lines[:2]] == ["pt_imagenet.yaml", "pt_ct.yaml"]
    pretraining = load_config(lines[1].argv[1])
    assert pretraining.task == "simclr" and pretraining.data.dataset == "dicom"
    intra = load_config(out / "configs" / "ft_ct_ct_f1_full_s0.yaml")
    assert intra.task == "classify" and intra.data.shards.endswith("shards/ct")
    assert intra.model.encoder_weights == str(out / "runs" / "pt_ct" / "encoder.pt")
    assert intra.run.pretrain == "simclr-ct"
    assert len(lines) == 2 + 3  # scratch, imagenet, ct
    assert queue_main(["grid", "--pretrain", "none", *configs]) == 0
    tasks = {load_config(line.argv[1]).task for line in parse(out / "jobs.csv") if line.command}
    assert tasks == {"imagenet", "chestxray8", "brats", "lits", "classify"}
    with pytest.raises(UserError, match="pt_simclr_<name>.yaml"):
        queue_main(["grid", "--pretrain", "radnet", *configs])


def test_queue_reads_the_study_words_open_and_completed(tmp_path):
    """Jobs.csv of the study says open/completed: a completed line never runs again, an open
    one runs and is marked completed; an unknown word stops the queue before any job."""
    ran = [tmp_path / f"out{n}" for n in range(4)]
    commands = [f"xd-synth lits --out {folder} --count 1 --quiet" for folder in ran]
    jobs = tmp_path / "Jobs.csv"
    jobs.write_text(
        "Command, Status\n"
        f"{commands[0]},completed\n{commands[1]},open\n{commands[2]},Open\n{commands[3]},DONE\n"
    )
    assert queue_main([str(jobs)]) == 0
    assert [folder.exists() for folder in ran] == [False, True, True, False]
    assert [line.status for line in parse(jobs) if line.command] == [
        "completed",
        "completed",
        "completed",
        "done",
    ]
    for word in ("finished", "complete", "skip"):
        jobs.write_text(f"command,status\n{commands[0]},{word}\n{commands[1]},open\n")
        before = jobs.read_text()
        with pytest.raises(UserError, match=f"line 2: unknown status '{word}'"):
            queue_main([str(jobs)])
        assert jobs.read_text() == before
    # a file in xdtrain's own words keeps them
    jobs.write_text(f"command,status\n{commands[3]},\n")
    assert queue_main([str(jobs)]) == 0
    assert [line.status for line in parse(jobs) if line.command] == ["done"]


def test_queue_keeps_a_spreadsheet_jobs_file_as_it_was_written(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark and ends lines in CRLF: read, and
    written back with both."""
    out = tmp_path / "out"
    jobs = tmp_path / "Jobs.csv"
    text = f"command,status\r\nxd-synth lits --out {out} --count 1 --quiet,open\r\n"
    jobs.write_bytes(codecs.BOM_UTF8 + text.encode())
    assert queue_main([str(jobs)]) == 0
    assert out.is_dir()
    assert jobs.read_bytes() == codecs.BOM_UTF8 + text.replace(",open", ",completed").encode()
