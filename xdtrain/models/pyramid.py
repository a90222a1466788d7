"""A multi-level adapter for single-stride (ViT-style) encoders, so a U-Net can use them.

A ViT gives every block's tokens at one reduction, its patch size (1/16). Following ViTDet's
simple feature pyramid (Li et al. 2022, "Exploring Plain Vision Transformer Backbones for
Object Detection", sec. 3) and UNETR's use of several depths (Hatamizadeh et al. 2022), the
maps of blocks spread over the depth (shallow to deep) become the levels 1/4, 1/8, 1/16 and
1/32 of the input: each is projected by a 1x1 convolution at token resolution, resampled to
its level's size (bilinear upsampling, or area averaging when coarser) and refined by a
3x3 convolution, both with batch norm and ReLU. The U-Net's decoder then sees the same kind
of pyramid a ResNet or ConvNeXt gives. Any patch size works if the input is a multiple of
both the patch size and 32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

REDUCTIONS = (4, 8, 16, 32)  # the levels made, finest first


def _conv_bn_relu(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def level_widths(channels: int, stride: int) -> tuple[int, ...]:
    """Channels of each level: the tokens' width scaled by how much finer the level is than
    the tokens (a ViT-S's 384 at 1/16 gives 96, 192, 384 and 384), at least 16."""
    return tuple(max(16, min(channels, channels * r // stride)) for r in REDUCTIONS)


class SimplePyramid(nn.Module):
    """``forward(maps, size)``: ``maps`` are ``len(REDUCTIONS)`` token maps ``[B, channels,
    H / stride, W / stride]`` (shallow to deep; fewer are reused from the deepest), ``size``
    the input's ``(H, W)``; returns ``[B, w_l, H / r_l, W / r_l]`` for ``r_l`` in
    :data:`REDUCTIONS` with ``w_l`` from :func:`level_widths`."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.widths = level_widths(channels, stride)
        self.project = nn.ModuleList(_conv_bn_relu(channels, w, 1) for w in self.widths)
        self.refine = nn.ModuleList(_conv_bn_relu(w, w, 3) for w in self.widths)

    def forward(self, maps: list[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
        out = []
        for i, reduction in enumerate(REDUCTIONS):
            x = self.project[i](maps[min(i, len(maps) - 1)])
            target = (size[0] // reduction, size[1] // reduction)
            if target[0] > x.shape[-2]:
                x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
            elif target[0] < x.shape[-2]:
                x = F.adaptive_avg_pool2d(x, target)
            out.append(self.refine[i](x))
        return out
