"""2-D maps (xdtrain.analysis.maps) on Gaussian clusters with a known answer, and the
figures of the feature-space analysis (xdtrain.analysis.figures): PNGs that open, with the
labels, annotations and legends the reader needs (read off the figure before it is saved)."""

from __future__ import annotations

import importlib
import math
import sys

import numpy as np
import pytest
from PIL import Image
from threadpoolctl import threadpool_limits

from xdtrain.analysis import figures, maps
from xdtrain.errors import UserError

STAGES = ["stem", "layer1", "layer2", "layer3", "layer4"]


def clusters(counts, spread=1.5, dims=64, seed=0):
    """Gaussian clusters in ``dims``-D, unit variance, centres drawn with standard deviation
    ``spread`` per axis (about ``spread * sqrt(2 * dims)`` apart; 0: one distribution);
    returns features (n, dims) float32 and group names."""
    rng = np.random.default_rng(seed)
    features, groups = [], []
    for i, count in enumerate(counts):
        centre = rng.normal(0.0, spread, dims)
        features.append(rng.normal(centre, 1.0, (count, dims)))
        groups += [f"set{i}"] * count
    return np.concatenate(features).astype(np.float32), groups


@pytest.fixture(autouse=True)
def one_thread():
    """t-SNE's OpenMP threads spin on a busy machine (10x slower): one thread in tests. The
    limit reaches only loaded runtimes, so scikit-learn's t-SNE is loaded first."""
    importlib.import_module("sklearn.manifold")
    with threadpool_limits(limits=1):
        yield


@pytest.mark.parametrize("method", ["tsne", "pca"])
def test_embed_2d_separates_distinct_clusters_and_mixes_one_distribution(method):
    features, groups = clusters([60, 60, 60])
    coords = maps.embed_2d(features, method)
    assert coords.shape == (180, 2) and coords.dtype == np.float32
    assert maps.separation(coords, groups) >= 0.95
    same, same_groups = clusters([60, 60], spread=0.0, seed=1)
    assert 0.3 <= maps.separation(maps.embed_2d(same, method), same_groups) <= 0.7


HAS_UMAP = importlib.util.find_spec("umap") is not None


@pytest.mark.skipif(
    not HAS_UMAP, reason="umap-learn not installed (pip install 'xdtrain[umap]'): UMAP not run"
)
def test_embed_2d_umap_separates_two_clusters():
    """The real UMAP (its first call compiles with numba for 10-30 s: it runs where the
    optional extra is installed; the glue below runs everywhere)."""
    features, groups = clusters([50, 50])
    coords = maps.embed_2d(features, "umap")
    assert coords.shape == (100, 2) and coords.dtype == np.float32
    assert maps.separation(coords, groups) >= 0.95


def test_embed_2d_hands_umap_the_standardised_pca_reduced_features(monkeypatch):
    """What xdtrain gives UMAP: standardised columns, PCA to 50 dimensions, the seed, the
    neighbours capped by the sample count (a stand-in module records the call)."""
    import types

    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    seen = {}

    class UMAP:
        def __init__(self, **kwargs):
            seen["kwargs"] = kwargs

        def fit_transform(self, x):
            seen["x"] = x
            return x[:, :2] * 2.0

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=UMAP))
    features, _ = clusters([6, 6], dims=80)
    coords = maps.embed_2d(features, "umap", seed=5)
    assert seen["kwargs"] == {"n_neighbors": 11, "random_state": 5, "n_jobs": 1}
    reduced = PCA(n_components=11, random_state=5).fit_transform(
        StandardScaler().fit_transform(features.astype(np.float64))
    )
    np.testing.assert_allclose(seen["x"], reduced, atol=1e-8)
    np.testing.assert_allclose(coords, (reduced[:, :2] * 2.0).astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize("method", ["tsne", "pca"])
def test_embed_2d_is_deterministic_for_a_seed(method):
    features, _ = clusters([40, 40], dims=80)  # D > pca_dims: the PCA step runs too
    first = maps.embed_2d(features, method, seed=3)
    assert np.array_equal(first, maps.embed_2d(features, method, seed=3))


def test_embed_2d_keeps_constant_columns_finite():
    features, groups = clusters([30, 30])
    features[:, 5] = 7.0
    coords = maps.embed_2d(features, "pca")
    assert np.isfinite(coords).all() and maps.separation(coords, groups) >= 0.95


def test_embed_2d_errors():
    features, _ = clusters([10, 10])
    with pytest.raises(UserError, match="unknown map method 'mds'"):
        maps.embed_2d(features, "mds")
    with pytest.raises(UserError, match="at least 5 samples, got 4"):
        maps.embed_2d(features[:4], "pca")
    broken = features.copy()
    broken[3, 2] = np.nan
    with pytest.raises(UserError, match="1 NaN or inf"):
        maps.embed_2d(broken, "tsne")
    with pytest.raises(ValueError, match="shape"):
        maps.embed_2d(features[:, 0], "pca")


def test_embed_2d_without_umap_learn_names_the_fallback(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)
    features, _ = clusters([10, 10])
    with pytest.raises(UserError, match="--map tsne") as caught:
        maps.embed_2d(features, "umap")
    assert "umap-learn" in str(caught.value) and "\n" not in str(caught.value)


def test_separation_by_hand():
    # On a line; k = 2 nearest neighbours of each point (itself excluded), share of own group:
    # a@0: 1, 5 -> 2/2; a@1: 0, 5 -> 2/2; a@5: 6, 8.5 -> 0/2;
    # b@6: 5, 8.5 -> 1/2; b@8.5: 6, 5 -> 1/2; b@20: 8.5, 6 -> 2/2. Mean 4/6.
    x = np.array([0.0, 1.0, 5.0, 6.0, 8.5, 20.0])
    coords = np.stack([x, np.zeros_like(x)], axis=1)
    groups = ["a", "a", "a", "b", "b", "b"]
    assert maps.separation(coords, groups, k=2) == pytest.approx(4 / 6)
    assert maps.separation(coords, groups, k=1) == pytest.approx(4 / 6)  # 1, 1, 0, 0, 1, 1
    assert maps.separation(coords, groups, k=50) == pytest.approx(2 / 5)  # k capped at n - 1
    with pytest.raises(ValueError, match="one group per row"):
        maps.separation(coords, groups[:5])


def test_cell_text_and_colour():
    assert figures._cell_text(0.98765) == "0.99"
    assert figures._cell_text(-0.001) == "0.00"
    assert figures._cell_text(-0.25) == "-0.25"
    assert figures._cell_text(math.nan) == "n/a"
    # viridis: dark purple at 0, yellow at 1.
    assert figures._text_colour(0.0) == "white"
    assert figures._text_colour(0.3) == "white"
    assert figures._text_colour(1.0) == "black"
    assert figures._text_colour(0.9) == "black"
    assert figures._text_colour(math.nan) == "black"


def test_styles_of_many_lines_differ():
    triples = [tuple(figures._style(i).values()) for i in range(40)]
    assert len(set(triples)) == 40
    for i in range(39):
        a, b = triples[i], triples[i + 1]
        assert all(x != y for x, y in zip(a, b, strict=True))


@pytest.fixture
def saved(monkeypatch):
    """The figures the functions save, as ``[{title, xlabel, ylabel, texts, legend, lines,
    colourbar}]``, read off before ``_save`` closes them."""
    seen = []
    real = figures._save

    def spy(fig, path):
        ax = fig.axes[0]
        legend = ax.get_legend()
        seen.append(
            {
                "title": ax.get_title(),
                "xlabel": ax.get_xlabel(),
                "ylabel": ax.get_ylabel(),
                "xticks": [t.get_text() for t in ax.get_xticklabels()],
                "yticks": [t.get_text() for t in ax.get_yticklabels()],
                "ylim": ax.get_ylim(),
                "texts": [(t.get_text(), t.get_color()) for t in ax.texts],
                "legend": [t.get_text() for t in legend.get_texts()] if legend else [],
                "lines": ax.get_lines(),
                "colourbar": [a.get_ylabel() for a in fig.axes[1:]],
            }
        )
        return real(fig, path)

    monkeypatch.setattr(figures, "_save", spy)
    return seen


def assert_png(path, min_size=(400, 300)):
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        assert min_size[0] <= image.width <= 3000 and min_size[1] <= image.height <= 3000
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20  # not blank


def test_cka_heatmap(tmp_path, saved):
    matrix = np.array([[0.98, 0.2, 0.1], [0.4, 0.75, math.nan]])
    stages_b = ["stem", "layer1", "layer2"]
    path = figures.cka_heatmap(
        matrix, STAGES[:2], stages_b, "imagenet", "ct", tmp_path / "cka.png", samples=512
    )
    assert path == tmp_path / "cka.png"
    assert_png(path)
    fig = saved[0]
    assert fig["texts"] == [
        ("0.98", "black"),
        ("0.20", "white"),
        ("0.10", "white"),
        ("0.40", "white"),
        ("0.75", "black"),
        ("n/a", "black"),
    ]
    assert fig["title"] == "imagenet vs ct (n = 512)"
    assert (fig["ylabel"], fig["xlabel"]) == ("imagenet stage", "ct stage")
    assert fig["yticks"] == STAGES[:2] and fig["xticks"] == stages_b
    assert fig["colourbar"] == ["linear CKA (unbiased HSIC)"]
    figures.cka_heatmap(matrix, STAGES[:2], stages_b, "a", "b", tmp_path / "t.png", title="T")
    assert saved[1]["title"] == "T"
    with pytest.raises(ValueError, match="does not match"):
        figures.cka_heatmap(matrix.T, STAGES[:2], stages_b, "a", "b", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_cka_diagonals(tmp_path, saved):
    curves = {f"pair {i}": [1.0, 0.9, 0.8 - i / 20, 0.7, 0.5] for i in range(11)}
    curves["pair 3"] = [1.0, 0.9, math.nan, 0.6, 0.4]
    assert_png(figures.cka_diagonals(curves, STAGES, tmp_path / "diag.png", "Same stage"))
    fig = saved[0]
    assert fig["legend"] == list(curves)
    assert fig["xticks"] == STAGES and fig["xlabel"] == "encoder stage"
    assert fig["ylabel"] == "linear CKA, same stage" and fig["ylim"] == (0.0, 1.05)
    styles = {(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in fig["lines"]}
    assert len(styles) == 11
    assert np.isnan(fig["lines"][3].get_ydata()[2])
    with pytest.raises(ValueError, match="'pair 0' has 4 values for 5 stages"):
        figures.cka_diagonals({"pair 0": [1, 1, 1, 1]}, STAGES, tmp_path / "x.png", "t")


def test_probe_curves(tmp_path, saved):
    results = {
        "imagenet": dict(zip(STAGES, [0.3, 0.4, 0.5, 0.6, 0.7], strict=True)),
        "ct": {"stem": 0.2, "layer1": 0.3, "layer3": 0.4, "layer4": math.nan},
    }
    path = figures.probe_curves(results, STAGES, "knn_top1", tmp_path / "p.png", "kNN", 0.1)
    assert_png(path)
    fig = saved[0]
    assert fig["ylabel"] == "kNN top-1 accuracy" and fig["ylim"] == (0.0, 1.05)
    assert fig["legend"] == ["imagenet", "ct", "chance"]
    ct = fig["lines"][1].get_ydata()
    assert np.isnan(ct[2]) and np.isnan(ct[4]) and ct[3] == 0.4
    chance = fig["lines"][2]
    assert chance.get_linestyle() == "--" and list(chance.get_ydata()) == [0.1, 0.1]
    figures.probe_curves(results, STAGES, "linear_auroc", tmp_path / "q.png", "linear")
    figures.probe_curves(results, STAGES, "dice", tmp_path / "r.png", "other")
    assert [f["ylabel"] for f in saved[1:]] == ["linear-probe mean AUROC", "dice"]
    assert saved[1]["legend"] == ["imagenet", "ct"]  # no chance line when none is given


def test_domain_map(tmp_path, saved):
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(70, 2))
    groups = ["chestxray8"] * 40 + ["lits"] * 20 + ["brats"] * 10
    path = figures.domain_map(coords, groups, tmp_path / "m.png", "layer4", "tsne", 0.9712)
    assert_png(path)
    fig = saved[0]
    assert fig["legend"] == ["chestxray8 (n = 40)", "lits (n = 20)", "brats (n = 10)"]
    assert fig["xlabel"] == "t-SNE 1 (arbitrary units)"
    assert fig["ylabel"] == "t-SNE 2 (arbitrary units)"
    assert fig["title"] == "layer4\nkNN group purity 0.97"
    figures.domain_map(coords, groups, tmp_path / "u.png", "layer4", "umap")
    figures.domain_map(coords, groups, tmp_path / "c.png", "layer4", "pca")
    assert [f["xlabel"].split(" (")[0] for f in saved[1:]] == ["UMAP 1", "PC 1"]
    assert saved[1]["title"] == "layer4"
    with pytest.raises(ValueError, match="one group per row"):
        figures.domain_map(coords, groups[:5], tmp_path / "x.png", "t", "tsne")
