"""The figures of xd-eval, xd-train and xd-report (xdtrain.plots): what each one shows, read
off the matplotlib objects just before they are saved (axis labels, titles, legends, cell
texts, line styles), on small made-up inputs: seconds, no training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT
from matplotlib.colors import to_hex
from sklearn.metrics import roc_auc_score

from xdtrain import plots
from xdtrain.config import load_config, save_config
from xdtrain.evaluate import Collector, write_plots
from xdtrain.report import SCRATCH, cells, figures, find_runs, heatmap_table
from xdtrain.runlog import plot_curves
from xdtrain.shards import manifest as manifests

FINDINGS = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia", "No Finding",
]  # fmt: skip


def _axes(ax) -> dict:
    legend = ax.get_legend()
    return {
        "title": ax.get_title(),
        "xlabel": ax.get_xlabel(),
        "ylabel": ax.get_ylabel(),
        "legend": [t.get_text() for t in legend.get_texts()] if legend else [],
        "lines": [
            {"label": line.get_label(), "colour": to_hex(line.get_color()), "style": line.get_ls()}
            for line in ax.get_lines()
        ],
        "texts": [(t.get_text(), t.get_position(), t.get_color()) for t in ax.texts],
        "collections": ax.collections,
    }


@pytest.fixture
def saved(monkeypatch):
    """The figures written through ``plots._save``, as ``{"suptitle", "axes": [...],
    "colourbars": [labels], "legends": [figure legends' texts]}``, read before the figure
    is closed."""
    seen = []
    real = plots._save

    def spy(fig, path, **kwargs):
        bars = [a for a in fig.axes if a.get_label() == "<colorbar>"]
        seen.append(
            {
                "path": Path(path),
                "suptitle": fig._suptitle.get_text() if fig._suptitle else "",
                "axes": [_axes(a) for a in fig.axes if a not in bars],
                "colourbars": [a.get_ylabel() for a in bars],
                "legends": [[t.get_text() for t in legend.get_texts()] for legend in fig.legends],
            }
        )
        return real(fig, path, **kwargs)

    monkeypatch.setattr(plots, "_save", spy)
    return seen


def _png(path: Path) -> None:
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_line_styles_of_30_series_differ():
    pairs = [tuple(plots.line_style(i).values()) for i in range(30)]
    assert len(set(pairs)) == 30
    assert all(a[0] != b[0] and a[1] != b[1] for a, b in zip(pairs, pairs[1:], strict=False))
    assert len({tuple(plots.line_style(i, marker=True).values()) for i in range(60)}) == 60


def test_roc_curves_of_15_findings_are_told_apart_with_their_auroc(tmp_path, saved):
    rng = np.random.default_rng(0)
    targets = (rng.random((200, 15)) < 0.3).astype(np.uint8)
    targets[:, 13] = 0  # Hernia: one label only, no curve
    scores = targets * 0.4 + rng.random((200, 15))
    _png(plots.roc_curves(scores, targets, FINDINGS, tmp_path / "roc.png", "ROC, test"))
    (ax,) = saved[0]["axes"]
    assert ax["xlabel"].startswith("false positive rate")
    assert ax["ylabel"].startswith("true positive rate")
    assert "ROC, test" in ax["title"] and "14 of 15 classes drawn" in ax["title"]
    curves = [line for line in ax["lines"] if not line["label"].startswith("chance")]
    assert len(curves) == 14
    assert len({(c["colour"], c["style"]) for c in curves}) == 14
    legend = ax["legend"]
    assert len(legend) == 14 + 2  # the curves, chance, the finding not drawn
    for i, name in enumerate(FINDINGS):
        if i == 13:
            continue
        auroc = roc_auc_score(targets[:, i], scores[:, i])
        assert f"{name} (AUROC {auroc:.3f})" in legend
    assert legend[-2] == "chance (AUROC 0.5)"
    assert legend[-1].replace("\n", " ") == "not drawn (one label only): Hernia"


def test_confusion_shows_every_count_in_a_contrasting_colour(tmp_path, saved):
    matrix = np.array([[50, 2, 0], [3, 41, 7], [0, 1, 12]])
    names = ["tench", "goldfish", "great white shark, white shark"]
    _png(plots.confusion(matrix, names, tmp_path / "c.png", "Confusion matrix, test"))
    (ax,) = saved[0]["axes"]
    assert (ax["xlabel"], ax["ylabel"]) == ("predicted class", "true class")
    assert "Confusion matrix, test" in ax["title"] and "116 samples" in ax["title"]
    cells = {(round(y), round(x)): (text, colour) for text, (x, y), colour in ax["texts"]}
    assert {k: v[0] for k, v in cells.items()} == {
        (i, j): str(v) for (i, j), v in np.ndenumerate(matrix)
    }
    assert cells[(0, 0)][1] == "white" and cells[(0, 2)][1] == "black"  # dark, light cell
    assert saved[0]["colourbars"] == ["samples (count)"]


def test_confusion_of_many_classes_says_what_it_shows_instead_of_counts(tmp_path, saved):
    n = plots.MAX_COUNTED_CLASSES + 5
    matrix = np.eye(n, dtype=np.int64) * 9 + 1
    plots.confusion(matrix, [f"c{i}" for i in range(n)], tmp_path / "c.png")
    (ax,) = saved[0]["axes"]
    assert ax["texts"] == []
    assert "counts not shown" in ax["title"]
    assert saved[0]["colourbars"] == ["fraction of the true class"]


def _segmentation_batch(cases: list[int], slices: list[int]) -> tuple[dict, torch.Tensor]:
    mask = torch.zeros(len(cases), 8, 8, dtype=torch.int64)
    mask[:, 2:5, 2:5] = 1
    mask[:, 3, 3] = 2
    batch = {
        "keys": [f"k{i}" for i in range(len(cases))],
        "image": torch.rand(len(cases), 1, 16, 16),
        "mask": mask,
        "case": torch.tensor(cases),
        "slice": torch.tensor(slices),
    }
    return batch, mask.roll(1, 2)


class _Details:
    details = {"regions": {"liver": {"dice_cases": {0: 0.9, 1: 0.8, 2: 0.7}}, "tumour": {}}}


def test_overlays_name_their_cases_and_classes_and_dice_counts_cases(tmp_path, saved):
    shards = tmp_path / "shards"
    shards.mkdir()
    record = {"format": manifests.FORMAT, "preprocessing": {"cases": ["volume-3", "volume-7"]}}
    (shards / manifests.NAME).write_text(json.dumps(record))
    collector = Collector("segmentation", overlays=3)
    collector(*_segmentation_batch([1, 0], [42, 5]))
    collector(*_segmentation_batch([0, 1], [6, 43]))
    assert [s[3:] for s in collector.samples] == [(1, 42), (0, 5), (0, 6)]
    _Details.details["regions"]["tumour"] = {"dice_cases": {0: 0.1, 1: 0.5, 2: 1.0}}

    class Shardset:
        folder = shards

    classes = ["background", "liver", "tumour"]
    written = write_plots(collector, _Details(), classes, tmp_path, "test", Shardset())
    assert [Path(p).name for p in written] == ["overlays_test.png", "dice_test.png"]
    overlay, dice = saved
    titles = [ax["title"] for ax in overlay["axes"]]
    assert titles[:3] == [
        "image\nvolume-7, slice 42",
        "ground truth\nvolume-7, slice 42",
        "prediction\nvolume-7, slice 42",
    ]
    assert titles[3].endswith("volume-3, slice 5") and titles[8].endswith("volume-3, slice 6")
    assert overlay["legends"] == [["liver", "tumour"]]
    assert "Segmentation, test" in overlay["suptitle"]
    (ax,) = dice["axes"]
    assert ax["ylabel"] == "Dice per case (3-D)" and ax["xlabel"] == "region"
    assert "n = 3 cases" in ax["title"]
    assert [len(c.get_offsets()) for c in ax["collections"]] == [3, 3]  # every case a point
    assert ax["legend"] == ["case", "median", "mean"]


def test_classification_plots_of_xd_eval(tmp_path, saved):
    multilabel = Collector("multilabel", 0)
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    multilabel({"label": labels}, torch.tensor([[2.0, 0.1], [-1.0, 0.2], [0.5, 0.0]]))
    write_plots(multilabel, None, ["Mass", "Hernia"], tmp_path, "val_last")
    (ax,) = saved[0]["axes"]
    assert "val_last" in ax["title"] and ax["legend"][-1].endswith("Hernia")
    multiclass = Collector("multiclass", 0)
    multiclass({"label": torch.tensor([0, 1, 1])}, torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0]]))
    write_plots(multiclass, None, ["cat", "dog"], tmp_path, "test")
    (ax,) = saved[1]["axes"]
    assert sorted(t for t, _, _ in ax["texts"]) == ["0", "1", "1", "1"]
    assert (tmp_path / "confusion_test.png").exists() and (tmp_path / "roc_val_last.png").exists()


def test_learning_curve_names_both_axes_in_one_legend(tmp_path, saved):
    run = tmp_path / "ft_lits_scratch"
    run.mkdir()
    rows = [{"kind": "train", "epoch": 0, "step": s, "loss": 1 / s} for s in (1, 2, 3)]
    rows += [{"kind": "val", "epoch": e, "step": 2 * e + 1, "dice_liver": 0.5 + e} for e in (0, 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _png(plot_curves(run, "dice_liver"))
    loss, metric = saved[0]["axes"]
    assert loss["xlabel"] == "optimiser step"
    assert loss["ylabel"].startswith("train loss") and metric["ylabel"] == "val dice_liver"
    assert metric["legend"] == ["train loss (left)", "val dice_liver (right)"]
    assert "ft_lits_scratch" in loss["title"]


def _run(folder: Path, value: float, seed: int, pretrain: str, curve: tuple, *settings: str):
    """A finished LiTS finetuning run folder scoring ``value`` (as tests of xd-report do)."""
    config = load_config(
        ROOT / "configs" / "demo" / "ft_lits.yaml",
        [f"run.seed={seed}", f"run.pretrain={pretrain}", *settings],
    )
    folder.mkdir(parents=True)
    save_config(config, folder / "config.yaml")
    (folder / "env.json").write_text(json.dumps({"world_size": 1}))
    rows = [
        {"kind": "val", "epoch": e, "step": e + 1, "dice_liver": v} for e, v in enumerate(curve)
    ]
    rows.append({"kind": "test", "epoch": len(curve), "step": 99, "dice_liver": value})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def grid(tmp_path):
    """Rows of scratch and simclr-imagenet, two seeds each, in three (mode, fraction)
    settings, and one pretraining (simclr-ct) with one seed and no scratch of its kind."""
    root = tmp_path / "runs"
    for mode, extra in [
        ("full", ()),
        ("linear", ("model.frozen_encoder=true",)),
        ("tenth", ("data.fraction=0.1",)),
    ]:
        for seed in (0, 1):
            for name, base in [("scratch", 0.60), ("simclr-imagenet", 0.70)]:
                pretrain = "" if name == SCRATCH else name
                value = base + 0.04 * seed
                curve = (value - 0.2, value - 0.1 + 0.01 * seed)
                _run(root / f"{mode}_{name}{seed}", value, seed, pretrain, curve, *extra)
    _run(root / "ct", 0.8, 0, "simclr-ct", (0.5, 0.6), "train.epochs=3")
    return cells(find_runs([root]))


def test_report_heatmap_shows_n_and_p_in_every_cell_with_a_labelled_colour_bar(
    grid, tmp_path, saved
):
    values, pretrains, columns, texts = heatmap_table(grid)
    assert pretrains == [SCRATCH, "simclr-ct", "simclr-imagenet"]
    assert columns == [
        "lits: dice_liver\nfull, 100% train\ntrain.epochs=25",  # simclr-ct trained 3
        "lits: dice_liver\nfull, 100% train\ntrain.epochs=3",
        "lits: dice_liver\nlinear, 100% train",
        "lits: dice_liver\nfull, 10% train",
    ]
    for r in grid:
        if r["pretrain"] == "simclr-imagenet":
            cell = next(
                t
                for t in texts[2]
                if f"{r['mean']:.3f} ± {r['std']:.3f}" in t and "p=" in t and "Δ" in t
            )
            assert f"p={r['p_welch']:.2g}" in cell and "n=2" in cell
            assert f"Δ {r['delta_vs_scratch']:+.3f}" in cell
    assert all("n=2" in t and "p=" not in t for t in texts[0] if t != "–")  # scratch: n only
    assert [t for t in texts[1] if t != "–"] == ["0.800\nn=1, no scratch"]
    assert np.isfinite(values[2]).sum() == 3 and np.isnan(values[:2]).all()
    written = figures(grid, tmp_path)
    assert [p.name for p in written] == ["heatmap.png", "curves.png"]
    heat, curves = saved
    (ax,) = heat["axes"]
    shown = [t for t, _, _ in ax["texts"]]
    assert shown == [t for row in texts for t in row]
    assert sum("n=" in t for t in shown) == 7 and sum("p=" in t for t in shown) == 3
    assert ax["xlabel"] and ax["ylabel"] == "pretraining" and "Welch" in ax["title"]
    assert heat["colourbars"] == ["Δ test score vs scratch (the task's primary metric)"]
    (ax,) = curves["axes"]
    groups = {(r["pretrain"], r["mode"], r["fraction"]) for r in grid}
    drawn = [line for line in ax["lines"] if line["label"] in ax["legend"]]
    assert len(drawn) == len(groups) == 7
    assert len({(line["colour"], line["style"]) for line in drawn}) == 7
    assert ax["ylabel"] == "val dice_liver" and ax["xlabel"] == "epoch"
    assert sum("(n=2)" in label for label in ax["legend"]) == 6
    assert len(ax["collections"]) == 6  # a ± std band for each line of two seeds
    assert "mean over n seeds" in curves["suptitle"]
