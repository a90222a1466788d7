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


def test_a_false_positive_on_a_slice_without_liver_counts(raw, packed):
    folder = packed["lits-nifti"]
    cases = manifests.load(folder)["preprocessing"]["cases"]
    config = DataConfig(
        dataset="lits",
        shards=str(folder),
        augment="segment",
        image_size=32,
        channels=1,
        batch_size=5,
        workers=1,
        device="cpu",
    )
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
