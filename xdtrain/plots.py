"""Figures of ``xd-eval`` and ``xd-report``, written atomically as PNG (matplotlib, Agg).

Readers compare differences of a few tenths of a percent, so every figure names its axes,
says what it shows in its title and tells its series apart in a legend; lines differ in
colour and line style together (:func:`line_style`), never in colour alone.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# tab10 by name, not matplotlib's "C0".."C9" (which follow the rc cycle a user may change)
COLOURS = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:gray",
    "tab:olive",
    "tab:cyan",
)
LINESTYLES = ("-", "--", ":")
MARKERS = ("o", "s", "^", "D")
# Above this many classes a confusion matrix cannot hold a readable count in every cell.
MAX_COUNTED_CLASSES = 30


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, rect: tuple[float, float, float, float] | None = None) -> Path:
    """Lay out (``rect``: the part of the figure the axes may fill, leaving the rest to a
    figure legend), write at 100 dpi to a temporary name, rename, close."""
    plt = _pyplot()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.tight_layout(rect=rect)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def line_style(i: int, marker: bool = False) -> dict:
    """Style of series ``i``: colour and line style cycle with periods 10 and 3, so the first
    30 series differ in the pair and neighbours in both (with ``marker``, period 4: 60)."""
    style = {"color": COLOURS[i % len(COLOURS)], "linestyle": LINESTYLES[i % len(LINESTYLES)]}
    if marker:
        style["marker"] = MARKERS[i % len(MARKERS)]
    return style


def text_colour(rgba) -> str:
    """``"black"`` or ``"white"``, whichever contrasts more with a cell of colour ``rgba`` (WCAG
    relative luminance, threshold 0.179)."""
    rgb = np.asarray(rgba[:3], dtype=float)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    return "white" if float(linear @ np.array([0.2126, 0.7152, 0.0722])) < 0.179 else "black"


def _wrap(text: str, width: int = 60) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def roc_curves(
    scores: np.ndarray,
    targets: np.ndarray,
    names: list[str],
    path: Path,
    title: str = "ROC curve per class",
) -> Path:
    """One ROC curve per class (scikit-learn's ``RocCurveDisplay``), its AUROC in the
    legend; a class with one label only in ``targets`` has no curve and is named in the
    legend as not drawn."""
    from matplotlib.lines import Line2D
    from sklearn.metrics import RocCurveDisplay

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 6.2))
    undrawn = []
    chance = None  # the chance line, drawn with the first curve and listed last
    for i, name in enumerate(names):
        column = targets[:, i]
        if column.min() == column.max():
            undrawn.append(name)
            continue
        display = RocCurveDisplay.from_predictions(
            column,
            scores[:, i],
            ax=ax,
            name=name,
            curve_kwargs={**line_style(i), "linewidth": 1.3},
            plot_chance_level=chance is None,
            chance_level_kw={"color": "black", "linestyle": "-.", "linewidth": 0.8},
        )
        display.line_.set_label(f"{name} (AUROC {display.roc_auc:.3f})")
        if chance is None:
            chance = display.chance_level_
            chance.set_label("chance (AUROC 0.5)")
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(handles)), key=lambda k: handles[k] is chance)
    handles, labels = [handles[k] for k in order], [labels[k] for k in order]
    if undrawn:
        text = _wrap(f"not drawn (one label only): {', '.join(undrawn)}", 34)
        handles.append(Line2D([], [], linestyle="none"))
        labels.append(text)
    ax.legend(
        handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, borderaxespad=0
    )
    ax.set_xlabel("false positive rate (1 − specificity, 0–1)")
    ax.set_ylabel("true positive rate (sensitivity, 0–1)")
    drawn = len(names) - len(undrawn)
    ax.set_title(f"{title}\n{len(targets)} samples, {drawn} of {len(names)} classes drawn")
    return _save(fig, path)


def confusion(
    matrix: np.ndarray, names: list[str], path: Path, title: str = "Confusion matrix"
) -> Path:
    """Counts of (true, predicted) class (scikit-learn's ``ConfusionMatrixDisplay``), each
    cell's count in a colour that contrasts with it. With more than
    :data:`MAX_COUNTED_CLASSES` classes no count would be legible: the cells then show the
    fraction of each true class (rows sum to 1), without numbers, and the title says so."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    n = len(names)
    counted = n <= MAX_COUNTED_CLASSES
    matrix = np.asarray(matrix)
    if counted:
        shown, label, scale = matrix, "samples (count)", {}
        size = min(max(5.0, 0.42 * n + 2.5), 16.0)
    else:
        totals = matrix.sum(1, keepdims=True)
        shown = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
        label, scale, size = "fraction of the true class", {"vmin": 0.0, "vmax": 1.0}, 16.0
    fontsize = float(np.clip(180 / max(n, 1), 6, 10))
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    short = [name.split(",")[0][:18] for name in names] if n <= 100 else None
    display = ConfusionMatrixDisplay(shown, display_labels=short).plot(
        ax=ax,
        cmap="Blues",
        include_values=counted,
        values_format="d",
        colorbar=False,
        xticks_rotation="vertical",
        im_kw=scale,
        text_kw={"fontsize": fontsize},
    )
    if counted:
        for (i, j), text in np.ndenumerate(display.text_):
            text.set_color(text_colour(display.im_.cmap(display.im_.norm(shown[i, j]))))
    if short is None:
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        ax.tick_params(labelsize=min(fontsize, 8))
    fig.colorbar(display.im_, ax=ax, shrink=0.8, label=label)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    what = "" if counted else f"; {n} classes: fraction of each true class, counts not shown"
    ax.set_title(_wrap(f"{title} ({int(matrix.sum())} samples{what})"), fontsize=10)
    return _save(fig, path)


def class_colours(classes: int) -> np.ndarray:
    """RGBA ``[classes, 4]``: transparent for class 0 (background), a tab10 colour for the
    others (an overlay's palette and its legend's)."""
    from matplotlib.colors import to_rgba

    colours = np.zeros((classes, 4))
    for c in range(1, classes):
        colours[c] = to_rgba(COLOURS[(c - 1) % len(COLOURS)], 0.55)
    return colours


def overlays(
    images: Sequence,
    truths: Sequence,
    preds: Sequence,
    path: Path,
    classes: Sequence[str],
    titles: Sequence[str] | None = None,
    title: str = "Segmentation samples",
) -> Path:
    """Rows of image / ground truth / prediction for a few segmentation samples, the masks
    drawn over the image in one colour per class; ``classes``: the class names (0:
    background, not drawn); ``titles``: what each row is (its case id and slice)."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    rows = len(images)
    palette = class_colours(len(classes))
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.9 * rows + 0.9), squeeze=False)
    for r in range(rows):
        for c, (column, data) in enumerate(
            (("image", images[r]), ("ground truth", truths[r]), ("prediction", preds[r]))
        ):
            ax = axes[r][c]
            ax.imshow(images[r], cmap="gray")
            if c > 0:
                labels = np.clip(np.asarray(data), 0, len(classes) - 1).astype(int)
                ax.imshow(palette[labels], interpolation="nearest")
            ax.set_axis_off()
            name = titles[r] if titles is not None else f"sample {r}"
            ax.set_title(f"{column}\n{name}", fontsize=7)
    handles = [
        Patch(facecolor=palette[c][:3], alpha=0.55, label=classes[c])
        for c in range(1, len(classes))
    ]
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=min(len(handles), 3),
        fontsize=7,
        title="classes",
        title_fontsize=7,
    )
    fig.suptitle(title, fontsize=9)
    legend = (0.35 + 0.15 * ((len(handles) + 2) // 3)) / fig.get_figheight()
    return _save(fig, path, rect=(0, legend, 1, 1))


def box_plot(
    values: dict[str, list[float]],
    path: Path,
    ylabel: str = "Dice per case (3-D)",
    title: str = "Dice per case",
) -> Path:
    """One box per region with every case drawn over it as a point (spread sideways by a
    fixed jitter) and the mean as a triangle; the title gives the number of cases."""
    from matplotlib.lines import Line2D

    plt = _pyplot()
    names = list(values)
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 3.2, 4.2))
    ax.boxplot(
        [values[n] for n in names],
        showfliers=False,  # every case is drawn as a point already
        showmeans=True,
        meanprops={"marker": "^", "markerfacecolor": "tab:red", "markeredgecolor": "tab:red"},
        medianprops={"color": "tab:orange"},
    )
    rng = np.random.default_rng(0)
    for k, name in enumerate(names, start=1):
        points = np.asarray(values[name], dtype=float)
        ax.scatter(k + rng.uniform(-0.15, 0.15, len(points)), points, s=9, alpha=0.6, c="k")
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.set_xlabel("region")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.05, 1.05)
    cases = max((len(v) for v in values.values()), default=0)
    ax.set_title(f"{title} (n = {cases} cases)", fontsize=10)
    ax.legend(
        handles=[
            Line2D([], [], color="k", marker="o", ms=3, linestyle="none", alpha=0.6, label="case"),
            Line2D([], [], color="tab:orange", label="median"),
            Line2D([], [], color="tab:red", marker="^", linestyle="none", label="mean"),
        ],
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize=7,
        borderaxespad=0,
    )
    return _save(fig, path)


def heatmap(
    values: np.ndarray,
    rows: list[str],
    cols: list[str],
    title: str,
    path: Path,
    *,
    colorbar: str,
    texts: list[list[str]] | None = None,
    xlabel: str = "",
    ylabel: str = "",
) -> Path:
    """A diverging map (0 in white, NaN in grey: no value) of ``values`` ``[len(rows),
    len(cols)]``, each cell annotated with ``texts[i][j]`` (default: the value as
    ``+0.012``, "–" for NaN); ``colorbar``: what the colours are."""
    import matplotlib

    plt = _pyplot()
    lines = max((t.count("\n") + 1 for row in texts or [] for t in row), default=1)
    fig, ax = plt.subplots(figsize=(1.7 * len(cols) + 3.2, (0.35 + 0.17 * lines) * len(rows) + 2.4))
    finite = np.abs(values[np.isfinite(values)])
    scale = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="0.88")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=-scale, vmax=scale)
    ax.set_aspect("auto")
    ax.set_xticks(range(len(cols)), cols, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for (i, j), value in np.ndenumerate(values):
        if texts is not None:
            text = texts[i][j]
        else:
            text = "–" if not np.isfinite(value) else f"{value:+.3f}"
        colour = text_colour(image.to_rgba(value)) if np.isfinite(value) else "black"
        ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8, label=colorbar)
    return _save(fig, path)


def grouped_curves(
    groups: dict[str, dict[str, list[tuple]]],
    path: Path,
    ylabels: dict[str, str] | None = None,
    title: str = "",
    xlabel: str = "epoch",
) -> Path:
    """One panel per group (task), one line per series: ``{panel: {line label: [(x, mean)
    or (x, mean, std)]}}``, a band of ± ``std`` where it is given (not None). Lines are drawn
    as given, one per label, never merged; ``ylabels``: each panel's y label."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    names = list(groups)
    panels = max(1, len(names))
    most = max((len(g) for g in groups.values()), default=1)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 3.8 + 0.2 * most), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        for k, (series, points) in enumerate(groups[name].items()):
            style = line_style(k, marker=True)
            if not points:
                ax.plot([], [], **style, label=f"{series}: no values")
                continue
            xs = np.array([p[0] for p in points], dtype=float)
            ys = np.array([p[1] for p in points], dtype=float)
            ax.plot(xs, ys, ms=3, linewidth=1.2, label=series, **style)
            std = np.array([p[2] if len(p) > 2 and p[2] is not None else np.nan for p in points])
            band = np.isfinite(std)
            if band.any():
                ax.fill_between(
                    xs, ys - std, ys + std, where=band, color=style["color"], alpha=0.15, lw=0
                )
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel((ylabels or {}).get(name, "value"))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)
