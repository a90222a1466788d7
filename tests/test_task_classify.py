"""Task ``classify`` (own classes): losses and metrics against scikit-learn and formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, roc_auc_score, top_k_accuracy_score

from xdtrain.config import Config
from xdtrain.tasks import get_task
from xdtrain.tasks.classify import ClassScores

TASK = get_task("classify")


def _scores(classes, batches):
    metric = ClassScores(classes)
    for logits, labels in batches:
        metric.update(logits, {"label": labels})
    return metric.compute()


@pytest.mark.parametrize("n_classes", [2, 3, 7])
def test_single_label_auroc_is_sklearns_one_vs_rest_macro_on_softmax(n_classes):
    rng = np.random.default_rng(n_classes)
    labels = np.concatenate([np.arange(n_classes), rng.integers(0, n_classes, 200)])
    logits = rng.normal(size=(len(labels), n_classes)) + 1.5 * np.eye(n_classes)[labels]
    batches = [
        (torch.tensor(logits[i : i + 32], dtype=torch.float32), torch.tensor(labels[i : i + 32]))
        for i in range(0, len(labels), 32)
    ]
    result = _scores([f"c{i}" for i in range(n_classes)], batches)
    probabilities = torch.softmax(torch.tensor(logits, dtype=torch.float32), 1).numpy()
    if n_classes == 2:
        expected = roc_auc_score(labels, probabilities[:, 1])  # both classes' AUROC equal it
    else:
        expected = roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")
    assert result["auroc_mean"] == pytest.approx(expected, abs=1e-6)
    assert result["top1"] == pytest.approx(accuracy_score(labels, logits.argmax(1)))
    if n_classes > 5:
        top5 = top_k_accuracy_score(labels, logits, k=5, labels=np.arange(n_classes))
        assert result["top5"] == pytest.approx(top5)
    assert result["auroc_classes"] == n_classes and result["auroc_undefined"] == []


def test_multi_label_auroc_is_sklearns_per_class_mean_and_names_undefined_classes():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, (150, 4))
    targets[:, 3] = 0  # a class nobody has: no AUROC, left out of the mean and named
    logits = rng.normal(size=(150, 4)) + targets
    result = _scores(
        ["a", "b", "c", "d"],
        [(torch.tensor(logits, dtype=torch.float32), torch.tensor(targets, dtype=torch.float32))],
    )
    expected = np.mean([roc_auc_score(targets[:, i], logits[:, i]) for i in range(3)])
    assert result["auroc_mean"] == pytest.approx(expected, abs=1e-6)
    assert result["auroc_undefined"] == ["d"] and result["auroc/d"] is None
    assert "top1" not in result


def test_forward_uses_cross_entropy_or_binary_cross_entropy_by_the_labels_kind():
    config = Config()
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    model = lambda images: logits  # noqa: E731 - a stand-in network
    loss, _ = TASK.forward(model, {"image": None, "label": torch.tensor([0, 2])}, config)
    expected = -(torch.log_softmax(logits, 1)[[0, 1], [0, 2]]).mean()
    assert loss.item() == pytest.approx(expected.item())
    multi = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    loss, _ = TASK.forward(model, {"image": None, "label": multi}, config)
    p = torch.sigmoid(logits)
    expected = -(multi * torch.log(p) + (1 - multi) * torch.log(1 - p)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_auroc_keeps_the_ranking_of_logits_far_apart():
    """Logits 100s apart: a float32 softmax ties at 0 and 1 and a log-softmax at 0 for the
    top class (AUROC 0.5 for every class after a diverging epoch); log-odds rank as the exact
    probabilities do. Reference: each class's log-odds from scipy's logsumexp, sklearn's
    AUROC per class, averaged."""
    from scipy.special import logsumexp

    rng = np.random.default_rng(3)
    labels = np.concatenate([np.arange(3), rng.integers(0, 3, 150)])
    logits = 300.0 * (rng.normal(size=(len(labels), 3)) + np.eye(3)[labels])
    result = _scores(["a", "b", "c"], [(torch.tensor(logits), torch.tensor(labels))])
    per_class = []
    for k in range(3):
        odds = logits[:, k] - logsumexp(np.delete(logits, k, axis=1), axis=1)
        per_class.append(roc_auc_score(labels == k, odds))
    assert result["auroc_mean"] == pytest.approx(np.mean(per_class), abs=1e-9)
    saturated = torch.log_softmax(torch.tensor(logits), 1).numpy()  # the top class ties at 0
    naive = np.mean([roc_auc_score(labels == k, saturated[:, k]) for k in range(3)])
    assert np.mean(per_class) - naive > 0.01  # what a log-softmax would have reported
