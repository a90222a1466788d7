"""2-D maps of embeddings (t-SNE, UMAP, PCA) and how far groups separate in them.

A map is for looking, not measuring: t-SNE and UMAP keep neighbourhoods, not distances, so
the distance between clusters and their sizes carry no meaning. :func:`separation` gives the
one number a map supports: how often a point's nearest neighbours in the map come from its
own group (data set).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from xdtrain.errors import UserError

METHODS = ("tsne", "umap", "pca")
MIN_SAMPLES = 5

UMAP_MISSING = "--map umap needs umap-learn: pip install 'xdtrain[umap]', or use --map tsne"


def embed_2d(
    features: np.ndarray, method: str = "tsne", seed: int = 0, pca_dims: int = 50
) -> np.ndarray:
    """Map ``features`` ``(n, D)`` (any float dtype) to ``(n, 2)`` float32 coordinates.

    Columns are standardised (scikit-learn ``StandardScaler``; a constant column becomes 0),
    then reduced by PCA (seeded) to ``min(pca_dims, n - 1, D)`` components when
    ``D > pca_dims``, then mapped by ``method``:

    - ``tsne``: scikit-learn ``TSNE(init="pca", perplexity=min(30, (n - 1) / 3))``;
    - ``umap``: umap-learn ``UMAP(n_neighbors=min(15, n - 1), n_jobs=1)``;
    - ``pca``: the first two principal components (fast, for quick looks).

    The same features, method and ``seed`` give the same array.

    Raises :class:`UserError` for an unknown method, fewer than 5 samples, NaN or inf in
    ``features``, or ``umap`` without umap-learn installed; ``ValueError`` when ``features``
    is not 2-D with at least 2 columns or ``pca_dims`` < 2.
    """
    if method not in METHODS:
        raise UserError(f"unknown map method {method!r}: use one of {', '.join(METHODS)}")
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[1] < 2:
        raise ValueError(f"features must be (n, D) with D >= 2, got shape {features.shape}")
    if pca_dims < 2:
        raise ValueError(f"pca_dims must be at least 2, got {pca_dims}")
    n, dims = features.shape
    if n < MIN_SAMPLES:
        raise UserError(f"a {method} map needs at least {MIN_SAMPLES} samples, got {n}")
    bad = int(np.count_nonzero(~np.isfinite(features)))
    if bad:
        raise UserError(
            f"the features hold {bad} NaN or inf values: a map needs finite features "
            "(a diverged encoder gives NaN; check its training log)"
        )
    if method == "umap":
        try:
            import umap
        except ImportError as exc:
            raise UserError(UMAP_MISSING) from exc

    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    x = StandardScaler().fit_transform(features.astype(np.float64))
    if method == "pca":
        coords = PCA(n_components=2, random_state=seed).fit_transform(x)
        return np.ascontiguousarray(coords, dtype=np.float32)
    if dims > pca_dims:
        x = PCA(n_components=min(pca_dims, n - 1, dims), random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        tsne = TSNE(
            n_components=2, init="pca", perplexity=min(30.0, (n - 1) / 3), random_state=seed
        )
        coords = tsne.fit_transform(x)
    else:
        reducer = umap.UMAP(n_neighbors=min(15, n - 1), random_state=seed, n_jobs=1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="n_jobs value .* overridden")
            coords = reducer.fit_transform(x)
    return np.ascontiguousarray(coords, dtype=np.float32)


def separation(coords: np.ndarray, groups: Sequence[str], k: int = 10) -> float:
    """kNN group purity of a map: the mean, over points, of the share of each point's ``k``
    nearest neighbours in ``coords`` ``(n, 2)`` (Euclidean, the point itself excluded) that
    carry its group in ``groups`` (length n).

    1.0: every neighbourhood holds one group (the groups separate fully). For groups mixed at
    random it is about the sum of the squared group shares (0.5 for two equal groups; exactly
    ``sum(n_g * (n_g - 1)) / (n * (n - 1))`` in expectation). ``k`` is capped at ``n - 1``;
    neighbours at equal distance are taken in scikit-learn's ``NearestNeighbors`` order.

    Raises ``ValueError`` when the lengths differ, n < 2, k < 1 or ``coords`` is not finite.
    """
    coords = np.asarray(coords, dtype=np.float64)
    labels = np.asarray(groups)
    if coords.ndim != 2 or len(coords) != len(labels):
        raise ValueError(
            f"coords must be (n, d) with one group per row, got {coords.shape} "
            f"and {len(labels)} groups"
        )
    if len(coords) < 2 or k < 1:
        raise ValueError(f"separation needs n >= 2 points and k >= 1, got n={len(coords)}, k={k}")
    if not np.isfinite(coords).all():
        raise ValueError("coords hold NaN or inf")
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(coords) - 1)
    neighbours = NearestNeighbors().fit(coords).kneighbors(n_neighbors=k, return_distance=False)
    return float((labels[neighbours] == labels[:, None]).mean())
