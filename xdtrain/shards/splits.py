"""Seeded, patient-level splits and nested training fractions.

Everything here works on *groups* (a patient, a BraTS case, a LiTS volume, or a single image
where a data set has no patients): all samples of a group land in the same split, so no
patient is ever in two splits.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from xdtrain.errors import UserError
from xdtrain.rng import rng_for

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.5, 0.1, 0.01)


def parse_ratios(text: str, names: tuple[str, ...] = SPLITS) -> dict[str, float]:
    """``"0.7,0.1,0.2"`` -> ``{"train": 0.7, "val": 0.1, "test": 0.2}`` (must sum to 1)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--splits {text}: expected numbers like 0.7,0.1,0.2") from None
    if len(values) != len(names) or any(v < 0 for v in values) or abs(sum(values) - 1) > 1e-6:
        raise UserError(
            f"--splits {text}: expected {len(names)} non-negative shares for "
            f"{'/'.join(names)} that sum to 1"
        )
    return dict(zip(names, values, strict=True))


def parse_fractions(text: str) -> tuple[float, ...]:
    """``"0.5,0.1,0.01"`` -> nested training fractions, largest first, whole percentages."""
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()}, reverse=True)
    except ValueError:
        raise UserError(f"--fractions {text}: expected numbers like 0.5,0.1,0.01") from None
    for v in values:
        if not 0 < v < 1 or abs(v * 100 - round(v * 100)) > 1e-9:
            raise UserError(f"--fractions {text}: each must be a whole percentage in (0, 1)")
    return tuple(values)


def tier_name(fraction: float) -> str:
    """The shard-name tag of the training tier that completes ``fraction``: 0.1 -> ``p010``."""
    return f"p{round(fraction * 100):03d}"


def assign_splits(
    groups: dict[str, str],
    ratios: dict[str, float],
    seed: int,
    weights: dict[str, int] | None = None,
) -> dict[str, str]:
    """Assign every group to a split, per stratum, so split sizes follow ``ratios``.

    ``groups`` maps a group id to its stratum (``""`` for none); ``weights`` (samples per
    group, default 1) make the shares count samples rather than groups. Within each stratum the
    groups are shuffled (seeded) and each goes to the split furthest below its target. Every
    split with a non-zero share gets at least one group when there are enough groups.
    """
    weights = weights or {}
    active = [s for s, r in ratios.items() if r > 0]
    strata: dict[str, list[str]] = defaultdict(list)
    for group, stratum in groups.items():
        strata[stratum].append(group)
    assignment: dict[str, str] = {}
    grand_total = sum(weights.get(g, 1) for g in groups)
    grand_filled = dict.fromkeys(active, 0.0)
    for stratum in sorted(strata):
        members = sorted(strata[stratum])
        rng_for(seed, "splits", stratum).shuffle(members)
        total = sum(weights.get(g, 1) for g in members)
        filled = dict.fromkeys(active, 0.0)
        for group in members:
            # The stratum's own shortfall first; ties go to the split short overall.
            split = max(
                active,
                key=lambda s, t=total, f=filled: (
                    ratios[s] * t - f[s],
                    ratios[s] * grand_total - grand_filled[s],
                ),
            )
            assignment[group] = split
            filled[split] += weights.get(group, 1)
            grand_filled[split] += weights.get(group, 1)
    _ensure_every_split_has_a_group(assignment, active, weights)
    return assignment


def _ensure_every_split_has_a_group(assignment, active, weights) -> None:
    if len(assignment) < len(active):
        return
    for split in active:
        if split in assignment.values():
            continue
        counts = defaultdict(int)
        for group, s in assignment.items():
            counts[s] += weights.get(group, 1)
        donor = max(counts, key=counts.get)
        smallest = min(
            (g for g, s in sorted(assignment.items()) if s == donor),
            key=lambda g: weights.get(g, 1),
        )
        assignment[smallest] = split


def fraction_tier_indices(n: int, fractions: tuple[float, ...], seed: int) -> np.ndarray:
    """For ``n`` training groups in sorted order: the index into ``sorted(fractions) + [1.0]``
    of the smallest fraction holding each group.

    Fractions are nested: the groups in 1 % are in 10 %, those in 10 % are in 50 %. A fraction
    holds ``ceil(f * n)`` groups, at least one. Works on arrays, so a million groups cost a
    few megabytes.
    """
    position = np.empty(n, np.int64)
    position[rng_for(seed, "fractions").permutation(n)] = np.arange(n)
    ascending = sorted(fractions)
    index = np.full(n, len(ascending), np.int8)
    for i, fraction in reversed(list(enumerate(ascending))):
        index[position < max(1, math.ceil(fraction * n))] = i
    return index


def fraction_tiers(groups: list[str], fractions: tuple[float, ...], seed: int) -> dict[str, float]:
    """For each training group, the smallest fraction that contains it (1.0 for the rest)."""
    order = sorted(set(groups))
    choices = [*sorted(fractions), 1.0]
    indices = fraction_tier_indices(len(order), fractions, seed)
    return {group: choices[i] for group, i in zip(order, indices.tolist(), strict=True)}
