"""BraTS 2020 brain-tumour segmentation: 4 MRI channels, labels 0–3, WT/TC/ET regions."""

from __future__ import annotations

from xdtrain.metrics import BRATS_REGIONS
from xdtrain.tasks.base import Task
from xdtrain.tasks.segmentation import RegionScores, forward

TASK = Task(
    name="brats",
    dataset="brats",
    model_kind="unet",
    default_augment="segment",
    primary="dice_WT",
    higher_is_better=True,
    forward=forward,
    metrics=lambda classes, config: RegionScores(BRATS_REGIONS),
    description="BraTS 2020 segmentation, per-case Dice of WT, TC, ET",
)
