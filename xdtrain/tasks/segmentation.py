"""What BraTS and LiTS share: a U-Net, cross-entropy (+ Dice), per-case region scores."""

from __future__ import annotations

from xdtrain.losses import segmentation_loss
from xdtrain.metrics import SegmentationMetrics
from xdtrain.tasks.base import Metrics, class_weights


def forward(model, batch: dict, config):
    logits = model(batch["image"])
    loss = segmentation_loss(logits, batch["mask"], class_weights(config), config.loss.dice_weight)
    return loss, logits.detach().argmax(dim=1)


class RegionScores(Metrics):
    """Per-case (3-D) Dice, IoU, precision, recall per region; Dice over all pixels too."""

    def __init__(self, regions: dict[str, tuple[int, ...]]):
        self.metric = SegmentationMetrics(regions)
        self.details: dict | None = None  # the full result of the last compute()

    def update(self, outputs, batch: dict) -> None:
        self.metric.update(outputs, batch["mask"], batch["case"], batch["slice"])

    def compute(self) -> dict[str, float]:
        result = self.details = self.metric.compute()
        flat: dict[str, float] = {"cases": result["cases"]}
        for name, entry in result["regions"].items():
            for metric in ("dice", "iou", "precision", "recall"):
                flat[f"{metric}_{name}"] = entry[f"{metric}_per_case"]
            flat[f"dice_{name}_all_pixels"] = entry["all_pixels"]["dice"]
        return flat
