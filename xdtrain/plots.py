"""Figures of ``xd-eval`` and ``xd-report``, written atomically as PNG (matplotlib, Agg)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def roc_curves(scores: np.ndarray, targets: np.ndarray, names: list[str], path: Path) -> Path:
    """One ROC curve per class with a positive and a negative example."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 6))
    for i, name in enumerate(names):
        column = targets[:, i]
        if column.min() == column.max():
            continue
        fpr, tpr, _ = roc_curve(column, scores[:, i])
        ax.plot(fpr, tpr, lw=1, label=f"{name} ({roc_auc_score(column, scores[:, i]):.2f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.5)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=6, loc="lower right")
    return _save(fig, path)


def confusion(matrix: np.ndarray, names: list[str], path: Path) -> Path:
    plt = _pyplot()
    size = max(4.0, 0.45 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ticks = range(len(names))
    short = [n.split(",")[0][:18] for n in names]
    ax.set_xticks(ticks, short, rotation=90, fontsize=6)
    ax.set_yticks(ticks, short, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(names) <= 20:
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, int(value), ha="center", va="center", fontsize=6)
    return _save(fig, path)


def overlays(images: list, truths: list, preds: list, path: Path, classes: int) -> Path:
    """Rows of image / truth / prediction for a few segmentation samples."""
    plt = _pyplot()
    rows = len(images)
    fig, axes = plt.subplots(rows, 3, figsize=(6, 2 * rows), squeeze=False)
    for r in range(rows):
        for c, (title, data) in enumerate(
            (("image", images[r]), ("truth", truths[r]), ("prediction", preds[r]))
        ):
            ax = axes[r][c]
            if c == 0:
                ax.imshow(data, cmap="gray")
            else:
                ax.imshow(images[r], cmap="gray")
                masked = np.ma.masked_where(data == 0, data)
                ax.imshow(masked, cmap="jet", vmin=0, vmax=max(classes - 1, 1), alpha=0.5)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(title, fontsize=8)
    return _save(fig, path)


def box_plot(values: dict[str, list[float]], ylabel: str, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(values) + 2, 4))
    names = list(values)
    ax.boxplot([values[n] for n in names])
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.05, 1.05)
    return _save(fig, path)


def heatmap(
    values: np.ndarray,
    rows: list[str],
    cols: list[str],
    title: str,
    path: Path,
    texts: list[list[str]] | None = None,
) -> Path:
    """A diverging map (0 in white) of ``values`` ``[len(rows), len(cols)]`` (NaN: no value,
    drawn blank), each cell annotated with ``texts[i][j]`` (default: the value as ``+0.012``,
    "–" for NaN)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 2.5, 0.8 * len(rows) + 2.0))
    finite = np.abs(values[np.isfinite(values)])
    scale = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    image = ax.imshow(values, cmap="RdBu", vmin=-scale, vmax=scale)
    ax.set_xticks(range(len(cols)), cols, fontsize=7)
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), value in np.ndenumerate(values):
        if texts is not None:
            text = texts[i][j]
        else:
            text = "–" if not np.isfinite(value) else f"{value:+.3f}"
        dark = np.isfinite(value) and abs(value) > 0.6 * scale
        color = "white" if dark else "black"
        ax.text(j, i, text, ha="center", va="center", color=color, fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path)


def grouped_curves(groups: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> Path:
    """One panel per group (task), one line per series, x = epoch: ``{panel: {line label:
    [(epoch, value)]}}``. Lines are drawn as given, one per label, never merged."""
    plt = _pyplot()
    names = list(groups)
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4 * max(1, len(names)), 3.4))
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, names, strict=False):
        for series, points in groups[name].items():
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", ms=3, label=series)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    return _save(fig, path)
