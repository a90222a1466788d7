"""What a task is: the data it reads, the network it needs, its loss and its metrics.

A task module defines one :class:`Task`; :mod:`xdtrain.tasks` registers it under its name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch


class Metrics:
    """Streaming metrics of one split: ``update`` per batch, ``compute`` to a flat dict.

    ``names``: the classes or regions its per-name scores are keyed by (``auroc/<class>``,
    ``dice_<region>``), so that they can be shown grouped (:mod:`xdtrain.display`)."""

    names: list[str] = []

    def update(self, outputs: Any, batch: dict) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def compute(self) -> dict[str, float]:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class Task:
    """One pretraining method or finetuning target, declared once."""

    name: str
    dataset: str | None  # the data set it trains on; None: any (pretraining)
    model_kind: Literal["simclr", "classifier", "unet"]
    default_augment: str
    primary: str  # validation metric that names the best epoch
    higher_is_better: bool
    # (model, batch, config) -> (loss, outputs for the metrics)
    forward: Callable[[torch.nn.Module, dict, Any], tuple[torch.Tensor, Any]]
    # (class names, config) -> Metrics
    metrics: Callable[[list[str], Any], Metrics]
    description: str = ""

    def inputs(self, batch: dict) -> torch.Tensor:
        return batch["image"]


def class_weights(config) -> torch.Tensor | None:
    weights = config.loss.class_weights
    return None if weights is None else torch.tensor(weights, dtype=torch.float32)
