"""Metrics that stream over batches and reduce across DDP ranks.

Call ``update`` per batch and ``compute`` once at the end, on every rank (``compute`` takes
part in collective operations when a process group is running; every rank gets the same
result).

Empty-target convention (segmentation): a score whose denominator is zero is 1 when the
class or region is absent from both the target and the prediction of a case, else 0. So a
case without the class, predicted without it, scores Dice, IoU, precision and recall of 1;
predicted with it, 0; a missed class scores 0 by the formulas themselves. Per-case means thus
reward correctly predicting absence (a BraTS case without enhancing tumour, predicted
without it, counts as a perfect ET case), as the BraTS challenge ranking does.

AUROC of a class whose targets are all equal is undefined: it is reported as NaN and left
out of the means (the count of classes averaged is reported).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from xdtrain.distributed import gather_objects, sum_tensor


class TopKAccuracy:
    """Top-k accuracy of class logits ``[B, C]`` against class indices ``[B]``."""

    def __init__(self, ks: tuple[int, ...] = (1, 5)):
        self.ks = ks
        self.correct = torch.zeros(len(ks), dtype=torch.float64)
        self.count = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        top = logits.detach().topk(min(max(self.ks), logits.shape[1]), dim=1).indices
        hits = top == labels.view(-1, 1)
        for i, k in enumerate(self.ks):
            self.correct[i] += hits[:, :k].any(dim=1).sum().item()
        self.count += labels.numel()

    def compute(self) -> dict[str, float]:
        totals = sum_tensor(torch.cat([self.correct, torch.tensor([float(self.count)])]))
        count = totals[-1].item()
        return {f"top{k}": totals[i].item() / max(count, 1) for i, k in enumerate(self.ks)}


class MultiLabelAUROC:
    """Per-class AUROC of multi-label scores ``[B, C]`` (scikit-learn's ``roc_auc_score``).

    ``mean`` averages the classes in ``findings`` (ChestX-ray8: the 14 findings, without
    ``No Finding``); ``mean_all`` every class, for comparison with the study, which averaged
    ``No Finding`` in. ``left_out`` names each class ``mean`` did not average and why."""

    def __init__(self, names: list[str], findings: int | None = None):
        self.names = list(names)
        self.findings = len(names) if findings is None else findings
        self.scores: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.scores.append(logits.detach().double().cpu().numpy())  # (bf16 has no numpy)
        self.targets.append(targets.detach().cpu().numpy().astype(np.int8))

    def compute(self) -> dict:
        from sklearn.metrics import roc_auc_score  # here: its import takes ~2 s of a start

        parts = gather_objects((self.scores, self.targets))
        scores = np.concatenate([s for p in parts for s in p[0]] or [np.zeros((0, 0))])
        targets = np.concatenate([t for p in parts for t in p[1]] or [np.zeros((0, 0))])
        per_class = {}
        for i, name in enumerate(self.names):
            column = targets[:, i] if targets.size else np.zeros(0)
            if column.size == 0 or column.min() == column.max():
                per_class[name] = float("nan")
            else:
                per_class[name] = float(roc_auc_score(column, scores[:, i]))
        values = list(per_class.values())
        findings = [v for v in values[: self.findings] if not np.isnan(v)]
        every = [v for v in values if not np.isnan(v)]
        reasons = {n: "not a finding" for n in self.names[self.findings :]}
        for name, value in per_class.items():
            if np.isnan(value):
                reasons.setdefault(name, "one label only")
        left_out = [f"{n} ({reasons[n]})" for n in self.names if n in reasons]
        return {
            "auroc": per_class,
            "left_out": left_out,
            "mean": float(np.mean(findings)) if findings else float("nan"),
            "mean_all": float(np.mean(every)) if every else float("nan"),
            "classes_averaged": len(findings),
            "samples": int(targets.shape[0]),
        }


def _ratio(num: float, den: float, empty: float) -> float:
    return num / den if den > 0 else empty


def overlap_scores(tp: float, fp: float, fn: float) -> dict[str, float]:
    """Dice, IoU, precision, recall from voxel counts, with the empty-target convention."""
    target_empty, pred_empty = tp + fn == 0, tp + fp == 0
    both_empty = 1.0 if target_empty and pred_empty else 0.0
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "iou": _ratio(tp, tp + fp + fn, both_empty),
        "precision": _ratio(tp, tp + fp, both_empty),
        "recall": _ratio(tp, tp + fn, both_empty),
    }


class SegmentationMetrics:
    """Dice, IoU, precision and recall per region, over all pixels and per case.

    ``regions`` maps a name to the labels it contains (BraTS: WT = {1, 2, 3}, TC = {1, 3},
    ET = {3}; LiTS: liver = {1, 2}, tumour = {2}). Per-case scores are those of the 3-D
    volume made of all the case's slices, wherever (batch, rank) they were scored; ``hd95``
    rebuilds the volumes from ``slice`` indices (axes: slice, row, column) and adds the
    95th-percentile Hausdorff distance (:func:`hd95`): in mm when ``spacing`` maps every
    case id to its voxel size ``(slice, row, column)`` in mm (the shard manifest's
    ``preprocessing.case_spacing_mm``), in voxels when ``spacing`` is None. ``compute``
    raises ValueError when a case scored has no spacing there.

    Target pixels of -1 are padding, not pixels: they count in no region, whatever the
    prediction says there. When ``update`` gets ``slices`` (the number of slices of each
    sample's case volume) with ``slice_index``, ``compute`` also lists the cases scored with
    fewer distinct slices than their volume has (``incomplete_cases``)."""

    def __init__(
        self,
        regions: dict[str, tuple[int, ...]],
        hd95: bool = False,
        spacing: Mapping[int, Sequence[float]] | None = None,
    ):
        self.regions = {name: tuple(labels) for name, labels in regions.items()}
        self.hd95 = hd95
        self.spacing = None if spacing is None else {int(c): s for c, s in spacing.items()}
        self.cases: dict[int, np.ndarray] = defaultdict(lambda: np.zeros((len(regions), 3)))
        # case -> slice index -> (pred, target) label maps, for hd95
        self.volumes: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = defaultdict(dict)
        self.seen: dict[int, set[int]] = defaultdict(set)  # case -> slice indices scored
        self.depth: dict[int, int] = {}  # case -> slices in its volume

    def update(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        case: torch.Tensor,
        slice_index: torch.Tensor | None = None,
        slices: torch.Tensor | None = None,
    ) -> None:
        """Add a batch.

        ``pred`` and ``target``: label maps ``[B, H, W]`` (target -1: padding); ``case``:
        ``[B]`` case ids; ``slice_index``: ``[B]`` index of each slice in its case volume
        (needed with ``hd95`` or ``slices``); ``slices``: int64 ``[B]``, slices in each
        sample's case volume. Raises ValueError when a needed index is missing or a case is
        given two different depths."""
        pred, target = pred.detach(), target.detach()
        valid = target >= 0
        counts = []
        for labels in self.regions.values():
            lab = torch.tensor(labels, device=pred.device)
            p, t = torch.isin(pred, lab) & valid, torch.isin(target, lab)
            counts.append(
                torch.stack([(p & t).sum((1, 2)), (p & ~t).sum((1, 2)), (~p & t).sum((1, 2))], 1)
            )
        counts = torch.stack(counts, 1).cpu().numpy()  # [B, regions, (tp, fp, fn)]
        for i, c in enumerate(case.tolist()):
            self.cases[int(c)] += counts[i]
        if (self.hd95 or slices is not None) and slice_index is None:
            raise ValueError("SegmentationMetrics: hd95 and slices need slice_index")
        if slices is not None:
            self._track(case.tolist(), slice_index.tolist(), slices.tolist())
        if self.hd95:
            pred, target = pred.cpu().numpy(), target.cpu().numpy()
            for i, (c, s) in enumerate(zip(case.tolist(), slice_index.tolist(), strict=True)):
                if (target[i] >= 0).any():  # a slice of padding only is no slice
                    self.volumes[int(c)][int(s)] = _unpadded(pred[i], target[i])

    def _track(self, cases: list[int], indices: list[int], depths: list[int]) -> None:
        for c, s, n in zip(cases, indices, depths, strict=True):
            if self.depth.setdefault(int(c), int(n)) != int(n):
                raise ValueError(f"case {c}: given {self.depth[int(c)]} and {n} slices")
            self.seen[int(c)].add(int(s))

    def compute(self) -> dict:
        """``{"cases": n, "regions": {name: scores}}``, plus ``incomplete_cases`` (sorted
        case ids) and ``slices_scored`` (case id -> distinct slices scored) when slice counts
        were given; the same on every rank. Per region: ``all_pixels`` and ``<metric>_per_case``
        (means), ``dice_cases`` and ``scores_cases`` (case id -> Dice, or -> the four
        scores), with ``hd95``: ``hd95_per_case`` (mean of the finite ones) and
        ``hd95_cases``."""
        merged: dict[int, np.ndarray] = defaultdict(lambda: np.zeros((len(self.regions), 3)))
        parts = gather_objects((dict(self.cases), dict(self.seen), self.depth))
        for counts_part, _, _ in parts:
            for case, counts in counts_part.items():
                merged[case] += counts
        result: dict = {"cases": len(merged), "regions": {}}
        names = list(self.regions)
        total = sum(merged.values()) if merged else np.zeros((len(names), 3))
        depths = {c: n for _, _, part in parts for c, n in part.items()}
        distances = self._hd95(names, depths) if self.hd95 else {}
        for r, name in enumerate(names):
            per_case = [overlap_scores(*merged[c][r]) for c in sorted(merged)]
            entry = {"all_pixels": overlap_scores(*total[r])}
            for metric in ("dice", "iou", "precision", "recall"):
                values = [s[metric] for s in per_case]
                entry[f"{metric}_per_case"] = float(np.mean(values)) if values else float("nan")
            entry["dice_cases"] = {
                int(c): s["dice"] for c, s in zip(sorted(merged), per_case, strict=True)
            }
            entry["scores_cases"] = dict(zip(map(int, sorted(merged)), per_case, strict=True))
            if distances:
                finite = [d for d in distances[name].values() if np.isfinite(d)]
                entry["hd95_per_case"] = float(np.mean(finite)) if finite else float("nan")
                entry["hd95_cases"] = dict(sorted(distances[name].items()))
            result["regions"][name] = entry
        incomplete = _incomplete_cases([(seen, depth) for _, seen, depth in parts])
        if incomplete is not None:
            result["incomplete_cases"] = incomplete
            scored: dict[int, set[int]] = defaultdict(set)
            for _, seen, _ in parts:
                for case, indices in seen.items():
                    scored[int(case)] |= indices
            result["slices_scored"] = {c: len(scored[c]) for c in sorted(scored)}
        return result

    def _hd95(self, names: list[str], depths: dict[int, int]) -> dict[str, dict[int, float]]:
        """HD95 per region and case; NaN for a case whose volume lacks slices (its depth
        known from ``slices``, or a gap in its indices): surface distances across a missing
        slice would be understated."""
        volumes: dict[int, dict[int, tuple]] = defaultdict(dict)
        for part in gather_objects(dict(self.volumes)):
            for case, slices in part.items():
                volumes[case].update(slices)
        out: dict[str, dict[int, float]] = {name: {} for name in names}
        for case, slices in volumes.items():
            spacing = None
            if self.spacing is not None:
                spacing = self.spacing.get(int(case))
                if spacing is None:
                    raise ValueError(f"case {case}: no voxel spacing given for its HD95")
            order = sorted(slices)
            whole = range(depths.get(int(case), order[-1] + 1))
            if order != list(whole):
                for name in names:
                    out[name][int(case)] = float("nan")
                continue
            pred = np.stack([slices[s][0] for s in order])
            target = np.stack([slices[s][1] for s in order])
            for name in names:
                labels = list(self.regions[name])
                distance = hd95(np.isin(pred, labels), np.isin(target, labels), spacing)
                out[name][int(case)] = distance
        return out


def _unpadded(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A slice's ``(pred, target)`` label maps ``[H, W]`` cropped to the bounding box of its
    pixels (target not -1; there must be one), as uint8, so that the slices of a case padded
    to different batch sizes stack into one volume."""
    valid = target >= 0
    rows, cols = np.flatnonzero(valid.any(1)), np.flatnonzero(valid.any(0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    pred = np.where(valid, pred, 0)[box]
    return pred.astype(np.uint8), target[box].astype(np.uint8)


def _incomplete_cases(parts: list[tuple[dict, dict]]) -> list[int] | None:
    """Case ids scored with fewer distinct slice indices (of 0..depth-1) than their volume
    has, over the ``(seen slice indices, depth)`` of every rank; None when no rank was given
    depths.
    Raises ValueError when two ranks give one case different depths."""
    seen: dict[int, set[int]] = defaultdict(set)
    depth: dict[int, int] = {}
    for part_seen, part_depth in parts:
        for case, indices in part_seen.items():
            seen[case] |= indices
        for case, n in part_depth.items():
            if depth.setdefault(case, n) != n:
                raise ValueError(f"case {case}: given {depth[case]} and {n} slices")
    if not depth:
        return None
    return sorted(int(c) for c, n in depth.items() if len(seen[c] & set(range(n))) < n)


def hd95(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile Hausdorff distance of two boolean masks of one shape, in millimetres
    when ``spacing`` gives the voxel size along each axis (mm, in the arrays' axis order: a
    rebuilt volume's slice, row, column), else in voxels (unit spacing).

    MONAI's definition (``monai.metrics.compute_hausdorff_distance(percentile=95,
    spacing=...)``): the surface of a mask is its voxels that binary erosion (6-connected in
    3-D, outside the array counts as background) removes; each directed distance set holds,
    for every surface voxel of one mask, the Euclidean distance (scipy's
    ``distance_transform_edt`` with ``sampling=spacing``) to the nearest surface voxel of the
    other; the result is the larger of the two sets' 95th percentiles (linear interpolation).
    medpy instead pools both sets before taking the percentile. 0 when both masks are empty,
    inf when exactly one is (MONAI: NaN or inf). Both masks are cropped to the bounding box
    of their union (a voxel of margin, within the array) first: every surface voxel and every
    nearest one lies inside it, so the distances are exact, and much cheaper on volumes whose
    structures are small. Raises ValueError when the shapes differ or ``spacing`` has another
    length or a value that is not a positive finite number."""
    from scipy import ndimage

    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if pred.shape != target.shape:
        raise ValueError(f"hd95: masks of shapes {pred.shape} and {target.shape}")
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != pred.ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(
                f"hd95: spacing {spacing} is not {pred.ndim} positive voxel sizes in mm"
            )
    if not pred.any() and not target.any():
        return 0.0
    if not pred.any() or not target.any():
        return float("inf")
    box = _bounding_box(pred | target, margin=1)
    pred, target = pred[box], target[box]

    def surface(mask):
        return mask & ~ndimage.binary_erosion(mask)

    sp, st = surface(pred), surface(target)
    to_target = ndimage.distance_transform_edt(~st, sampling=spacing)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[st]
    return float(max(np.percentile(to_target, 95), np.percentile(to_pred, 95)))


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The smallest box holding every True voxel of ``mask`` (one at least), grown by
    ``margin`` voxels on each side where the array allows."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(hits[0] - margin, 0), min(hits[-1] + 1 + margin, mask.shape[axis])))
    return tuple(box)


# classes, then the regions each challenge ranks by
BRATS_REGIONS = {"NCR/NET": (1,), "ED": (2,), "ET": (3,), "WT": (1, 2, 3), "TC": (1, 3)}
LITS_REGIONS = {"parenchyma": (1,), "liver": (1, 2), "tumour": (2,)}
