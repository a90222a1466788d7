"""SimCLR network: encoder and projection head; the loss sees the projections."""

from __future__ import annotations

import torch
from torch import nn

from xdtrain.models.base import EncoderModel


class SimCLRNet(EncoderModel):
    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))
