"""Figures of the feature-space analysis: CKA heatmaps and diagonals, probe curves per stage,
2-D domain maps. Each function writes one PNG atomically (matplotlib, Agg) and returns its
path.

Lines are told apart by colour, line style and marker together (:func:`_style`), so 10 and
more series stay distinguishable, in print and for colour-blind readers too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from xdtrain.plots import _pyplot, _save

CKA_CMAP = "viridis"
COLOURS = tuple(f"C{i}" for i in range(10))
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")

METRIC_NAMES = {
    "knn_top1": "kNN top-1 accuracy",
    "knn_auroc": "kNN mean AUROC",
    "linear_top1": "linear-probe top-1 accuracy",
    "linear_auroc": "linear-probe mean AUROC",
}
MAP_AXES = {"tsne": "t-SNE", "umap": "UMAP", "pca": "PC"}


def _style(i: int) -> dict:
    """Line style of series ``i``: colour, line style and marker cycle with periods 10, 4
    and 8, so the first 40 series differ in the triple and neighbours in all three."""
    return {
        "color": COLOURS[i % len(COLOURS)],
        "linestyle": LINESTYLES[i % len(LINESTYLES)],
        "marker": MARKERS[i % len(MARKERS)],
    }


def _cell_text(value: float) -> str:
    """A heatmap cell's annotation: the value to 2 decimals (no "-0.00"), "n/a" for NaN/inf."""
    if not math.isfinite(value):
        return "n/a"
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


def _text_colour(value: float, cmap: str = CKA_CMAP) -> str:
    """ "white" or "black", whichever contrasts more with the colour of ``value`` on ``cmap``
    over 0..1 (WCAG relative luminance, threshold 0.179); "black" for NaN (a light grey
    cell)."""
    if not math.isfinite(value):
        return "black"
    import matplotlib

    rgb = np.asarray(matplotlib.colormaps[cmap](min(max(value, 0.0), 1.0))[:3])
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    luminance = float(linear @ np.array([0.2126, 0.7152, 0.0722]))
    return "white" if luminance < 0.179 else "black"


def _stage_ticks(ax, axis: str, stages: Sequence[str]) -> None:
    long = max((len(s) for s in stages), default=0) > 7
    if axis == "x":
        ax.set_xticks(
            range(len(stages)), stages, rotation=30 if long else 0, ha="right" if long else "center"
        )
    else:
        ax.set_yticks(range(len(stages)), stages)


def _legend_outside(ax, **kwargs):
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kwargs)


def cka_heatmap(
    matrix: np.ndarray,
    stages_a: list[str],
    stages_b: list[str],
    name_a: str,
    name_b: str,
    path: Path,
    title: str | None = None,
    samples: int | None = None,
) -> Path:
    """Heatmap of linear CKA ``matrix`` ``(len(stages_a), len(stages_b))`` between the stages
    of encoder ``name_a`` (rows) and ``name_b`` (columns), on a fixed 0..1 colour scale, each
    cell annotated to 2 decimals (NaN: grey, "n/a"). ``title`` defaults to
    "<name_a> vs <name_b>"; " (n = <samples>)" is appended when ``samples`` is given.

    Raises ``ValueError`` when the matrix shape does not match the stage lists."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (len(stages_a), len(stages_b)):
        raise ValueError(
            f"matrix shape {matrix.shape} does not match {len(stages_a)} x {len(stages_b)} stages"
        )
    plt = _pyplot()
    import matplotlib

    cmap = matplotlib.colormaps[CKA_CMAP].with_extremes(bad="0.85")
    rows, cols = matrix.shape
    fig, ax = plt.subplots(figsize=(0.9 * cols + 2.8, 0.75 * rows + 1.8))
    low = min(0.0, float(np.nanmin(matrix))) if np.isfinite(matrix).any() else 0.0
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=low, vmax=1.0)
    fontsize = 9 if max(rows, cols) <= 8 else 8
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            _cell_text(value),
            ha="center",
            va="center",
            color=_text_colour(value),
            fontsize=fontsize,
        )
    _stage_ticks(ax, "x", stages_b)
    _stage_ticks(ax, "y", stages_a)
    ax.set_xlabel(f"{name_b} stage")
    ax.set_ylabel(f"{name_a} stage")
    title = title if title is not None else f"{name_a} vs {name_b}"
    if samples is not None:
        title = f"{title} (n = {samples})"
    ax.set_title(title, fontsize=10)
    colourbar = fig.colorbar(image, ax=ax, shrink=0.85)
    colourbar.set_label("linear CKA (unbiased HSIC)")
    return _save(fig, path)


def _stage_lines(ax, series: Mapping[str, Sequence[float]], stages: Sequence[str]) -> None:
    """One line per entry of ``series`` (NaN: a gap), x = stage index."""
    x = np.arange(len(stages))
    lowest = 0.0
    for i, (label, values) in enumerate(series.items()):
        values = np.asarray(values, dtype=np.float64)
        ax.plot(x, values, label=label, lw=1.4, ms=5, **_style(i))
        if np.isfinite(values).any():
            lowest = min(lowest, float(np.nanmin(values)))
    _stage_ticks(ax, "x", stages)
    ax.set_xlabel("encoder stage")
    # unbiased CKA on a small sample can dip below 0: the axis goes down to show it
    ax.set_ylim(lowest - 0.05 if lowest < 0 else 0.0, 1.05)
    ax.set_xlim(-0.3, len(stages) - 0.7)
    ax.grid(True, color="0.9", lw=0.6)


def cka_diagonals(
    curves: Mapping[str, Sequence[float]], stages: list[str], path: Path, title: str
) -> Path:
    """Same-stage linear CKA (a heatmap's diagonal) along ``stages``, one line per encoder
    pair: ``curves[pair name]`` has one value per stage (NaN: a gap). The legend sits right
    of the axes.

    Raises ``ValueError`` when a curve's length differs from ``len(stages)``."""
    for name, values in curves.items():
        if len(values) != len(stages):
            raise ValueError(f"curve {name!r} has {len(values)} values for {len(stages)} stages")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(0.8 * len(stages) + 5.5, 4.2))
    _stage_lines(ax, curves, stages)
    ax.set_ylabel("linear CKA, same stage")
    ax.set_title(title, fontsize=10)
    _legend_outside(ax, fontsize=8, title="encoder pair", title_fontsize=8)
    return _save(fig, path)


def probe_curves(
    results: Mapping[str, Mapping[str, float]],
    stages: list[str],
    metric: str,
    path: Path,
    title: str,
    chance: float | None = None,
) -> Path:
    """Probe score per stage, one line per encoder: ``results[encoder label][stage]`` (a
    missing stage or NaN leaves a gap). The y label is the readable name of ``metric``
    (:data:`METRIC_NAMES`, else the key); ``chance`` draws a dashed grey "chance" line."""
    series = {
        label: [float(scores.get(stage, math.nan)) for stage in stages]
        for label, scores in results.items()
    }
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(0.8 * len(stages) + 5.5, 4.2))
    _stage_lines(ax, series, stages)
    if chance is not None:
        ax.axhline(chance, color="0.5", ls="--", lw=1.0, label="chance", zorder=1)
    ax.set_ylabel(METRIC_NAMES.get(metric, metric))
    ax.set_title(title, fontsize=10)
    _legend_outside(ax, fontsize=8, title="encoder", title_fontsize=8)
    return _save(fig, path)


def domain_map(
    coords: np.ndarray,
    groups: Sequence[str],
    path: Path,
    title: str,
    method: str,
    separation: float | None = None,
) -> Path:
    """Scatter of a 2-D map ``coords`` ``(n, 2)`` coloured and marked by ``groups`` (length
    n, the data set of each point; legend in order of first appearance, with counts).
    ``method`` names the axes ("t-SNE 1", "UMAP 1", "PC 1"; arbitrary units);
    ``separation`` (kNN group purity, :func:`xdtrain.analysis.maps.separation`) goes into
    the title.

    Raises ``ValueError`` when ``coords`` is not ``(n, 2)`` with one group per row."""
    coords = np.asarray(coords, dtype=np.float64)
    labels = np.asarray(groups)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(labels):
        raise ValueError(
            f"coords must be (n, 2) with one group per row, got {coords.shape} "
            f"and {len(labels)} groups"
        )
    names = list(dict.fromkeys(labels.tolist()))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    size = 10 if len(coords) <= 2000 else 4
    for i, name in enumerate(names):
        chosen = labels == name
        style = _style(i)
        ax.scatter(
            coords[chosen, 0],
            coords[chosen, 1],
            s=size,
            alpha=0.5,
            linewidths=0,
            color=style["color"],
            marker=style["marker"],
            label=f"{name} (n = {int(chosen.sum())})",
        )
    axis = MAP_AXES.get(method, method.upper())
    ax.set_xlabel(f"{axis} 1 (arbitrary units)")
    ax.set_ylabel(f"{axis} 2 (arbitrary units)")
    if separation is not None:
        title = f"{title}\nkNN group purity {separation:.2f}"
    ax.set_title(title, fontsize=10)
    legend = _legend_outside(ax, fontsize=8, title="data set", title_fontsize=8, markerscale=2)
    for handle in legend.legend_handles:
        handle.set_alpha(1.0)
    return _save(fig, path)
