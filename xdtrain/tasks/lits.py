"""LiTS 2017 liver and tumour segmentation: 1 CT channel, labels 0–2."""

from __future__ import annotations

from xdtrain.metrics import LITS_REGIONS
from xdtrain.tasks.base import Task
from xdtrain.tasks.segmentation import RegionScores, forward

TASK = Task(
    name="lits",
    dataset="lits",
    model_kind="unet",
    default_augment="segment",
    primary="dice_liver",
    higher_is_better=True,
    forward=forward,
    metrics=lambda classes, config: RegionScores(LITS_REGIONS),
    description="LiTS segmentation, per-case Dice of liver and tumour",
)
