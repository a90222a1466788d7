"""SimCLR pretraining: NT-Xent between the views of each image."""

from __future__ import annotations

import itertools

import torch

from xdtrain.distributed import sum_tensor
from xdtrain.losses import nt_xent
from xdtrain.tasks.base import Metrics, Task


def forward(model, batch: dict, config):
    views = batch["views"]
    z = model(torch.cat(views))
    parts = z.chunk(len(views))
    pairs = list(itertools.combinations(range(len(views)), 2))
    loss = sum(
        nt_xent(parts[i], parts[j], config.loss.temperature, config.loss.gather) for i, j in pairs
    ) / len(pairs)
    return loss, (parts[0].detach(), parts[1].detach())


class PairMetrics(Metrics):
    """Validation NT-Xent and how often a view's nearest neighbour is its partner view."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.loss_sum = self.hits = self.count = 0.0

    def update(self, outputs, batch: dict) -> None:
        z1, z2 = outputs
        n = z1.shape[0]
        if n < 2:
            return
        self.loss_sum += nt_xent(z1, z2, self.temperature).item() * n
        z1n = torch.nn.functional.normalize(z1.float(), dim=1)
        z2n = torch.nn.functional.normalize(z2.float(), dim=1)
        nearest = (z1n @ z2n.T).argmax(dim=1)
        self.hits += (nearest == torch.arange(n, device=z1.device)).sum().item()
        self.count += n

    def compute(self) -> dict[str, float]:
        totals = torch.tensor([self.loss_sum, self.hits, self.count], dtype=torch.float64)
        totals = sum_tensor(totals)
        loss_sum, hits, count = totals.tolist()
        return {"loss": loss_sum / max(count, 1), "pair_top1": hits / max(count, 1)}


TASK = Task(
    name="simclr",
    dataset=None,
    model_kind="simclr",
    default_augment="simclr",
    primary="loss",
    higher_is_better=False,
    forward=forward,
    metrics=lambda classes, config: PairMetrics(config.loss.temperature),
    description="SimCLR pretraining (NT-Xent, per-GPU local loss unless loss.gather)",
)
