"""What BraTS and LiTS share: a U-Net, cross-entropy (+ Dice), per-case region scores.

Training batches hold masks at the network's resolution (resampled with the image). In
evaluation the mask is the one stored in the shards, at its own resolution (240 px BraTS,
512 px LiTS slices), padded with -1 to the largest of the batch: the logits are brought back
to each slice's stored grid (bilinear, then argmax) and scored there, as nnU-Net and MONAI
do, so a structure smaller than a network pixel still counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xdtrain.losses import IGNORE, segmentation_loss
from xdtrain.metrics import SegmentationMetrics
from xdtrain.tasks.base import Metrics, class_weights


def to_mask_grid(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[N, C, h, w]`` logits resampled (bilinear, half-pixel centres) to the grid of
    ``mask`` ``[N, H, W]``, each slice to its own stored size (the part of ``mask`` that is
    not :data:`IGNORE` padding); padding gets logits of 0. Float32."""
    logits = logits.float()
    if logits.shape[-2:] == mask.shape[-2:]:
        return logits
    size = mask.shape[-2:]
    valid = mask != IGNORE
    if bool(valid.all()):
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    out = logits.new_zeros((*logits.shape[:2], *size))
    rows, cols = valid.any(dim=2).sum(dim=1).tolist(), valid.any(dim=1).sum(dim=1).tolist()
    for i, (h, w) in enumerate(zip(rows, cols, strict=True)):
        out[i, :, :h, :w] = F.interpolate(
            logits[i : i + 1], size=(h, w), mode="bilinear", align_corners=False
        )[0]
    return out


def forward(model, batch: dict, config):
    """Loss and label map ``[N, H, W]`` at the mask's grid (-1 on padding)."""
    mask = batch["mask"]
    logits = to_mask_grid(model(batch["image"]), mask)
    loss = segmentation_loss(logits, mask, class_weights(config), config.loss.dice_weight)
    pred = logits.detach().argmax(dim=1).masked_fill_(mask == IGNORE, IGNORE)
    return loss, pred


class RegionScores(Metrics):
    """Per-case (3-D) Dice, IoU, precision, recall per region; Dice over all pixels too.

    HD95 is off: it rebuilds every volume and costs a distance transform per case and
    region, too slow for every epoch's validation; ``xd-eval`` switches it on
    (:meth:`score_distances`) for its per-case table. It lands in ``details`` only, never in
    the flat metrics, so xd-eval's scores still equal the run's own ``test`` row."""

    def __init__(self, regions: dict[str, tuple[int, ...]]):
        self.metric = SegmentationMetrics(regions)
        self.names = list(regions)
        self.details: dict | None = None  # the full result of the last compute()

    def score_distances(self, spacing: dict[int, tuple[float, float, float]]) -> None:
        """Also compute each case's HD95 in mm, ``spacing`` mapping every case id (the index
        into the manifest's ``cases``) to its voxel size (slice, row, column) in mm. Call it
        before the first ``update``: it starts the scores afresh."""
        self.metric = SegmentationMetrics(self.metric.regions, hd95=True, spacing=spacing)

    def update(self, outputs, batch: dict) -> None:
        self.metric.update(outputs, batch["mask"], batch["case"], batch["slice"], batch["slices"])

    def compute(self) -> dict[str, float]:
        result = self.details = self.metric.compute()
        flat: dict[str, float] = {"cases": result["cases"]}
        for name, entry in result["regions"].items():
            for metric in ("dice", "iou", "precision", "recall"):
                flat[f"{metric}_{name}"] = entry[f"{metric}_per_case"]
            flat[f"dice_{name}_all_pixels"] = entry["all_pixels"]["dice"]
        if "incomplete_cases" in result:
            flat["incomplete_cases"] = len(result["incomplete_cases"])
        return flat
