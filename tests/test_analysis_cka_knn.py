"""xdtrain.analysis.cka against the unbiased HSIC's U-statistic definition, its invariances
and the biased estimator; xdtrain.knn against scikit-learn and a numpy reference;
xdtrain.analysis.probes against scikit-learn fitted here."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from xdtrain.analysis.cka import cka_matrix, hsic_unbiased, linear_cka
from xdtrain.analysis.probes import chance_level, knn_probe, linear_probe
from xdtrain.knn import knn_metrics, knn_predict, knn_scores

# ---------------------------------------------------------------- CKA references (numpy)


def hsic_quadruples(k: np.ndarray, g: np.ndarray) -> float:
    """HSIC_1 as the U-statistic it estimates (Song et al. 2012, Theorem 3): the mean over
    ordered quadruples of distinct indices of k_ij g_ij + k_ij g_qr - 2 k_ij g_iq."""
    n = len(k)
    total = 0.0
    quads = list(itertools.permutations(range(n), 4))
    for i, j, q, r in quads:
        total += k[i, j] * g[i, j] + k[i, j] * g[q, r] - 2 * k[i, j] * g[i, q]
    return total / len(quads)


def hsic_sums(k: np.ndarray, g: np.ndarray) -> float:
    """The same U-statistic from its three means written as sums over distinct indices:
    pairs P = Σ k_ij g_ij, triples T = Σ k_ij g_iq, quadruples Q = S_k S_g - 4T - 2P."""
    n = len(k)
    off = ~np.eye(n, dtype=bool)
    pairs = (k * g)[off].sum()
    rows_k = np.where(off, k, 0).sum(1)
    rows_g = np.where(off, g, 0).sum(1)
    triples = (rows_k * rows_g).sum() - pairs
    quads = k[off].sum() * g[off].sum() - 4 * triples - 2 * pairs
    falling = [math.perm(n, m) for m in (2, 3, 4)]
    return pairs / falling[0] + quads / falling[2] - 2 * triples / falling[1]


def cka_reference(x: np.ndarray, y: np.ndarray, bounds=None) -> float:
    """Minibatch linear CKA from ``hsic_sums`` over the given row ranges."""
    bounds = bounds or [(0, len(x))]
    xy = xx = yy = 0.0
    for a, b in bounds:
        k, g = x[a:b] @ x[a:b].T, y[a:b] @ y[a:b].T
        xy += hsic_sums(k, g)
        xx += hsic_sums(k, k)
        yy += hsic_sums(g, g)
    return xy / math.sqrt(xx * yy)


def cka_biased(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA with HSIC_0 = tr(KHLH) / (n-1)² (Kornblith et al. 2019, eq. 3)."""
    n = len(x)
    h = np.eye(n) - 1.0 / n
    k, g = h @ x @ x.T @ h, h @ y @ y.T @ h
    return (k * g).sum() / math.sqrt((k * k).sum() * (g * g).sum())


def test_hsic_closed_form_equals_u_statistic():
    rng = np.random.default_rng(0)
    for n in (4, 5, 7):
        x, y = rng.normal(size=(n, 3)), rng.normal(size=(n, 6))
        k, g = x @ x.T, y @ y.T + 1.0
        expected = hsic_quadruples(k, g)
        assert hsic_sums(k, g) == pytest.approx(expected, rel=1e-10, abs=1e-12)
        got = hsic_unbiased(torch.from_numpy(k), torch.from_numpy(g))
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    # float32 inputs are computed in float64
    got = hsic_unbiased(torch.from_numpy(k).float(), torch.from_numpy(g).float())
    assert got.dtype == torch.float64


@pytest.mark.parametrize(("n", "p", "q"), [(4, 3, 3), (9, 2, 7), (40, 16, 5), (120, 30, 60)])
def test_linear_cka_equals_reference(n, p, q):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, p))
    y = x[:, :1] * rng.normal(size=(1, q)) + rng.normal(size=(n, q))  # shares a direction
    expected = cka_reference(x, y)
    assert linear_cka(x, y) == pytest.approx(expected, abs=1e-5)
    assert linear_cka(torch.from_numpy(x).float(), y) == pytest.approx(expected, abs=1e-5)


def test_minibatch_cka_equals_reference():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 12)) + 5.0  # a large mean: centring must not change anything
    y = np.tanh(x @ rng.normal(size=(12, 20))) + 0.3 * rng.normal(size=(50, 20))
    # 50 = 16 + 16 + 18: the last 2 rows join the third batch
    expected = cka_reference(x, y, [(0, 16), (16, 32), (32, 50)])
    assert linear_cka(x, y, batch_size=16) == pytest.approx(expected, abs=1e-5)
    unmerged = cka_reference(x, y, [(0, 16), (16, 32), (32, 48)])
    assert abs(expected - unmerged) > 1e-4  # the merge is what is tested
    # 50 = 10 * 5: no merge; batches larger than n give one batch
    expected = cka_reference(x, y, [(a, a + 10) for a in range(0, 50, 10)])
    assert linear_cka(x, y, batch_size=10) == pytest.approx(expected, abs=1e-5)
    assert linear_cka(x, y, batch_size=64) == pytest.approx(cka_reference(x, y), abs=1e-5)
    assert abs(linear_cka(x, y, batch_size=10) - linear_cka(x, y)) > 1e-3


def test_cka_identity_and_invariances():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 20))
    for batch_size in (None, 16):
        assert linear_cka(x, x, batch_size) == pytest.approx(1.0, abs=1e-12)
    y = np.tanh(x @ rng.normal(size=(20, 30)))
    base = linear_cka(x, y)
    assert 0.2 < base < 0.95
    q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-6)
    assert linear_cka(3.7 * x, y) == pytest.approx(base, abs=1e-6)
    assert linear_cka(x + 100.0, y) == pytest.approx(base, abs=1e-6)
    assert linear_cka(x @ q, 3.7 * y, batch_size=16) == pytest.approx(
        linear_cka(x, y, batch_size=16), abs=1e-6
    )
    # an invertible but ill-conditioned map changes linear CKA
    a = rng.normal(size=(20, 20)) @ np.diag(np.logspace(0, -3, 20))
    assert np.linalg.matrix_rank(a) == 20
    assert linear_cka(x, x @ a) < 0.95
    assert abs(linear_cka(x @ a, y) - base) > 0.05


def test_unbiased_near_zero_where_biased_is_not():
    rng = np.random.default_rng(3)
    unbiased, biased = [], []
    for _ in range(5):
        x, y = rng.normal(size=(64, 2000)), rng.normal(size=(64, 2000))
        unbiased.append(linear_cka(x, y))
        biased.append(cka_biased(x, y))
    assert max(map(abs, unbiased)) < 0.1  # (spread about 0.02)
    assert abs(np.mean(unbiased)) < 0.05
    assert min(biased) > 0.5  # (about 0.97)


def test_cka_matrix_equals_pairwise():
    rng = np.random.default_rng(4)
    base = rng.normal(size=(40, 8))
    a = {
        "stem": base,
        "layer1": np.maximum(base @ rng.normal(size=(8, 16)), 0),
        "layer2": torch.from_numpy(rng.normal(size=(40, 4))),
    }
    b = {"s1": base @ rng.normal(size=(8, 3)), "s2": rng.normal(size=(40, 32))}
    for batch_size in (None, 12):
        got = cka_matrix(a, b, batch_size)
        assert got.shape == (3, 2) and got.dtype == np.float64
        for i, j in itertools.product(range(3), range(2)):
            pair = linear_cka(list(a.values())[i], list(b.values())[j], batch_size)
            assert got[i, j] == pytest.approx(pair, abs=1e-12)
        same = cka_matrix(a, a, batch_size)
        np.testing.assert_allclose(np.diag(same), 1.0, atol=1e-12)
        np.testing.assert_allclose(same, same.T, atol=1e-12)


def test_cka_constant_is_nan_and_errors():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(10, 3))
    assert math.isnan(linear_cka(x, np.full((10, 4), 2.5)))
    with pytest.raises(ValueError, match="n >= 4"):
        linear_cka(x[:3], x[:3])
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(x, x[:9])
    with pytest.raises(ValueError, match="NaN or infinite"):
        linear_cka(np.where(np.eye(10, 3) > 0, np.nan, x), x)
    with pytest.raises(ValueError, match="batch_size"):
        linear_cka(x, x, batch_size=3)
    with pytest.raises(ValueError, match="same samples"):
        cka_matrix({"a": x}, {"b": x[:8]})
    small = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="n >= 4"):
        hsic_unbiased(small, small)
    with pytest.raises(ValueError, match="same shape"):
        hsic_unbiased(torch.eye(5), torch.eye(6))


# ---------------------------------------------------------------- kNN


def blobs(rng, means: np.ndarray, n: int):
    """Gaussian features (n, dims) float64 around ``means`` (classes, dims) of random
    classes, and their labels (n,) int64."""
    labels = rng.integers(0, len(means), size=n)
    return means[labels] * 0.4 + rng.normal(size=(n, means.shape[1])), labels


def knn_reference(bank, labels, query, k, temperature):
    """Distance-weighted kNN scores written out with numpy: sort cosine similarities, take
    the top k, weigh by exp(s / τ); class sums (1-D labels) or weighted means (2-D)."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    out = []
    for sims in query @ bank.T:
        top = np.argsort(-sims, kind="stable")[:k]
        w = np.exp(sims[top] / temperature)
        if labels.ndim == 1:
            out.append(np.bincount(labels[top], weights=w, minlength=5))
        else:
            out.append((w[:, None] * labels[top]).sum(0) / w.sum())
    return np.array(out)


@pytest.fixture(scope="module")
def knn_data():
    rng = np.random.default_rng(6)
    means = rng.normal(size=(5, 64))
    bank, bank_y = blobs(rng, means, 300)
    query, query_y = blobs(rng, means, 200)
    return bank, bank_y, query, query_y


@pytest.mark.parametrize("k", [1, 2, 4, 7, 20])
def test_uniform_knn_equals_sklearn(knn_data, k):
    bank, bank_y, query, query_y = knn_data
    sk = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="uniform", algorithm="brute")
    expected = sk.fit(bank, bank_y).predict(query)
    scores = knn_scores(
        torch.from_numpy(bank),
        torch.from_numpy(bank_y),
        torch.from_numpy(query),
        5,
        k=k,
        weights="uniform",
    )
    assert scores.shape == (200, 5) and scores.dtype == torch.float64
    np.testing.assert_array_equal(scores.sum(1).numpy(), k)  # votes
    predicted = knn_predict(scores).numpy()
    np.testing.assert_array_equal(predicted, expected)
    accuracy = np.mean(predicted == query_y)
    assert accuracy == np.mean(expected == query_y)
    assert accuracy > 0.5  # well above chance (0.2)


def test_distance_weighted_scores_equal_reference(knn_data):
    bank, bank_y, query, query_y = knn_data
    args = (torch.from_numpy(bank), torch.from_numpy(bank_y), torch.from_numpy(query), 5)
    for k, temperature in ((20, 0.07), (3, 0.5)):
        scores = knn_scores(*args, k=k, temperature=temperature).numpy()
        expected = knn_reference(bank, bank_y, query, k, temperature)
        np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=0)
        chunked = knn_scores(*args, k=k, temperature=temperature, chunk=7).numpy()
        np.testing.assert_allclose(chunked, scores, rtol=1e-12, atol=0)
    # k clamped to N: every bank sample votes
    small = (args[0][:6], args[1][:6], args[2], 5)
    clamped = knn_scores(*small, k=50).numpy()
    np.testing.assert_allclose(clamped, knn_reference(bank[:6], bank_y[:6], query, 6, 0.07))
    np.testing.assert_array_equal(knn_scores(*small, k=6).numpy(), clamped)
    top1 = knn_metrics(*args[:3], torch.from_numpy(query_y), 5)["knn_top1"]
    assert top1 > 0.5
    assert top1 == np.mean(knn_reference(bank, bank_y, query, 20, 0.07).argmax(1) == query_y)


def test_multilabel_knn_auroc_equals_sklearn(knn_data):
    bank, _, query, _ = knn_data
    rng = np.random.default_rng(7)
    w = rng.normal(size=(64, 5))
    bank_y = (bank @ w > 0.5).astype(np.int64)
    query_y = (query @ w > 0.5).astype(np.int64)
    query_y[:, 4] = 0  # a class without positive queries is left out
    scores = knn_scores(
        torch.from_numpy(bank), torch.from_numpy(bank_y), torch.from_numpy(query), 5, k=15
    )
    expected = knn_reference(bank, bank_y, query, 15, 0.07)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert scores.min() >= 0 and scores.max() <= 1
    got = knn_metrics(
        torch.from_numpy(bank),
        torch.from_numpy(bank_y),
        torch.from_numpy(query),
        torch.from_numpy(query_y),
        5,
        k=15,
    )
    aurocs = [roc_auc_score(query_y[:, c], expected[:, c]) for c in range(4)]
    assert got["knn_auroc_classes"] == 4
    assert got["knn_auroc"] == pytest.approx(np.mean(aurocs), abs=1e-12)
    assert got["knn_auroc"] > 0.7
    probe = knn_probe(bank, bank_y, query, query_y, 5, k=15)
    assert probe == pytest.approx(got)
    # a class the bank holds in one state only gives every query the same score: its AUROC
    # would be exactly 0.5 whatever the features; it is left out, as the linear probe does
    constant = bank_y.copy()
    constant[:, 1] = 1
    got = knn_metrics(
        torch.from_numpy(bank),
        torch.from_numpy(constant),
        torch.from_numpy(query),
        torch.from_numpy(query_y),
        5,
        k=15,
    )
    expected = knn_reference(bank, constant, query, 15, 0.07)
    aurocs = [roc_auc_score(query_y[:, c], expected[:, c]) for c in (0, 2, 3)]
    assert got["knn_auroc_classes"] == 3
    assert got["knn_auroc"] == pytest.approx(np.mean(aurocs), abs=1e-12)


def test_knn_errors():
    bank, labels = torch.randn(10, 4), torch.arange(10) % 3
    query = torch.randn(5, 4)
    with pytest.raises(ValueError, match="k must"):
        knn_scores(bank, labels, query, 3, k=0)
    with pytest.raises(ValueError, match="empty"):
        knn_scores(bank[:0], labels[:0], query, 3)
    with pytest.raises(ValueError, match="weights"):
        knn_scores(bank, labels, query, 3, weights="cosine")
    with pytest.raises(ValueError, match="dims"):
        knn_scores(bank, labels, torch.randn(5, 3), 3)
    with pytest.raises(ValueError, match="bank_labels"):
        knn_scores(bank, labels[:9], query, 3)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        knn_scores(bank, labels, query, 2)


# ---------------------------------------------------------------- probes


def test_linear_probe_equals_sklearn(knn_data):
    bank, bank_y, query, query_y = knn_data
    got = linear_probe(bank, bank_y, query, query_y, 5, seed=0, c=0.01)
    assert got["linear_top1"] != linear_probe(bank, bank_y, query, query_y, 5)["linear_top1"]
    scaler = StandardScaler().fit(bank)
    model = LogisticRegression(C=0.01, max_iter=1000, random_state=0)
    model.fit(scaler.transform(bank), bank_y)
    expected = np.mean(model.predict(scaler.transform(query)) == query_y)
    assert got["linear_top1"] == expected
    assert got["linear_top1"] > 0.5
    assert got["linear_converged"] == 1.0
    assert linear_probe(bank, bank_y, query, query_y, 5, max_iter=1)["linear_converged"] == 0.0
    single = linear_probe(bank, np.zeros(300, dtype=np.int64), query, query_y, 5)
    assert math.isnan(single["linear_top1"])
    chance = chance_level(query_y, 5)
    assert chance["linear_top1"] == np.bincount(query_y).max() / 200
    assert chance["knn_top1"] == chance["linear_top1"]


def test_linear_probe_multilabel_skips_single_label_classes(knn_data):
    bank, _, query, _ = knn_data
    rng = np.random.default_rng(8)
    w = rng.normal(size=(64, 4))
    bank_y = (bank @ w > 0).astype(np.int64)
    query_y = (query @ w > 0).astype(np.int64)
    bank_y[:, 1] = 0  # one label in train: skipped
    query_y[:, 2] = 1  # one label in test: fitted, not scored
    got = linear_probe(bank, bank_y, query, query_y, 4)
    assert got["linear_auroc_classes"] == 2
    scaler = StandardScaler().fit(bank)
    expected = []
    for c in (0, 3):
        model = LogisticRegression(max_iter=1000, random_state=0).fit(
            scaler.transform(bank), bank_y[:, c]
        )
        scores = model.decision_function(scaler.transform(query))
        expected.append(roc_auc_score(query_y[:, c], scores))
    assert got["linear_auroc"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert got["linear_auroc"] > 0.8
    assert got["linear_converged"] == 1.0
    assert chance_level(query_y, 4) == {"knn_auroc": 0.5, "linear_auroc": 0.5}
