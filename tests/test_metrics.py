"""xdtrain.metrics against independent references: scikit-learn (top-k accuracy, AUROC,
precision, recall), MONAI (Dice, IoU, HD95 of 3-D volumes) and hand computations."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import precision_score, recall_score, roc_auc_score, top_k_accuracy_score

from xdtrain.metrics import (
    BRATS_REGIONS,
    LITS_REGIONS,
    MultiLabelAUROC,
    SegmentationMetrics,
    TopKAccuracy,
    hd95,
    overlap_scores,
)


def test_topk_accuracy():
    metric = TopKAccuracy((1, 2))
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.3, 0.3, 0.4]])
    metric.update(logits, torch.tensor([1, 1, 0]))
    metric.update(logits[:1], torch.tensor([2]))
    result = metric.compute()
    assert result["top1"] == pytest.approx(1 / 4)
    assert result["top2"] == pytest.approx(3 / 4)


def test_topk_accuracy_equals_scikit_learn_over_batches():
    rng = np.random.default_rng(1)
    logits, labels = rng.normal(size=(300, 10)), rng.integers(0, 10, 300)
    metric = TopKAccuracy((1, 3, 5))
    for start in range(0, 300, 64):
        metric.update(
            torch.tensor(logits[start : start + 64]), torch.tensor(labels[start : start + 64])
        )
    result = metric.compute()
    for k in (1, 3, 5):
        expected = top_k_accuracy_score(labels, logits, k=k, labels=np.arange(10))
        assert result[f"top{k}"] == pytest.approx(expected, abs=1e-12)


def test_auroc_equals_scikit_learn_and_leaves_no_finding_out_of_the_mean():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, (200, 4))
    scores = targets * 0.8 + rng.normal(0, 0.7, (200, 4))
    metric = MultiLabelAUROC(["a", "b", "c", "No Finding"], findings=3)
    for chunk in range(0, 200, 64):
        metric.update(
            torch.tensor(scores[chunk : chunk + 64]), torch.tensor(targets[chunk : chunk + 64])
        )
    result = metric.compute()
    expected = [roc_auc_score(targets[:, i], scores[:, i]) for i in range(4)]
    assert list(result["auroc"].values()) == pytest.approx(expected, abs=1e-12)
    assert result["mean"] == pytest.approx(np.mean(expected[:3]))
    assert result["mean_all"] == pytest.approx(np.mean(expected))
    assert result["samples"] == 200


def test_auroc_of_a_class_without_positives_is_nan_and_not_averaged():
    metric = MultiLabelAUROC(["a", "b"])
    metric.update(torch.tensor([[0.1, 0.2], [0.9, 0.4]]), torch.tensor([[0, 0], [1, 0]]))
    result = metric.compute()
    assert result["auroc"]["a"] == 1.0 and math.isnan(result["auroc"]["b"])
    assert result["mean"] == 1.0 and result["classes_averaged"] == 1


def test_overlap_scores_by_hand_including_empty_cases():
    assert overlap_scores(3, 1, 2) == pytest.approx(
        {"dice": 6 / 9, "iou": 3 / 6, "precision": 3 / 4, "recall": 3 / 5}
    )
    both_empty = overlap_scores(0, 0, 0)
    assert both_empty == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}
    false_alarm = overlap_scores(0, 5, 0)  # empty target, something predicted
    assert false_alarm["dice"] == 0.0 and false_alarm["precision"] == 0.0
    assert false_alarm["recall"] == 0.0
    missed = overlap_scores(0, 0, 4)  # empty prediction, target present
    assert missed == {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0}


def test_dice_per_case_is_over_the_whole_volume_not_per_slice():
    # case 7: two slices; slice 0 has 4 target voxels, 2 predicted right and 1 wrong;
    # slice 1 has no target and no prediction. Case 9: empty target, 1 voxel predicted.
    target = torch.zeros(3, 4, 4, dtype=torch.long)
    pred = torch.zeros(3, 4, 4, dtype=torch.long)
    target[0, 0, :4] = 3
    pred[0, 0, :2] = 3
    pred[0, 3, 3] = 3
    pred[2, 1, 1] = 1
    metric = SegmentationMetrics({"ET": (3,), "TC": (1, 3)})
    # the slices of case 7 arrive in different batches
    metric.update(pred[:1], target[:1], torch.tensor([7]))
    metric.update(pred[1:], target[1:], torch.tensor([7, 9]))
    result = metric.compute()
    et = result["regions"]["ET"]
    assert et["dice_cases"] == {7: pytest.approx(2 * 2 / (2 * 2 + 1 + 2)), 9: 1.0}
    assert et["dice_per_case"] == pytest.approx((4 / 7 + 1.0) / 2)
    assert et["all_pixels"]["dice"] == pytest.approx(4 / 7)
    tc = result["regions"]["TC"]
    assert tc["dice_cases"][9] == 0.0  # empty target, one false voxel
    assert result["cases"] == 2


def test_brats_regions_nest():
    target = torch.tensor([[[1, 2, 3, 0]]])
    metric = SegmentationMetrics(BRATS_REGIONS)
    metric.update(target, target, torch.tensor([0]))
    regions = metric.compute()["regions"]
    assert all(r["dice_per_case"] == 1.0 for r in regions.values())
    assert set(regions) == {"NCR/NET", "ED", "ET", "WT", "TC"}


def test_hd95_by_hand():
    a = np.zeros((1, 10, 10), bool)
    b = np.zeros((1, 10, 10), bool)
    a[0, 2, 2] = True
    b[0, 2, 6] = True
    assert hd95(a, b) == pytest.approx(4.0)
    assert hd95(a, a) == 0.0
    assert hd95(np.zeros_like(a), np.zeros_like(a)) == 0.0
    assert hd95(a, np.zeros_like(a)) == math.inf
    metric = SegmentationMetrics({"x": (1,)}, hd95=True)
    metric.update(
        torch.tensor(a.astype(np.int64)),
        torch.tensor(b.astype(np.int64)),
        torch.tensor([0]),
        torch.tensor([0]),
    )
    assert metric.compute()["regions"]["x"]["hd95_per_case"] == pytest.approx(4.0)


def _ranked_worker(rank, world, init_file, data, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    logits, labels, scores, targets, pred, mask, cases, index, depth = data
    accuracy, auroc = TopKAccuracy((1,)), MultiLabelAUROC(["a", "b"])
    seg = SegmentationMetrics({"fg": (1,)})
    part = slice(rank, None, world)  # interleaved: the slices of a case land on both ranks
    accuracy.update(logits[part], labels[part])
    auroc.update(scores[part], targets[part])
    seg.update(pred[part], mask[part], cases[part], index[part], depth[part])
    out[rank] = (accuracy.compute(), auroc.compute(), seg.compute())
    dist.destroy_process_group()


def test_metrics_reduce_across_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(4)
    logits, labels = torch.randn(20, 5), torch.randint(0, 5, (20,))
    scores, targets = torch.randn(20, 2), torch.randint(0, 2, (20, 2))
    pred, mask = torch.randint(0, 2, (20, 6, 6)), torch.randint(0, 2, (20, 6, 6))
    cases = torch.arange(20) // 5
    index, depth = torch.arange(20) % 5, torch.full((20,), 5)
    depth[15:] = 6  # case 3 has a sixth slice that is never scored
    data = (logits, labels, scores, targets, pred, mask, cases, index, depth)
    out = mp.Manager().dict()
    mp.spawn(_ranked_worker, args=(2, str(tmp_path / "init"), data, out), nprocs=2, join=True)
    accuracy, auroc = TopKAccuracy((1,)), MultiLabelAUROC(["a", "b"])
    seg = SegmentationMetrics({"fg": (1,)})
    accuracy.update(logits, labels)
    auroc.update(scores, targets)
    seg.update(pred, mask, cases, index, depth)
    single = (accuracy.compute(), auroc.compute(), seg.compute())
    for rank in (0, 1):
        assert out[rank][0] == pytest.approx(single[0])
        assert out[rank][1]["auroc"] == pytest.approx(single[1]["auroc"])
        assert out[rank][2]["regions"]["fg"]["dice_cases"] == pytest.approx(
            single[2]["regions"]["fg"]["dice_cases"]
        )
        # each rank saw every case in part; merged, only case 3 lacks a slice
        assert out[rank][2]["incomplete_cases"] == single[2]["incomplete_cases"] == [3]


# --------------------------------------------------------------------------- against MONAI
# Cases are 3-D label volumes at their native size; our metric gets their slices shuffled
# across cases and batches, as the trainer feeds it; MONAI gets each whole volume, one
# channel per region (the one-hot region masks).

NATIVE = (40, 37)


def _labels(rng, depth: int, top: int, shape=NATIVE) -> np.ndarray:
    """A smooth random label volume ``[depth, H, W]`` with labels 0..top (nested blobs)."""
    field = ndimage.gaussian_filter(rng.normal(size=(depth, *shape)), sigma=(1, 3, 3))
    cuts = np.quantile(field, [0.45, 0.7, 0.88][:top])
    return np.digitize(field, cuts).astype(np.int64)


def _cases(regions: dict, top: int, shape=NATIVE) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{case id: (pred, target)}``; the prediction is the target with its field perturbed.

    Case 13 lacks the highest label in both (a region absent from both: 1), case 14 lacks it
    in the truth only (0), case 15 in the prediction only (0)."""
    rng = np.random.default_rng(7)
    out = {}
    for case, depth in zip((11, 12, 13, 14, 15), (9, 5, 7, 4, 6), strict=True):
        target = _labels(rng, depth, top, shape)
        noise = _labels(rng, depth, top, shape)
        pred = np.where(rng.random(target.shape) < 0.15, noise, target)
        pred = np.where(ndimage.binary_dilation(target == 1) & (pred == 0), 1, pred)
        if case in (13, 14):
            target = np.minimum(target, top - 1)
        if case in (13, 15):
            pred = np.minimum(pred, top - 1)
        out[case] = (pred, target)
    return out


def _feed(metric: SegmentationMetrics, cases: dict, size=None, batch: int = 6, seed: int = 3):
    """Every slice of every case, shuffled, in batches; padded to ``size`` plus 0 to 2 rows
    and columns, drawn per batch (target -1, the prediction random labels there), when
    given."""
    rng = np.random.default_rng(seed)
    items = [(c, s) for c, (_, t) in cases.items() for s in range(t.shape[0])]
    order = rng.permutation(len(items))
    for start in range(0, len(order), batch):
        chosen = [items[i] for i in order[start : start + batch]]
        if size is not None:
            padded = (size[0] + rng.integers(0, 3), size[1] + rng.integers(0, 3))
        preds, targets = [], []
        for c, s in chosen:
            pred, target = cases[c][0][s], cases[c][1][s]
            if size is not None:
                pad = [(0, padded[0] - pred.shape[0]), (0, padded[1] - pred.shape[1])]
                pred = np.pad(pred, pad, constant_values=0)
                pred = np.where(
                    np.pad(np.ones_like(target), pad) == 0, rng.integers(0, 4, pred.shape), pred
                )
                target = np.pad(target, pad, constant_values=-1)
            preds.append(pred)
            targets.append(target)
        metric.update(
            torch.tensor(np.stack(preds)),
            torch.tensor(np.stack(targets)),
            torch.tensor([c for c, _ in chosen]),
            torch.tensor([s for _, s in chosen]),
            torch.tensor([cases[c][1].shape[0] for c, _ in chosen]),
        )


def _one_hot(volume: np.ndarray, regions: dict) -> torch.Tensor:
    """``[1, regions, D, H, W]`` float masks, MONAI's input layout."""
    masks = [np.isin(volume, labels) for labels in regions.values()]
    return torch.tensor(np.stack(masks)[None], dtype=torch.float32)


def _monai(cases: dict, regions: dict) -> dict[int, dict[str, np.ndarray]]:
    """Per case: MONAI Dice, IoU and HD95 per region (one value per region channel)."""
    from monai.metrics import DiceMetric, MeanIoU, compute_hausdorff_distance

    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    iou = MeanIoU(include_background=True, reduction="none", ignore_empty=False)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns of the empty regions we test on purpose
        for case, (pred, target) in cases.items():
            p, t = _one_hot(pred, regions), _one_hot(target, regions)
            hd = compute_hausdorff_distance(p, t, include_background=True, percentile=95)
            out[case] = {
                "dice": dice(p, t)[0].numpy(),
                "iou": iou(p, t)[0].numpy(),
                "hd95": hd[0].numpy().astype(np.float64),
            }
    return out


def _sklearn(pred: np.ndarray, target: np.ndarray, labels) -> dict[str, float]:
    """scikit-learn precision and recall of one region on the flattened volume; the
    zero-division value is our empty convention (1 when the region is absent from both)."""
    p, t = np.isin(pred, labels).ravel(), np.isin(target, labels).ravel()
    empty = 1.0 if not p.any() and not t.any() else 0.0
    return {
        "precision": precision_score(t, p, zero_division=empty),
        "recall": recall_score(t, p, zero_division=empty),
    }


@pytest.mark.parametrize("regions, top", [(BRATS_REGIONS, 3), (LITS_REGIONS, 2)])
def test_per_case_scores_equal_monai_and_sklearn_on_whole_volumes(regions, top):
    cases = _cases(regions, top)
    metric = SegmentationMetrics(regions, hd95=True)
    _feed(metric, cases)
    result = metric.compute()
    reference = _monai(cases, regions)
    highest = list(regions).index(next(n for n, lab in regions.items() if lab == (top,)))
    assert reference[13]["dice"][highest] == 1.0 and reference[14]["dice"][highest] == 0.0
    for r, name in enumerate(regions):
        entry = result["regions"][name]
        for case in cases:
            assert entry["dice_cases"][case] == pytest.approx(reference[case]["dice"][r], abs=1e-6)
        per_case = {
            "dice": [reference[c]["dice"][r] for c in cases],
            "iou": [reference[c]["iou"][r] for c in cases],
            "precision": [_sklearn(*cases[c], regions[name])["precision"] for c in cases],
            "recall": [_sklearn(*cases[c], regions[name])["recall"] for c in cases],
        }
        for key, values in per_case.items():
            assert entry[f"{key}_per_case"] == pytest.approx(np.mean(values), abs=1e-6), key
        pred = np.concatenate([p.ravel() for p, _ in cases.values()])
        target = np.concatenate([t.ravel() for _, t in cases.values()])
        everything = _sklearn(pred, target, regions[name])
        for key in ("precision", "recall"):
            assert entry["all_pixels"][key] == pytest.approx(everything[key], abs=1e-12)
        distances = {c: reference[c]["hd95"][r] for c in cases}
        for case, expected in distances.items():
            ours = entry["hd95_cases"][case]
            empty = [not np.isin(v, regions[name]).any() for v in cases[case]]
            if any(empty):  # MONAI: NaN or inf; ours: 0 when both are empty, else inf
                assert not np.isfinite(expected)
                assert ours == (0.0 if all(empty) else math.inf)
            else:
                assert ours == pytest.approx(expected, abs=1e-6), (name, case)
    assert result["cases"] == 5 and result["incomplete_cases"] == []


def test_padding_counts_nowhere_whatever_is_predicted_there():
    # two native sizes, padded to 40-42 px per batch: target -1 there, the prediction
    # random labels
    cases = _cases(LITS_REGIONS, 2, shape=(33, 40)) | {
        case + 10: volumes for case, volumes in _cases(LITS_REGIONS, 2).items()
    }
    padded = SegmentationMetrics(LITS_REGIONS, hd95=True)
    _feed(padded, cases, size=(40, 40))
    reference = _monai(cases, LITS_REGIONS)
    result = padded.compute()
    for r, name in enumerate(LITS_REGIONS):
        entry = result["regions"][name]
        for case in cases:
            assert entry["dice_cases"][case] == pytest.approx(reference[case]["dice"][r], abs=1e-6)
            if np.isfinite(reference[case]["hd95"][r]):
                expected = reference[case]["hd95"][r]
                assert entry["hd95_cases"][case] == pytest.approx(expected, abs=1e-6)
    # by hand: one slice, two valid pixels; padding predicted as every label counts nowhere
    small = SegmentationMetrics({"fg": (1,), "bg": (0,)})
    small.update(
        torch.tensor([[[1, 0, 1, 0, -1]]]), torch.tensor([[[1, 0, -1, -1, -1]]]), torch.tensor([0])
    )
    scores = small.compute()["regions"]
    assert scores["fg"]["all_pixels"] == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}
    assert scores["bg"]["all_pixels"]["dice"] == 1.0


def test_hd95_is_monais_max_of_directed_percentiles():
    # target: one voxel; prediction: that voxel and a far one. Directed 95th percentiles:
    # prediction -> target {0, 9} -> 8.55; target -> prediction {0} -> 0. MONAI takes 8.55;
    # the percentile of the union {0, 9, 0} (medpy) would be 8.1.
    target = np.zeros((3, 12, 12), bool)
    target[1, 1, 1] = True
    pred = target.copy()
    pred[1, 1, 10] = True
    assert hd95(pred, target) == pytest.approx(0.95 * 9, abs=1e-12)
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's own deprecation warning
        reference = compute_hausdorff_distance(
            torch.tensor(pred[None, None]), torch.tensor(target[None, None]), True, percentile=95
        )
    assert hd95(pred, target) == pytest.approx(float(reference), abs=1e-6)


def test_incomplete_cases_lists_volumes_scored_with_missing_slices():
    metric = SegmentationMetrics({"fg": (1,)})
    zeros = torch.zeros(2, 4, 4, dtype=torch.long)
    # case 1 has 3 slices, all seen (slice 2 twice); case 2 has 4, slice 3 never comes;
    # case 5 has 2 slices but slice 0 comes twice and slice 1 never
    for cases, indices, depth in [
        ([1, 2], [0, 0], [3, 4]),
        ([1, 2], [1, 1], [3, 4]),
        ([1, 1], [2, 2], [3, 3]),
        ([2, 5], [2, 0], [4, 2]),
        ([5, 5], [0, 0], [2, 2]),
    ]:
        metric.update(zeros, zeros, torch.tensor(cases), torch.tensor(indices), torch.tensor(depth))
    assert metric.compute()["incomplete_cases"] == [2, 5]
    complete = SegmentationMetrics({"fg": (1,)})
    complete.update(zeros, zeros, torch.tensor([4, 4]), torch.tensor([1, 0]), torch.tensor([2, 2]))
    assert complete.compute()["incomplete_cases"] == []
    plain = SegmentationMetrics({"fg": (1,)})
    plain.update(zeros, zeros, torch.tensor([4, 4]), torch.tensor([1, 0]))
    assert "incomplete_cases" not in plain.compute()
    with pytest.raises(ValueError, match="slice_index"):
        plain.update(zeros, zeros, torch.tensor([4, 4]), slices=torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="case 4: given 2 and 3 slices"):
        complete.update(
            zeros[:1], zeros[:1], torch.tensor([4]), torch.tensor([0]), torch.tensor([3])
        )


def _monai_hd95(pred: np.ndarray, target: np.ndarray, spacing) -> tuple[float, float]:
    """MONAI's HD95 of two 3-D boolean masks with voxel ``spacing`` (mm per axis), twice:
    the 95th percentiles of MONAI's own surface distances (``get_edge_surface_distance``, a
    KD-tree over edge voxels, float32) taken in float64, and ``compute_hausdorff_distance``,
    which takes them with ``torch.quantile`` in float32: its interpolation position, rounded
    to float32, moves the value by up to ~4e-6 relative on a few thousand distances."""
    from monai.metrics import compute_hausdorff_distance
    from monai.metrics.utils import get_edge_surface_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's warnings on empty masks
        _, distances, _ = get_edge_surface_distance(
            torch.tensor(pred), torch.tensor(target), spacing=spacing, symmetric=True
        )
        value = compute_hausdorff_distance(
            torch.tensor(pred[None, None]),
            torch.tensor(target[None, None]),
            include_background=True,
            percentile=95,
            spacing=spacing,
        )
    exact = max(float(np.percentile(d.numpy().astype(np.float64), 95)) for d in distances)
    return exact, float(value)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("spacing", [(2.5, 0.8, 1.1), (1.0, 3.0, 0.45)])
def test_hd95_in_mm_equals_monai_with_anisotropic_spacing(seed, spacing):
    rng = np.random.default_rng(seed)
    shape = [(7, 20, 18), (12, 16, 30), (5, 9, 11)][seed % 3]
    if seed < 3:  # blobs: surfaces with interiors
        pred = ndimage.binary_opening(rng.random(shape) < 0.5)
        target = ndimage.binary_opening(rng.random(shape) < 0.5)
    else:  # small structures away from the border: the crop to their bounding box counts
        pred, target = np.zeros(shape, bool), np.zeros(shape, bool)
        pred[1:3, 2:5, 3:6] = True
        target[2:4, 4:8, 1:4] = True
        target[rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(0, shape[2])] = 1
    exact, reference = _monai_hd95(pred, target, spacing)
    assert hd95(pred, target, spacing) == pytest.approx(exact, rel=1e-6)
    assert hd95(pred, target, spacing) == pytest.approx(reference, rel=1e-5)
    assert hd95(target, pred, spacing) == pytest.approx(exact, rel=1e-6)  # symmetric
    assert hd95(pred, target, (1, 1, 1)) == hd95(pred, target)  # voxels: unit spacing


def test_hd95_refuses_a_spacing_that_does_not_fit():
    mask = np.ones((2, 3, 3), bool)
    for spacing in ((1.0, 1.0), (1.0, 0.0, 1.0), (1.0, float("nan"), 1.0)):
        with pytest.raises(ValueError, match="positive voxel sizes in mm"):
            hd95(mask, mask, spacing)
    with pytest.raises(ValueError, match="masks of shapes"):
        hd95(mask, mask[:1])


def test_per_case_hd95_in_mm_equals_monai_with_each_cases_spacing():
    """Slices fed shuffled and padded; each case's volume (slice, row, column) scored with its
    own spacing, as the shard manifest stores it."""
    cases = _cases(LITS_REGIONS, 2, shape=(33, 40))
    spacing = {c: (1.0 + 0.5 * i, 0.7, 0.9 - 0.1 * i) for i, c in enumerate(cases)}
    metric = SegmentationMetrics(LITS_REGIONS, hd95=True, spacing=spacing)
    _feed(metric, cases, size=(40, 40))
    regions = metric.compute()["regions"]
    checked = 0
    for name, labels in LITS_REGIONS.items():
        for case, (pred, target) in cases.items():
            ours = regions[name]["hd95_cases"][case]
            p, t = np.isin(pred, labels), np.isin(target, labels)
            if p.any() and t.any():
                exact, reference = _monai_hd95(p, t, spacing[case])
                assert ours == pytest.approx(exact, rel=1e-6)
                assert ours == pytest.approx(reference, rel=1e-5)
                checked += 1
    assert checked >= 10
    short = SegmentationMetrics(LITS_REGIONS, hd95=True, spacing={11: (1.0, 1.0, 1.0)})
    _feed(short, cases)
    with pytest.raises(ValueError, match="no voxel spacing given"):
        short.compute()
