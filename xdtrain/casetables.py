"""The per-case and per-class tables ``xd-eval`` writes beside ``eval_<name>.json``.

``cases_<name>.csv`` (BraTS, LiTS): one row per case and region, as nnU-Net's
``summary.json`` lists them: ``case`` (the id in the shard manifest's ``cases``), ``region``,
``dice``, ``iou``, ``precision``, ``recall`` (the whole volume's, with the empty-target
convention of :mod:`xdtrain.metrics`), ``hd95_mm`` (:func:`xdtrain.metrics.hd95` in mm from
the voxel spacing the shards store; ``inf`` when exactly one of prediction and truth is
empty; empty when the shards store no spacing: the LiTS PNG release, or a folder packed
before ``case_spacing_mm`` existed) and ``slices`` (the slices scored).

``classes_<name>.csv`` (multi-label and single-label classification): one row per class:
``class``, ``auroc`` (scikit-learn's ``roc_auc_score``: of each output's logit for
multi-label data, one-vs-rest of the softmax log-odds for single-label data), ``ci_low``,
``ci_high`` (95 % percentile interval of a cluster bootstrap), ``positives``, ``negatives``,
``patients`` (the clusters resampled: patients, or images where the samples name none) and
``bootstrap`` (resamples used). The bootstrap resamples whole patients with replacement
(their samples are not independent: a sample-level bootstrap would understate the
uncertainty), with a fixed seed; a resample in which a class has one label only has no AUROC
and is skipped for that class, so ``bootstrap`` may be less than the resamples drawn.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from xdtrain.errors import UserError, first_line
from xdtrain.fileio import atomic_write
from xdtrain.rng import rng_for
from xdtrain.shards import manifest as manifests
from xdtrain.shards.tar import parse_index

log = logging.getLogger("xdtrain.casetables")

RESAMPLES = 1000  # xd-eval --bootstrap's default
SEED = 0  # the bootstrap's seed, recorded in eval_<name>.json
LEVEL = 0.95
CASE_COLUMNS = ("case", "region", "dice", "iou", "precision", "recall", "hd95_mm", "slices")
CLASS_COLUMNS = (
    "class",
    "auroc",
    "ci_low",
    "ci_high",
    "positives",
    "negatives",
    "patients",
    "bootstrap",
)
# classes x samples x resamples above which the bootstrap is left out: about a minute on two
# cores (4e-8 s each; ChestX-ray8's test split at 1000 resamples is 4e8, ImageNet's val 5e10)
BOOTSTRAP_LIMIT = 1.5e9
CHUNK = 4_000_000  # resamples x samples held at once


class Tables:
    """What ``xd-eval`` adds to a scoring run: call it on every batch (as ``evaluate``'s
    ``collect``), then :meth:`write`.

    ``kind``: the shard layout's (``segmentation``, ``multilabel``, ``multiclass``; any
    other writes nothing); ``shardset``: the split scored
    (:class:`xdtrain.data.shardset.ShardSet`); ``metrics``: the task's metrics object that
    scores the run. For segmentation it switches on HD95 in mm
    (:meth:`xdtrain.tasks.segmentation.RegionScores.score_distances`) when the shard manifest
    stores every case's voxel spacing, and warns once, naming the folder, when it does not;
    so make it before the first batch. ``resamples``: bootstrap resamples (0: none).
    Raises :class:`UserError` for a manifest whose spacing record is malformed."""

    def __init__(self, kind: str, shardset, metrics, resamples: int = RESAMPLES, seed: int = SEED):
        if resamples < 0:
            raise UserError(f"--bootstrap {resamples}: give 0 (none) or more resamples")
        self.kind, self.shardset, self.metrics = kind, shardset, metrics
        self.resamples, self.seed = resamples, seed
        self.keys: list[str] = []
        self.scores: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.bootstrap: dict | None = None  # how the intervals were drawn, for the report
        self.cases: list[str] = []
        if kind == "segmentation":
            record = manifests.load(shardset.folder)["preprocessing"]
            self.cases = list(record.get("cases", []))
            spacing = case_spacing(shardset.folder, record)
            if spacing is not None and hasattr(metrics, "score_distances"):
                metrics.score_distances(spacing)

    def __call__(self, batch: dict, outputs) -> None:
        if self.kind == "multilabel":
            self.scores.append(outputs.detach().double().cpu().numpy())  # logits rank as p
            self.labels.append((batch["label"] > 0.5).cpu().numpy().astype(np.uint8))
        elif self.kind == "multiclass":
            self.scores.append(one_vs_rest_scores(outputs).cpu().numpy())
            self.labels.append(batch["label"].cpu().numpy().astype(np.int64))
        else:
            return
        self.keys.extend(batch["keys"])

    def write(self, folder: Path, name: str) -> list[str]:
        """Write the tables of this run into ``folder`` (``cases_<name>.csv`` or
        ``classes_<name>.csv``); returns their paths (none for other kinds)."""
        if self.kind == "segmentation":
            details = getattr(self.metrics, "details", None)
            if not details:
                return []
            rows = case_rows(details, self.cases, self.shardset.folder)
            path = Path(folder) / f"cases_{name}.csv"
            atomic_write(path, csv_text(CASE_COLUMNS, rows))
            return [str(path)]
        if self.kind not in ("multilabel", "multiclass") or not self.scores:
            return []
        scores = np.concatenate(self.scores)
        labels = np.concatenate(self.labels)
        classes = list(self.shardset.classes)
        if self.kind == "multiclass":
            labels = (labels[:, None] == np.arange(len(classes))[None]).astype(np.uint8)
        groups, unit = clusters(self.keys, sample_patients(self.shardset), self.shardset.folder)
        resamples = self.resamples
        cost = float(len(classes)) * len(groups) * resamples
        if cost > BOOTSTRAP_LIMIT:
            fits = int(BOOTSTRAP_LIMIT // (len(classes) * len(groups)))
            log.warning(
                "%s: a bootstrap of %d resamples over %d classes x %d samples is too costly "
                "here; intervals left out of classes_%s.csv (%s)",
                self.shardset.folder,
                resamples,
                len(classes),
                len(groups),
                name,
                f"pass --bootstrap {fits} or fewer" if fits else "pass --bootstrap 0 to skip it",
            )
            resamples = 0
        rows = class_rows(scores, labels, groups, classes, resamples, self.seed)
        self.bootstrap = {
            "resamples": resamples,
            "seed": self.seed,
            "unit": unit,
            "clusters": int(groups.max() + 1) if groups.size else 0,
            "interval": f"percentile, {LEVEL:.0%}",
        }
        path = Path(folder) / f"classes_{name}.csv"
        atomic_write(path, csv_text(CLASS_COLUMNS, rows))
        return [str(path)]


# --------------------------------------------------------------------------- segmentation


def case_spacing(folder: Path, record: dict) -> dict[int, tuple[float, float, float]] | None:
    """Case index -> voxel size (slice, row, column) in mm from a shard manifest's
    ``preprocessing`` ``record`` (``case_spacing_mm``, in the order of ``cases``); None, with
    one warning naming ``folder``, when it stores none (the LiTS PNG release, or shards
    packed before the key existed). Raises :class:`UserError` when it is malformed."""
    where = Path(folder) / manifests.NAME
    if "case_spacing_mm" not in record:
        log.warning(
            "%s: no voxel spacing stored (packed by an older xd-shard); HD95 left out of the "
            "cases table: re-shard with this version (xd-shard ... --force) to get it",
            folder,
        )
        return None
    spacing, cases = record["case_spacing_mm"], record.get("cases", [])
    if spacing is None or (isinstance(spacing, list) and None in spacing):
        log.warning(
            "%s: no voxel spacing stored (its source, e.g. the LiTS PNG release, has none); "
            "HD95 left out of the cases table",
            folder,
        )
        return None
    if not isinstance(spacing, list) or len(spacing) != len(cases):
        raise UserError(
            f"{where}: preprocessing.case_spacing_mm does not list one spacing per case; "
            "repack the data set with --force"
        )
    out = {}
    for index, value in enumerate(spacing):
        if not (
            isinstance(value, list)
            and len(value) == 3
            and all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in value)
        ):
            raise UserError(
                f"{where}: preprocessing.case_spacing_mm of {cases[index]} is {value!r}, not "
                "three positive sizes in mm; repack the data set with --force"
            )
        out[index] = tuple(float(v) for v in value)
    return out


def case_rows(details: dict, cases: list[str], folder: Path) -> list[list]:
    """Rows of ``cases_<name>.csv`` (:data:`CASE_COLUMNS`) from the ``details`` of
    :class:`xdtrain.tasks.segmentation.RegionScores` (``SegmentationMetrics.compute()``):
    cases in the manifest's order, regions in the task's. ``cases``: the manifest's case ids,
    indexed by the ``case`` of a batch. Raises :class:`UserError` naming the folder's manifest
    when a case index is not in ``cases`` (shards that do not belong to that manifest)."""
    regions = details["regions"]
    scored = sorted({c for entry in regions.values() for c in entry["scores_cases"]})
    missing = [c for c in scored if not 0 <= c < len(cases)]
    if missing:
        raise UserError(
            f"{Path(folder) / manifests.NAME}: lists {len(cases)} cases, but slices of case "
            f"index {missing[0]} were scored; run `xd-shard verify {folder}`"
        )
    slices = details.get("slices_scored", {})
    rows = []
    for case in scored:
        for name, entry in regions.items():
            scores = entry["scores_cases"][case]
            distance = entry.get("hd95_cases", {}).get(case)
            rows.append(
                [
                    cases[case],
                    name,
                    scores["dice"],
                    scores["iou"],
                    scores["precision"],
                    scores["recall"],
                    distance,
                    slices.get(case),
                ]
            )
    return rows


def csv_text(columns: tuple[str, ...], rows: list[list]) -> str:
    """CSV text with a header row; floats at full precision (``repr``), ``inf`` as ``inf``,
    None and NaN as empty cells."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if v is None or (isinstance(v, float) and v != v) else v for v in row])
    return buffer.getvalue()


# --------------------------------------------------------------------------- classification


def one_vs_rest_scores(logits: torch.Tensor) -> torch.Tensor:
    """``log(p_k / (1 - p_k))`` of the softmax probabilities of logits ``[B, C]``, float64
    ``[B, C]``: the one-vs-rest score :func:`xdtrain.tasks.classify.log_odds` computes (it
    ranks as ``p_k`` does and never saturates), in ``O(B C)`` memory instead of
    ``O(B C^2)`` (ImageNet's 1000 classes). For every class but the top one ``p_k <= 1/2``,
    so ``log(1 - p_k)`` is exact through ``log1p``; the top class's others are summed apart."""
    values = logits.detach().double()
    total = torch.logsumexp(values, dim=1, keepdim=True)
    out = values - total - torch.log1p(-torch.exp(values - total))
    top = values.argmax(dim=1, keepdim=True)
    others = torch.logsumexp(values.scatter(1, top, float("-inf")), dim=1, keepdim=True)
    return out.scatter(1, top, values.gather(1, top) - others)


def sample_patients(shardset) -> dict[str, str | None]:
    """Sample key -> the ``patient`` its ``json`` names (None where it names none: ImageNet)
    for every sample of ``shardset``'s shards, read by offset through their DALI indexes (the
    batches carry keys, not patients). Raises :class:`UserError` naming the shard when a
    ``json`` cannot be read."""
    out: dict[str, str | None] = {}
    for path, index in zip(shardset.paths, shardset.index_paths, strict=True):
        key = "?"
        try:
            refs = parse_index(Path(index).read_text())
            with open(path, "rb") as fh:
                for ref in refs:
                    key = ref.key
                    part = next((p for p in ref.parts if p[0] == "json"), None)
                    meta = None
                    if part is not None:
                        fh.seek(part[1])
                        meta = json.loads(fh.read(part[2]))
                    patient = meta.get("patient") if isinstance(meta, dict) else None
                    out[ref.key] = None if patient is None else str(patient)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"{path}: cannot read the json of sample {key} ({first_line(exc, 80)}); "
                f"run `xd-shard verify {shardset.folder}`"
            ) from None
    return out


def clusters(keys: list[str], patients: dict[str, str | None], folder) -> tuple[np.ndarray, str]:
    """Cluster index (int64 ``[N]``, 0..G-1) of each scored sample, and the unit: its
    patient's (``patient``), or each sample its own where no sample names one (``image``).
    Raises :class:`UserError` naming ``folder`` when only some samples name a patient, and
    ValueError for a key not in ``patients``."""
    unknown = [k for k in keys if k not in patients]
    if unknown:
        raise ValueError(f"sample {unknown[0]} was scored but is not in the split's shards")
    named = [patients[k] for k in keys]
    if all(p is None for p in named):
        _, index = np.unique(np.array(keys, dtype=object), return_inverse=True)
        return index.astype(np.int64).reshape(-1), "image"
    if any(p is None for p in named):
        lacking = next(k for k, p in zip(keys, named, strict=True) if p is None)
        raise UserError(
            f"{folder}: sample {lacking} names no patient in its json while others do; the "
            "patient bootstrap needs every sample's: repack the data set"
        )
    _, index = np.unique(np.array(named, dtype=object), return_inverse=True)
    return index.astype(np.int64).reshape(-1), "patient"


def resample_counts(groups: int, resample: int, seed: int) -> np.ndarray:
    """How often each of ``groups`` clusters is drawn (int64 ``[groups]``, summing to
    ``groups``) in resample number ``resample``: ``groups`` draws with replacement from
    ``rng_for(seed, "bootstrap", resample)``, so a resample does not depend on how many
    others are drawn, or in what chunks."""
    rng = rng_for(seed, "bootstrap", resample)
    return np.bincount(rng.integers(0, groups, size=groups), minlength=groups)


def weighted_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of one class under each row of sample ``weights`` (float ``[R, N]``; a
    resample's count of each sample), float64 ``[R]``: the Mann-Whitney statistic with tied
    scores counting half, which equals scikit-learn's
    ``roc_auc_score(labels, scores, sample_weight=w)`` (tested). ``scores``: float ``[N]``;
    ``labels``: 0/1 ``[N]``. NaN where the positives or the negatives weigh 0."""
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    positive = labels[order].astype(bool)
    w = weights[:, order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # tie groups
    pos = np.add.reduceat(np.where(positive, w, 0.0), starts, axis=1)
    neg = np.add.reduceat(np.where(positive, 0.0, w), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (below + 0.5 * neg)).sum(axis=1) / pairs
    auc[pairs == 0] = np.nan
    return auc


def bootstrap_aurocs(
    scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, resamples: int, seed: int
) -> np.ndarray:
    """Each class's AUROC in each cluster-bootstrap resample, float64 ``[resamples, C]`` (NaN
    where a class has one label only in that resample). ``scores``: float ``[N, C]``;
    ``labels``: 0/1 ``[N, C]``; ``groups``: int ``[N]`` cluster index of each sample (0..G-1):
    every sample of a drawn cluster enters with the cluster's count
    (:func:`resample_counts`)."""
    count = int(groups.max()) + 1 if groups.size else 0
    out = np.full((resamples, scores.shape[1]), np.nan)
    step = max(1, CHUNK // max(len(groups), 1))
    for start in range(0, resamples, step):
        stop = min(start + step, resamples)
        drawn = np.stack([resample_counts(count, r, seed) for r in range(start, stop)])
        weights = drawn[:, groups]
        for c in range(scores.shape[1]):
            out[start:stop, c] = weighted_auroc(scores[:, c], labels[:, c], weights)
    return out


def class_rows(
    scores: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    classes: list[str],
    resamples: int,
    seed: int,
) -> list[list]:
    """Rows of ``classes_<name>.csv`` (:data:`CLASS_COLUMNS`): per class the AUROC
    (scikit-learn) of ``scores`` ``[N, C]`` against 0/1 ``labels`` ``[N, C]``, and the
    ``LEVEL`` percentile interval of the AUROCs of ``resamples`` cluster-bootstrap resamples
    of ``groups`` (:func:`bootstrap_aurocs`), skipping those where the class has one label
    only. A class with one label only in the whole split has no AUROC: empty cells."""
    from sklearn.metrics import roc_auc_score

    drawn = bootstrap_aurocs(scores, labels, groups, resamples, seed) if resamples else None
    tail = 100 * (1 - LEVEL) / 2
    patients = len(np.unique(groups))
    rows = []
    for c, name in enumerate(classes):
        y = labels[:, c].astype(bool)
        positives, negatives = int(y.sum()), int((~y).sum())
        auroc = low = high = None
        used = 0
        if positives and negatives:
            auroc = float(roc_auc_score(y, scores[:, c]))
            if drawn is not None:
                values = drawn[:, c][np.isfinite(drawn[:, c])]
                used = len(values)
                if used:
                    low, high = (float(v) for v in np.percentile(values, [tail, 100 - tail]))
        rows.append([name, auroc, low, high, positives, negatives, patients, used])
    return rows
