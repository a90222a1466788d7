"""What every xdtrain network shares: an ``encoder`` that can be frozen for linear evaluation."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Level:
    """One feature map an encoder gives: its stage's name, channels and reduction (input
    size / map size)."""

    name: str
    channels: int
    reduction: int


class EncoderModel(nn.Module):
    """A network built on ``self.encoder``.

    ``freeze_encoder()`` stops gradients into the encoder *and* keeps its batch-norm layers
    in eval mode whatever ``train()`` is called with, so their running statistics never
    move (the study's linear evaluation let them drift)."""

    encoder: nn.Module
    frozen_encoder: bool = False

    def freeze_encoder(self) -> None:
        self.frozen_encoder = True
        for param in self.encoder.parameters():
            param.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_encoder:
            self.encoder.eval()
        return self
