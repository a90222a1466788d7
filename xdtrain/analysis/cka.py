"""Linear centred kernel alignment (CKA) with the unbiased HSIC estimator.

CKA (Kornblith et al., ICML 2019, "Similarity of Neural Network Representations Revisited",
eq. 3) of two representations ``X`` (n, p) and ``Y`` (n, q) of the same n samples, with the
linear kernels ``K = X Xᵀ`` and ``L = Y Yᵀ``::

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))

HSIC is estimated with the unbiased estimator HSIC_1 (Song et al., JMLR 2012, "Feature
Selection via Dependence Maximization", eq. 5). Minibatch CKA (Nguyen, Raghu & Kornblith,
ICLR 2021, "Do Wide and Deep Networks Learn the Same Things?", sec. 3.1) sums HSIC_1 over
minibatches of aligned rows before the ratio::

    CKA = Σ_i HSIC_1(K_i, L_i) / sqrt(Σ_i HSIC_1(K_i, K_i) · Σ_i HSIC_1(L_i, L_i))

HSIC_1 is unbiased, not bounded: CKA can be slightly negative or slightly above 1 for small
n (values are not clipped). Of two independent representations, it is near 0, where the
biased estimator (HSIC_0 = tr(KHLH)/(n-1)², with the centring matrix H) is far above 0
when n is small and p, q are large. A representation that is constant over the samples has
HSIC_1(K, K) = 0 and its CKA is NaN, as is any CKA whose self-terms multiply to a value
that is not positive.

HSIC_1 with a linear kernel is invariant to translating the features, so each minibatch's
columns are centred before its Gram matrix is formed: nothing changes in exact arithmetic,
but features with large means lose no precision, and a constant representation gives
exactly zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class _Gram:
    """A Gram matrix (n, n) float64 with its diagonal set to zero, with its column sums,
    row sums and total, so that HSIC_1 of a pair costs one elementwise product."""

    gram: torch.Tensor
    cols: torch.Tensor
    rows: torch.Tensor
    total: torch.Tensor

    @classmethod
    def of(cls, gram: torch.Tensor) -> _Gram:
        gram = gram.to(torch.float64).clone()
        gram.fill_diagonal_(0.0)
        return cls(gram, gram.sum(dim=0), gram.sum(dim=1), gram.sum())


def _hsic(k: _Gram, g: _Gram) -> torch.Tensor:
    """HSIC_1 of two prepared Gram matrices of the same size n >= 4 (float64 scalar)."""
    n = k.gram.shape[0]
    trace = (k.gram * g.gram.T).sum()  # tr(K̃L̃)
    middle = k.total * g.total / ((n - 1) * (n - 2))
    last = 2.0 / (n - 2) * torch.dot(k.cols, g.rows)  # 1ᵀK̃L̃1
    return (trace + middle - last) / (n * (n - 3))


def hsic_unbiased(gram_x: torch.Tensor, gram_y: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator HSIC_1 of two Gram matrices (Song et al., JMLR 2012, eq. 5).

    ``gram_x`` and ``gram_y`` are (n, n) tensors on one device, n >= 4. With K̃ and L̃ the
    Gram matrices with zeroed diagonals::

        HSIC_1 = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((n-1)(n-2)) - 2/(n-2) · 1ᵀK̃L̃1] / (n(n-3))

    Returns a float64 scalar tensor on the inputs' device (computed in float64). Raises
    ValueError when a matrix is not square, the shapes differ, or n < 4."""
    if gram_x.ndim != 2 or gram_x.shape[0] != gram_x.shape[1]:
        raise ValueError(f"gram_x must be a square matrix (n, n), got {tuple(gram_x.shape)}")
    if gram_y.shape != gram_x.shape:
        raise ValueError(
            f"gram_x and gram_y must have the same shape, got {tuple(gram_x.shape)} "
            f"and {tuple(gram_y.shape)}"
        )
    if gram_x.shape[0] < 4:
        raise ValueError(f"HSIC_1 needs n >= 4 samples, got {gram_x.shape[0]}")
    return _hsic(_Gram.of(gram_x), _Gram.of(gram_y))


def _as_float64(x, device: torch.device) -> torch.Tensor:
    """``x`` (n, p) as a float64 tensor on ``device``; ValueError unless 2-D and finite."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.to(device=device, dtype=torch.float64)
    if t.ndim != 2:
        raise ValueError(f"a representation must be 2-D (n samples, features), got {t.ndim}-D")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("a representation holds NaN or infinite values")
    return t


def _device(*arrays) -> torch.device:
    """The device of the tensors among ``arrays`` (CPU when none is a tensor); ValueError
    when tensors lie on different devices."""
    devices = {a.device for a in arrays if isinstance(a, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"representations lie on different devices: {sorted(map(str, devices))}")
    return devices.pop() if devices else torch.device("cpu")


def _bounds(n: int, batch_size: int | None) -> list[tuple[int, int]]:
    """Row ranges of the minibatches: consecutive ``batch_size`` rows, a last batch shorter
    than 4 rows merged into the one before; one batch of all rows when ``batch_size`` is
    None. ValueError for n < 4 or batch_size < 4."""
    if n < 4:
        raise ValueError(f"CKA needs n >= 4 samples, got {n}")
    if batch_size is None:
        return [(0, n)]
    if batch_size < 4:
        raise ValueError(f"batch_size must be >= 4 (HSIC_1 needs 4 samples), got {batch_size}")
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < 4:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


class _Stage:
    """One representation's minibatch Gram matrices and its summed self-term
    Σ_i HSIC_1(K_i, K_i)."""

    def __init__(self, x: torch.Tensor, bounds: list[tuple[int, int]]):
        self.grams = []
        for start, stop in bounds:
            part = x[start:stop]
            part = part - part.mean(dim=0, keepdim=True)
            self.grams.append(_Gram.of(part @ part.T))
        self.self_hsic = sum(_hsic(g, g) for g in self.grams)

    def cka(self, other: _Stage) -> float:
        cross = sum(_hsic(k, g) for k, g in zip(self.grams, other.grams, strict=True))
        norm = self.self_hsic * other.self_hsic
        if not norm > 0:
            return math.nan
        return float(cross / torch.sqrt(norm))


def linear_cka(x, y, batch_size: int | None = None) -> float:
    """Linear CKA of ``x`` (n, p) and ``y`` (n, q), rows aligned (the same n samples).

    ``x`` and ``y`` are numpy arrays or tensors; the computation runs in float64 on the
    tensors' device (CPU for numpy). ``batch_size=None`` treats all n rows as one batch;
    otherwise minibatch CKA (Nguyen et al., ICLR 2021) over consecutive batches of
    ``batch_size`` rows in the given order, a last batch shorter than 4 rows merged into the
    one before. Not clipped to [0, 1]; NaN for a constant representation (see the module
    docstring). Raises ValueError when n differs, n < 4, batch_size < 4, an input is not
    2-D or holds non-finite values, or tensors lie on different devices."""
    device = _device(x, y)
    x, y = _as_float64(x, device), _as_float64(y, device)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same samples, got n = {len(x)} and {len(y)}")
    bounds = _bounds(x.shape[0], batch_size)
    return _Stage(x, bounds).cka(_Stage(y, bounds))


def cka_matrix(
    a: Mapping[str, object], b: Mapping[str, object], batch_size: int | None = None
) -> np.ndarray:
    """Linear CKA of every stage of ``a`` against every stage of ``b``.

    ``a`` and ``b`` map stage names to representations (n, p_stage) of the same n samples
    (numpy arrays or tensors, rows aligned across all stages). Returns a float64 array
    (len(a), len(b)) whose entry [i, j] is ``linear_cka(a's i-th stage, b's j-th stage,
    batch_size)``, in the mappings' order. Each stage's minibatch Gram matrices and self-term
    are computed once (a stage passed as the same object in ``a`` and ``b`` once in all), so
    memory holds every stage's Gram matrices: about n · batch_size float64 values per stage
    (n² without ``batch_size``).
    Raises ValueError as ``linear_cka`` does, and when a mapping is empty."""
    if not a or not b:
        raise ValueError("cka_matrix needs at least one stage in a and in b")
    arrays = [*a.values(), *b.values()]
    device = _device(*arrays)
    counts = {_rows(v) for v in arrays}
    if len(counts) > 1:
        raise ValueError(f"all stages must hold the same samples, got n in {sorted(counts)}")
    bounds = _bounds(counts.pop(), batch_size)
    stages: dict[int, _Stage] = {}

    def stage(v) -> _Stage:
        if id(v) not in stages:
            stages[id(v)] = _Stage(_as_float64(v, device), bounds)
        return stages[id(v)]

    rows = [stage(v) for v in a.values()]
    cols = [stage(v) for v in b.values()]
    return np.array([[r.cka(c) for c in cols] for r in rows], dtype=np.float64).reshape(
        len(rows), len(cols)
    )


def _rows(x) -> int:
    """Number of rows n of a representation (n, p), read without converting it; ValueError
    unless it is 2-D."""
    shape = tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
    if len(shape) != 2:
        raise ValueError(f"a representation must be 2-D (n samples, features), got {shape}")
    return shape[0]
