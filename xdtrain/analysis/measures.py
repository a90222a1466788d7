"""The numbers of a feature-space analysis, from stored :class:`Features`.

- :func:`similarity`: linear CKA between every stage of two encoders on the same samples;
- :func:`probes`: per stage, kNN and linear-probe scores of a frozen encoder (bank and
  training set: a sample of the train split; scored on a sample of the test split);
- :func:`domain_map`: one encoder's embeddings of several data sets in 2-D, and how far
  the data sets separate there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from xdtrain.analysis.cka import cka_matrix
from xdtrain.analysis.features import Features
from xdtrain.analysis.maps import embed_2d, separation
from xdtrain.analysis.probes import chance_level, knn_probe, linear_probe
from xdtrain.data.batch import scored_classes
from xdtrain.errors import UserError

MAP_STAGE = "layer4"  # the encoder's output: what a head or the projection sees


def similarity(a: Features, b: Features, batch_size: int | None = None) -> dict:
    """Linear CKA between each stage of ``a`` (rows) and of ``b`` (columns).

    Both must hold the same samples in the same order (the same data, split, sample and
    seed); :class:`UserError` otherwise. Returns ``{"a", "b", "stages_a", "stages_b",
    "matrix" (list of rows), "same_stage" (the diagonal, stages both have), "samples"}``."""
    if a.keys.shape != b.keys.shape or not np.array_equal(a.keys, b.keys):
        raise UserError(
            f"{a.meta.get('encoder')} and {b.meta.get('encoder')}: features of different "
            "samples; extract both with the same --data, --split, --samples and --seed"
        )
    if len(a.keys) < 4:
        raise UserError(
            f"{a.meta.get('encoder')}: {len(a.keys)} samples; CKA's unbiased estimator needs "
            "at least 4 (a larger --samples, or a larger split)"
        )
    matrix = cka_matrix(a.stages, b.stages, batch_size=batch_size)
    stages_a, stages_b = list(a.stages), list(b.stages)
    same = [float(matrix[i, stages_b.index(s)]) for i, s in enumerate(stages_a) if s in stages_b]
    return {
        "a": a.meta.get("encoder"),
        "b": b.meta.get("encoder"),
        "stages_a": stages_a,
        "stages_b": stages_b,
        "matrix": [[_num(v) for v in row] for row in matrix.tolist()],
        "same_stage": [_num(v) for v in same],
        "samples": len(a.keys),
        "batch_size": batch_size,
    }


def probes(
    train: Features, test: Features, k: int = 20, temperature: float = 0.07, seed: int = 0
) -> dict:
    """Per stage, what the frozen embeddings tell about the labels: weighted kNN (the test
    sample classified by the train sample) and a logistic-regression probe fit on the train
    sample. Returns ``{"stages": {stage: {metric: value}}, "chance": {metric: value},
    "train_samples", "test_samples", "label_kind"}``."""
    if train.classes != test.classes or train.labels.ndim != test.labels.ndim:
        raise UserError(
            "train and test features hold different labels; extract both from one data set"
        )
    overlap = len(set(train.keys.tolist()) & set(test.keys.tolist()))
    if overlap:
        raise UserError(
            f"{overlap} of the {len(test.keys)} test samples are in the training sample too: "
            "probe on another split than the one the bank and probe are trained on"
        )
    y_train, y_test, n = train.labels, test.labels, len(test.classes)
    if test.multilabel:  # the outputs a mean AUROC averages (not "No Finding")
        columns = scored_classes("multilabel", test.classes)
        y_train, y_test, n = y_train[:, columns], y_test[:, columns], len(columns)
    out: dict[str, dict[str, float]] = {}
    for stage in test.stages:
        x_train, x_test = train.stages[stage], test.stages[stage]
        scores = knn_probe(x_train, y_train, x_test, y_test, n, k, temperature)
        scores |= linear_probe(x_train, y_train, x_test, y_test, n, seed=seed)
        out[stage] = {key: _num(v) for key, v in scores.items()}
    return {
        "stages": out,
        "chance": {k: _num(v) for k, v in chance_level(y_test, n).items()},
        "train_samples": len(train.keys),
        "test_samples": len(test.keys),
        "label_kind": test.meta.get("label_kind"),
    }


def domain_map(
    features: Mapping[str, Features], method: str = "tsne", seed: int = 0, stage: str = MAP_STAGE
) -> dict:
    """Embeddings of several data sets (``{name: Features}``, one encoder) in 2-D.

    Returns ``{"coords" [n, 2], "groups" [n], "separation", "stage", "method"}``; the
    separation is the share of each point's 10 nearest map neighbours from its own data
    set (:func:`xdtrain.analysis.maps.separation`)."""
    if len(features) < 2:
        raise UserError("a domain map needs features of at least two data sets")
    names = list(features)
    x = np.concatenate([features[n].stages[stage] for n in names])
    groups = [n for n in names for _ in range(len(features[n].keys))]
    coords = embed_2d(x, method=method, seed=seed)
    return {
        "coords": coords,
        "groups": groups,
        "separation": float(separation(coords, groups)),
        "stage": stage,
        "method": method,
    }


def _num(value) -> float | None:
    """A JSON number; NaN (an undefined score) becomes None."""
    value = float(value)
    return None if math.isnan(value) else value


def probe_series(results: Mapping[str, dict], metric: str) -> dict[str, dict[str, float]]:
    """``{encoder: {stage: value}}`` of one metric of :func:`probes` results (NaN where a
    score is undefined), as :func:`xdtrain.analysis.figures.probe_curves` draws them."""
    return {
        encoder: {
            stage: math.nan if scores.get(metric) is None else scores[metric]
            for stage, scores in result["stages"].items()
        }
        for encoder, result in results.items()
    }
