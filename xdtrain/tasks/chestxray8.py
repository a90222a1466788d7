"""ChestX-ray8: 14 findings and No Finding as 15 independent binary outputs."""

from __future__ import annotations

import numpy as np

from xdtrain.losses import multilabel_bce
from xdtrain.metrics import MultiLabelAUROC
from xdtrain.tasks.base import Metrics, Task, class_weights

FINDINGS = 14  # the 15th output is No Finding, left out of the mean AUROC


def forward(model, batch: dict, config):
    logits = model(batch["image"])
    return multilabel_bce(logits, batch["label"], class_weights(config)), logits.detach()


class AUROC(Metrics):
    def __init__(self, classes: list[str]):
        self.names = list(classes)  # the manifest's 14 findings, then No Finding
        self.metric = MultiLabelAUROC(self.names, findings=FINDINGS)

    def update(self, outputs, batch: dict) -> None:
        self.metric.update(outputs, batch["label"])

    def compute(self) -> dict[str, float]:
        result = self.metric.compute()
        flat = {"auroc_mean": result["mean"], "auroc_mean_15": result["mean_all"]}
        for name, value in result["auroc"].items():
            flat[f"auroc/{name}"] = value
        flat["auroc_classes"] = result["classes_averaged"]
        flat["auroc_left_out"] = result["left_out"]
        return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in flat.items()}


TASK = Task(
    name="chestxray8",
    dataset="chestxray8",
    model_kind="classifier",
    default_augment="study",
    primary="auroc_mean",
    higher_is_better=True,
    forward=forward,
    metrics=lambda classes, config: AUROC(classes),
    description="ChestX-ray8 multi-label findings, AUROC over the 14 findings",
)
