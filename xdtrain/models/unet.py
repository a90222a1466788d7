"""U-Net on any encoder, with the study's decoder.

The decoder doubles the size of the deepest feature map until it is back at the input's:
each upsampling block is a 2x2 transposed convolution (stride 2) followed by two 3x3
convolutions with batch norm and ReLU, and concatenates the encoder's feature map of the
size it reaches when the encoder has one. A 1x1 convolution gives the class logits.

- **ResNet** (maps at 1/2 ... 1/32): five blocks, skips at 1/16, 1/8, 1/4 and 1/2, the
  study's network.
- **Multi-stride timm backbones** (ConvNeXt: 1/4 ... 1/32; EfficientNet, timm ResNets:
  1/2 ... 1/32): the deepest map of each reduction, from ``forward_intermediates``; a level
  the backbone lacks (ConvNeXt's 1/2) is a block without skip.
- **Single-stride (ViT-style) backbones**: the maps of four blocks spread over the depth,
  made into 1/4 ... 1/32 levels by :class:`xdtrain.models.pyramid.SimplePyramid`.

Backbones whose convolutions are not padded (Inception, MobileViT) give maps a pixel or two
off ``H / r``: the upsampled map is then resized (bilinear) to its skip's size, and the last
one to the input's; the maps of padded backbones (all above) fit exactly and are never
resized.

Encoder parameters the feature maps never reach (a ViT's final norm, ConvNeXt's head norm)
are frozen, so DDP finds no unused parameter and ``encoder.pt`` keeps all of timm's keys.
Inputs must be a multiple of :func:`xdtrain.models.backbones.unet_stride` (32) pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xdtrain.errors import UserError
from xdtrain.models import backbones
from xdtrain.models.base import EncoderModel
from xdtrain.models.pyramid import REDUCTIONS, SimplePyramid

# channels of the decoder block that brings the map to 1/16, 1/8, 1/4, 1/2 and 1/1
DECODER_CHANNELS = {16: 256, 8: 128, 4: 64, 2: 32, 1: 16}


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
            if x.shape[-2:] != skip.shape[-2:]:  # a backbone with unpadded convolutions
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class UNet(EncoderModel):
    """``forward(x)``: ``[B, C_in, H, W]`` float -> logits ``[B, num_classes, H, W]``; raises
    ``ValueError`` when ``H`` or ``W`` is not a multiple of :attr:`stride`."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.indices, levels = backbones.feature_levels(encoder)
        for name in backbones.unused_by_features(encoder, self.indices):
            encoder.get_parameter(name).requires_grad_(False)
        self.adapter = None
        if len({level.reduction for level in levels}) == 1:  # one stride: a ViT
            self.adapter = SimplePyramid(levels[-1].channels, levels[-1].reduction)
            reductions, widths = REDUCTIONS, self.adapter.widths
        else:
            reductions = [level.reduction for level in levels]
            widths = [level.channels for level in levels]
        self.reductions = tuple(reductions)
        self.deepest = max(reductions)
        self.stride = backbones.unet_stride(encoder)  # inputs are a multiple of it
        skips = dict(zip(reductions, widths, strict=True))
        blocks, width, reduction = [], skips[self.deepest], self.deepest
        while reduction > 1:
            reduction //= 2
            out = DECODER_CHANNELS.get(reduction, 256)
            blocks.append(UpBlock(width, skips.get(reduction, 0), out))
            width = out
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(width, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[-2:])
        if size[0] % self.stride or size[1] % self.stride:
            raise ValueError(f"U-Net input {size} is not a multiple of {self.stride} px")
        maps = backbones.feature_maps(self.encoder, x, self.indices)
        if self.adapter is not None:
            maps = self.adapter(maps, size)
        by_reduction = dict(zip(self.reductions, maps, strict=True))
        y, reduction = by_reduction[self.deepest], self.deepest
        for block in self.decoder:
            reduction //= 2
            y = block(y, by_reduction.get(reduction))
        if y.shape[-2:] != x.shape[-2:]:
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(y)


def check_unet_encoder(encoder: nn.Module, image_size: int) -> None:
    """One line if a U-Net on ``encoder`` cannot take ``image_size`` px inputs."""
    check_unet_size(backbones.name_of(encoder), backbones.unet_stride(encoder), image_size)


def check_unet_size(backbone: str, stride: int, image_size: int) -> None:
    """:class:`UserError` unless ``image_size`` is a multiple of ``stride``."""
    if image_size % stride:
        raise UserError(
            f"data.image_size {image_size}: a U-Net on {backbone} needs a multiple of "
            f"{stride} px (e.g. {max(stride, round(image_size / stride) * stride)})"
        )
