"""What a frozen encoder's features already know: kNN and linear probes, and chance level.

Both probes read features (n, D) of a train and a test split. Labels are class indices
(n,) int (multi-class, scored by top-1 accuracy) or 0/1 matrices (n, C) (multi-label,
scored by the mean per-class AUROC over the classes that can be scored).

- ``knn_probe``: the kNN monitor of self-supervised learning (Wu et al., CVPR 2018,
  sec. 3.4), ``xdtrain.knn.knn_metrics``.
- ``linear_probe``: logistic regression on standardised features, the linear evaluation
  protocol of SimCLR (Chen et al., ICML 2020, sec. 4) with scikit-learn's L-BFGS solver.
- ``chance_level``: what the metrics give without features (majority class; AUROC 0.5).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from xdtrain.knn import knn_chance, knn_metrics


def _labels(y, n: int, num_classes: int, name: str) -> np.ndarray:
    """``y`` as (n,) int64 in [0, num_classes) or (n, num_classes) int8 0/1; ValueError
    otherwise."""
    y = np.asarray(y)
    if y.ndim == 1 and y.shape[0] == n:
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{name}: class indices must be integers, got {y.dtype}")
        if n and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name}: class indices must lie in [0, {num_classes})")
        return y.astype(np.int64)
    if y.shape == (n, num_classes):
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"{name}: multi-label targets must hold only 0 and 1")
        return y.astype(np.int8)
    raise ValueError(
        f"{name} must be ({n},) class indices or ({n}, {num_classes}) 0/1, got {y.shape}"
    )


def _features(x, name: str) -> np.ndarray:
    """``x`` as a 2-D finite float array; ValueError otherwise."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be 2-D (samples, dims) with samples, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return x


def _check(train_x, train_y, test_x, test_y, num_classes):
    """Validated (train_x, train_y, test_x, test_y); both label sets of one kind."""
    train_x, test_x = _features(train_x, "train_x"), _features(test_x, "test_x")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train_x has {train_x.shape[1]} dims, test_x {test_x.shape[1]}")
    train_y = _labels(train_y, len(train_x), num_classes, "train_y")
    test_y = _labels(test_y, len(test_x), num_classes, "test_y")
    if train_y.ndim != test_y.ndim:
        raise ValueError("train_y and test_y must both be class indices or both multi-label")
    return train_x, train_y, test_x, test_y


def knn_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """Distance-weighted kNN of the test features among the train features.

    Arrays: features (n, D) float, labels (n,) int or (n, C) 0/1. Returns
    ``{"knn_top1"}`` (multi-class) or ``{"knn_auroc", "knn_auroc_classes"}`` (multi-label),
    see ``xdtrain.knn.knn_metrics``. Raises ValueError on bad shapes, labels or values."""
    train_x, train_y, test_x, test_y = _check(train_x, train_y, test_x, test_y, num_classes)
    return knn_metrics(
        torch.from_numpy(train_x),
        torch.from_numpy(train_y),
        torch.from_numpy(test_x),
        torch.from_numpy(test_y),
        num_classes,
        k=k,
        temperature=temperature,
    )


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    seed: int = 0,
    c: float = 1.0,
    max_iter: int = 1000,
) -> dict[str, float]:
    """Logistic regression on features standardised with the train split's mean and std.

    Arrays: features (n, D) float, labels (n,) int or (n, C) 0/1. Multi-class: one
    multinomial ``LogisticRegression(C=c, max_iter=max_iter, random_state=seed)`` →
    ``{"linear_top1": test accuracy}``; NaN when train holds a single class (no classifier
    can be fitted; scikit-learn refuses it). Multi-label: one binary logistic regression per
    class with both labels in train → ``{"linear_auroc": mean test AUROC over those of them
    with both labels in test (NaN when none), "linear_auroc_classes": their count}``; other
    classes are skipped. ``"linear_converged"`` is 1.0 when every fit stopped before
    ``max_iter`` iterations, 0.0 when one did not, NaN when nothing was fitted; scikit-learn's
    ConvergenceWarning is silenced within this call only. Raises ValueError on bad shapes,
    labels or values."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    train_x, train_y, test_x, test_y = _check(train_x, train_y, test_x, test_y, num_classes)
    scaler = StandardScaler().fit(train_x)
    train_x, test_x = scaler.transform(train_x), scaler.transform(test_x)

    def fit(y: np.ndarray) -> tuple[LogisticRegression, bool]:
        model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(train_x, y)
        return model, bool(np.all(model.n_iter_ < max_iter))

    if train_y.ndim == 1:
        if len(np.unique(train_y)) < 2:
            return {"linear_top1": math.nan, "linear_converged": math.nan}
        model, converged = fit(train_y)
        accuracy = float(np.mean(model.predict(test_x) == test_y))
        return {"linear_top1": accuracy, "linear_converged": float(converged)}

    aurocs, fits = [], []
    for k in range(num_classes):
        if train_y[:, k].min() == train_y[:, k].max():
            continue
        model, converged = fit(train_y[:, k])
        fits.append(converged)
        if test_y[:, k].min() != test_y[:, k].max():
            scores = model.decision_function(test_x)
            aurocs.append(float(roc_auc_score(test_y[:, k], scores)))
    return {
        "linear_auroc": float(np.mean(aurocs)) if aurocs else math.nan,
        "linear_auroc_classes": float(len(aurocs)),
        "linear_converged": float(all(fits)) if fits else math.nan,
    }


def chance_level(test_y: np.ndarray, num_classes: int) -> dict[str, float]:
    """The probes' metrics without features, for test labels (n,) int or (n, C) 0/1.

    Multi-class: the share of the most frequent test class (the accuracy of always predicting
    it) as ``"knn_top1"`` and ``"linear_top1"``. Multi-label: 0.5 (the AUROC of uninformative
    scores) as ``"knn_auroc"`` and ``"linear_auroc"``. Raises ValueError on bad labels or an
    empty test set."""
    test_y = np.asarray(test_y)
    if test_y.ndim == 0 or test_y.shape[0] == 0:
        raise ValueError("chance_level needs test labels")
    test_y = _labels(test_y, test_y.shape[0], num_classes, "test_y")
    share = knn_chance(test_y, num_classes)
    if test_y.ndim == 2:
        return {"knn_auroc": share, "linear_auroc": share}
    return {"knn_top1": share, "linear_top1": share}
