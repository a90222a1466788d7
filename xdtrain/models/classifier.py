"""ResNet classifier: encoder, global average pooling, one linear layer."""

from __future__ import annotations

import torch
from torch import nn

from xdtrain.models.base import EncoderModel


class Classifier(EncoderModel):
    def __init__(self, encoder: nn.Module, features: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x))
