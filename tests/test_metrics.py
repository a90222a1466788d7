"""xdtrain.metrics against scikit-learn and hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from xdtrain.metrics import (
    BRATS_REGIONS,
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
    logits, labels, scores, targets, pred, mask, cases = data
    accuracy, auroc = TopKAccuracy((1,)), MultiLabelAUROC(["a", "b"])
    seg = SegmentationMetrics({"fg": (1,)})
    part = slice(rank, None, world)  # interleaved: the slices of a case land on both ranks
    accuracy.update(logits[part], labels[part])
    auroc.update(scores[part], targets[part])
    seg.update(pred[part], mask[part], cases[part])
    out[rank] = (accuracy.compute(), auroc.compute(), seg.compute())
    dist.destroy_process_group()


def test_metrics_reduce_across_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(4)
    logits, labels = torch.randn(20, 5), torch.randint(0, 5, (20,))
    scores, targets = torch.randn(20, 2), torch.randint(0, 2, (20, 2))
    pred, mask = torch.randint(0, 2, (20, 6, 6)), torch.randint(0, 2, (20, 6, 6))
    cases = torch.arange(20) // 5
    data = (logits, labels, scores, targets, pred, mask, cases)
    out = mp.Manager().dict()
    mp.spawn(_ranked_worker, args=(2, str(tmp_path / "init"), data, out), nprocs=2, join=True)
    accuracy, auroc = TopKAccuracy((1,)), MultiLabelAUROC(["a", "b"])
    seg = SegmentationMetrics({"fg": (1,)})
    accuracy.update(logits, labels)
    auroc.update(scores, targets)
    seg.update(pred, mask, cases)
    single = (accuracy.compute(), auroc.compute(), seg.compute())
    for rank in (0, 1):
        assert out[rank][0] == pytest.approx(single[0])
        assert out[rank][1]["auroc"] == pytest.approx(single[1]["auroc"])
        assert out[rank][2]["regions"]["fg"]["dice_cases"] == pytest.approx(
            single[2]["regions"]["fg"]["dice_cases"]
        )
