"""Classifier: the encoder's pooled features, one linear layer."""

from __future__ import annotations

import torch
from torch import nn

from xdtrain.models.base import EncoderModel


class Classifier(EncoderModel):
    """``forward(x)``: ``[B, C_in, H, W]`` -> logits ``[B, num_classes]``. ``features`` is
    the width of ``encoder(x)`` (global average pooling for a ResNet; timm's own pooling
    and pre-logits for a timm backbone: the class token for a ViT)."""

    def __init__(self, encoder: nn.Module, features: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x))
