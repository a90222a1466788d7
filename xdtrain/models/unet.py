"""U-Net on a ResNet encoder, with the study's decoder.

Five upsampling blocks, each a 2×2 transposed convolution (stride 2) followed by two 3×3
convolutions with batch norm and ReLU; the first four concatenate the encoder's feature map
of the same size (skips at 1/16, 1/8, 1/4 and 1/2 of the input), the fifth returns to full
size; a 1×1 convolution gives the class logits. Inputs must be multiples of 32 pixels.
"""

from __future__ import annotations

import torch
from torch import nn

from xdtrain.models.base import EncoderModel
from xdtrain.models.encoders import STAGE_CHANNELS, stage_features

DECODER_CHANNELS = (256, 128, 64, 32, 16)


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = nn.Sequential(
            nn.Conv2d(out_channels + skip_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class UNet(EncoderModel):
    def __init__(
        self,
        encoder: nn.Module,
        encoder_name: str,
        num_classes: int,
        decoder_channels: tuple[int, ...] = DECODER_CHANNELS,
    ):
        super().__init__()
        self.encoder = encoder
        stem, c1, c2, c3, c4 = STAGE_CHANNELS[encoder_name]
        skips = (c3, c2, c1, stem, 0)
        blocks, width = [], c4
        for skip, out in zip(skips, decoder_channels, strict=True):
            blocks.append(UpBlock(width, skip, out))
            width = out
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(width, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"U-Net input {tuple(x.shape[-2:])} is not a multiple of 32 px")
        stem, x1, x2, x3, x4 = stage_features(self.encoder, x)
        y = x4
        for block, skip in zip(self.decoder, (x3, x2, x1, stem, None), strict=True):
            y = block(y, skip)
        return self.head(y)
