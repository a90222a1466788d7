"""ImageNet-1k classification (or the ImageNet-100/10 subsets packed with --classes)."""

from __future__ import annotations

import torch.nn.functional as F

from xdtrain.metrics import TopKAccuracy
from xdtrain.tasks.base import Metrics, Task, class_weights


def forward(model, batch: dict, config):
    logits = model(batch["image"])
    weight = class_weights(config)
    weight = None if weight is None else weight.to(logits.device)
    return F.cross_entropy(logits.float(), batch["label"], weight=weight), logits.detach()


class Accuracy(Metrics):
    def __init__(self, classes: list[str]):
        self.metric = TopKAccuracy((1, 5) if len(classes) > 5 else (1,))

    def update(self, outputs, batch: dict) -> None:
        self.metric.update(outputs, batch["label"])

    def compute(self) -> dict[str, float]:
        return self.metric.compute()


TASK = Task(
    name="imagenet",
    dataset="imagenet",
    model_kind="classifier",
    default_augment="standard",
    primary="top1",
    higher_is_better=True,
    forward=forward,
    metrics=lambda classes, config: Accuracy(classes),
    description="ImageNet classification, top-1/top-5 accuracy",
)
