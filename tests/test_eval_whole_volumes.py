"""Evaluation never selects what it scores by label: a LiTS test volume is scored whole, at
the resolution of its NIfTI file, and its Dice equals MONAI's on that volume.

The prediction is the truth plus a false-positive patch on every slice without liver, the
slices that ``--slices liver`` used to drop from val and test: scored on liver slices only,
this prediction was perfect (Dice 1.0)."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import torch

from xdtrain.config import DataConfig
from xdtrain.data import build_loader
from xdtrain.metrics import LITS_REGIONS
from xdtrain.shards import manifest as manifests
from xdtrain.tasks.segmentation import RegionScores


def lits(folder, batch_size: int) -> DataConfig:
    """LiTS data at 32 px, one thread, on the CPU."""
    return DataConfig(
        dataset="lits",
        shards=str(folder),
        augment="segment",
        image_size=32,
        channels=1,
        batch_size=batch_size,
        workers=1,
        device="cpu",
    )


def test_a_false_positive_on_a_slice_without_liver_counts(raw, packed):
    folder = packed["lits-nifti"]
    cases = manifests.load(folder)["preprocessing"]["cases"]
    config = lits(folder, 5)
    scores = RegionScores(LITS_REGIONS)
    predicted: dict[int, dict[int, np.ndarray]] = {}
    for batch in build_loader(config, "test"):
        pred = batch["mask"].clone()
        for i in range(len(pred)):
            if not (pred[i] > 0).any():
                pred[i, 2:6, 2:6] = 1  # a false-positive patch where there is no liver
            predicted.setdefault(int(batch["case"][i]), {})[int(batch["slice"][i])] = pred[
                i
            ].numpy()
        scores.update(pred, batch)
    result = scores.compute()

    from monai.metrics import DiceMetric

    worse = 0
    for case, slices in predicted.items():
        # the truth straight from the NIfTI file, every slice at its own resolution
        labels = np.asarray(
            nib.load(raw / "lits-nifti" / f"segmentation-{cases[case][7:]}.nii").dataobj
        )
        truth = np.stack([labels[:, :, k].T for k in range(labels.shape[2])])
        assert sorted(slices) == list(range(labels.shape[2]))  # every slice was scored
        pred = np.stack([slices[k] for k in range(labels.shape[2])])
        metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = metric(
                torch.from_numpy(np.isin(pred, (1, 2)))[None, None].float(),
                torch.from_numpy(np.isin(truth, (1, 2)))[None, None].float(),
            ).item()
        ours = scores.details["regions"]["liver"]["dice_cases"][case]
        assert abs(ours - reference) < 1e-6  # MONAI counts in float32
        worse += reference < 1.0
    assert worse == len(predicted) > 0  # every test volume has slices without liver
    assert result["incomplete_cases"] == 0


class FixedLogits(torch.nn.Module):
    """A 'network' whose logits are a fixed smooth function of its input image."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image[:, :1].float()
        return torch.cat([-x, x, 0.5 * x * x - 0.3], dim=1)


def test_evaluation_scores_upsampled_logits_against_the_stored_masks(tmp_path):
    """End to end through the task's forward and ``evaluate``: each slice's logits are
    brought to its stored grid, then argmax, then scored against the stored mask (Dice by
    MONAI on the same arrays); never the mask resampled to the network's size."""
    import dataclasses

    import torch.nn.functional as F
    from helpers import ROOT
    from monai.metrics import DiceMetric
    from test_data_loader import write_sized_shards

    from xdtrain.config import load_config
    from xdtrain.evaluate import evaluate, precision
    from xdtrain.tasks import get_task

    stored = write_sized_shards(tmp_path, [64, 52, 64, 40, 64, 58])
    config = load_config(ROOT / "configs/demo/ft_lits.yaml")
    data = lits(tmp_path, 4)
    config = dataclasses.replace(config, data=data)
    task, model = get_task("lits"), FixedLogits()
    loader = build_loader(data, "val")
    amp = precision("off", torch.device("cpu"))
    metrics = task.metrics(["background", "liver", "tumour"], config)
    evaluate(model, loader, task, [], config, torch.device("cpu"), amp, metrics=metrics)
    ours = metrics.details["regions"]["liver"]["dice_cases"]
    checked = 0
    for batch in build_loader(data, "val"):
        logits = model(batch["image"])
        for i, key in enumerate(batch["keys"]):
            truth = stored[key]
            pred = F.interpolate(logits[i : i + 1], size=truth.shape, mode="bilinear").argmax(1)
            reference = DiceMetric(include_background=True, ignore_empty=False)(
                torch.from_numpy(np.isin(pred[0].numpy(), (1, 2)))[None, None].float(),
                torch.from_numpy(np.isin(truth, (1, 2)))[None, None].float(),
            ).item()
            assert abs(ours[int(batch["case"][i])] - reference) < 1e-6, key
            checked += 1
    assert checked == len(stored)


def test_evaluating_part_of_volumes_says_so(packed, caplog):
    """Scoring the training split (slices thinned by --slices) counts its incomplete cases
    and warns that their scores are not whole-volume; the test split is complete."""
    import dataclasses
    import logging

    from helpers import ROOT

    from xdtrain.config import load_config
    from xdtrain.evaluate import evaluate, precision
    from xdtrain.tasks import get_task

    config = load_config(ROOT / "configs/demo/ft_lits.yaml")
    data = dataclasses.replace(
        config.data, shards=str(packed["lits-nifti"]), image_size=32, workers=1, device="cpu"
    )
    config = dataclasses.replace(config, data=data)
    task, cpu = get_task("lits"), torch.device("cpu")
    amp = precision("off", cpu)
    for split, expected in (("train", True), ("test", False)):
        caplog.clear()
        loader = build_loader(data, split, train=False)
        with caplog.at_level(logging.WARNING, logger="xdtrain.evaluate"):
            result = evaluate(FixedLogits(), loader, task, [], config, cpu, amp)
        assert (result["incomplete_cases"] > 0) == expected
        assert any("part of their volume" in r.getMessage() for r in caplog.records) == expected
