"""Weighted k-nearest-neighbour classification of embeddings (the kNN monitor of
self-supervised learning).

Wu et al., CVPR 2018, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", sec. 3.4: a query's cosine similarities s_i to the bank embeddings pick its
k nearest bank samples, which vote for their classes with weight exp(s_i / τ); τ = 0.07 and
k = 20 are the usual settings (solo-learn, DINO). Multi-label banks vote per class with the
weighted mean of their 0/1 labels. Pure torch; scikit-learn is imported only by
``knn_metrics`` for multi-label AUROC.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHTS = ("distance", "uniform")


def _check(bank, bank_labels, query, num_classes, k, weights, chunk) -> bool:
    """Validate ``knn_scores``' arguments; True when the labels are multi-label."""
    if bank.ndim != 2 or query.ndim != 2:
        raise ValueError(
            f"bank and query must be 2-D (samples, dims), got {tuple(bank.shape)} "
            f"and {tuple(query.shape)}"
        )
    if bank.shape[0] == 0:
        raise ValueError("the bank is empty")
    if bank.shape[1] != query.shape[1]:
        raise ValueError(f"bank has {bank.shape[1]} dims, query {query.shape[1]}")
    if not bank.is_floating_point() or not query.is_floating_point():
        raise ValueError(f"bank and query must be floating point, got {bank.dtype}, {query.dtype}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    n = bank.shape[0]
    if bank_labels.shape == (n,):
        if bank_labels.is_floating_point() or bank_labels.dtype == torch.bool:
            raise ValueError(f"class indices must be integers, got {bank_labels.dtype}")
        if bank_labels.min() < 0 or bank_labels.max() >= num_classes:
            raise ValueError(f"class indices must lie in [0, {num_classes})")
        return False
    if bank_labels.shape == (n, num_classes):
        if not bool(((bank_labels == 0) | (bank_labels == 1)).all()):
            raise ValueError("multi-label bank_labels must hold only 0 and 1")
        return True
    raise ValueError(
        f"bank_labels must be (N,) class indices or (N, C) 0/1 labels with N = {n}, "
        f"C = {num_classes}; got {tuple(bank_labels.shape)}"
    )


def knn_scores(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    query: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    weights: str = "distance",
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (M, C) float64 of the queries from their k nearest bank samples.

    ``bank`` (N, D) and ``query`` (M, D) are floating point embeddings, L2-normalised here
    (similarity = cosine; computed in float64 when either is float64, else float32).
    ``bank_labels`` is (N,) int class indices (multi-class) or (N, C) 0/1 (multi-label).
    Neighbour i weighs w_i = exp(s_i / ``temperature``) (``weights="distance"``, Wu et al.
    2018, sec. 3.4; the weights are formed in float64) or 1 (``"uniform"``). Multi-class score
    of class c: Σ_i w_i [y_i = c]; multi-label: Σ_i w_i y_ic / Σ_i w_i. ``k`` is clamped to N.
    Queries run in chunks of ``chunk`` rows (chunk × N similarities in memory); neighbours
    come from ``torch.topk``. Raises ValueError on bad shapes or dtypes, class indices out of
    range, multi-label labels other than 0/1, an empty bank, k < 1, chunk < 1, unknown
    ``weights``, or temperature <= 0."""
    multilabel = _check(bank, bank_labels, query, num_classes, k, weights, chunk)
    if weights == "distance" and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.float64 if torch.float64 in (bank.dtype, query.dtype) else torch.float32
    bank = F.normalize(bank.to(dtype), dim=1)
    query = F.normalize(query.to(dtype), dim=1)
    labels = bank_labels.to(bank.device, torch.float64 if multilabel else torch.int64)
    k = min(k, bank.shape[0])
    out = []
    for start in range(0, query.shape[0], chunk):
        sims, index = torch.topk(query[start : start + chunk] @ bank.T, k, dim=1)
        if weights == "distance":
            w = torch.exp(sims.to(torch.float64) / temperature)
        else:
            w = torch.ones_like(sims, dtype=torch.float64)
        if multilabel:
            out.append((w.unsqueeze(2) * labels[index]).sum(dim=1) / w.sum(dim=1, keepdim=True))
        else:
            scores = torch.zeros(len(w), num_classes, dtype=torch.float64, device=w.device)
            out.append(scores.scatter_add_(1, labels[index], w))
    if not out:
        return torch.zeros(0, num_classes, dtype=torch.float64, device=bank.device)
    return torch.cat(out)


def knn_predict(scores: torch.Tensor) -> torch.Tensor:
    """Predicted class indices (M,) int64 of scores (M, C): the argmax, the lowest class index
    among tied votes (as scikit-learn's KNeighborsClassifier with uniform weights; which of
    several bank samples at exactly the k-th similarity is a neighbour is unspecified in
    both)."""
    return scores.argmax(dim=1)


def knn_metrics(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """kNN monitor metrics of distance-weighted ``knn_scores`` (arguments as there).

    Multi-class (``bank_labels`` (N,), ``query_labels`` (M,)): ``{"knn_top1": accuracy}``.
    Multi-label (``bank_labels`` (N, C), ``query_labels`` (M, C) 0/1): ``{"knn_auroc": mean of
    scikit-learn's roc_auc_score over the classes with both a positive and a negative query
    and in the bank (NaN when none), "knn_auroc_classes": their count}``. Raises ValueError as
    ``knn_scores``, when ``query_labels`` does not match, or when there are no queries."""
    if query.shape[0] == 0:
        raise ValueError("there are no queries")
    expected = (query.shape[0],) + tuple(bank_labels.shape[1:])
    if tuple(query_labels.shape) != expected:
        raise ValueError(f"query_labels must be {expected}, got {tuple(query_labels.shape)}")
    scores = knn_scores(bank, bank_labels, query, num_classes, k=k, temperature=temperature)
    if bank_labels.ndim == 1:
        hits = knn_predict(scores) == query_labels.to(scores.device).long()
        return {"knn_top1": hits.double().mean().item()}
    from sklearn.metrics import roc_auc_score

    targets = query_labels.detach().cpu().numpy()
    banked = bank_labels.detach().cpu().numpy()
    values = scores.cpu().numpy()
    aurocs = [  # a class the bank holds in one state only scores every query alike: skipped
        float(roc_auc_score(targets[:, c], values[:, c]))
        for c in range(num_classes)
        if targets[:, c].min() != targets[:, c].max() and banked[:, c].min() != banked[:, c].max()
    ]
    mean = sum(aurocs) / len(aurocs) if aurocs else float("nan")
    return {"knn_auroc": mean, "knn_auroc_classes": float(len(aurocs))}


def knn_chance(labels, num_classes: int) -> float:
    """What guessing scores on these query labels: the majority class's share (class
    indices (M,), the top-1 of always predicting it) or 0.5 (0/1 labels (M, C), the AUROC
    of uninformative scores)."""
    labels = torch.as_tensor(labels)
    if labels.ndim == 2:
        return 0.5
    counts = torch.bincount(labels.long().reshape(-1), minlength=num_classes)
    return float(counts.max()) / max(labels.numel(), 1)
