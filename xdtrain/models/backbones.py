"""One interface over the encoder families: torchvision ResNets and any timm backbone.

The classifier, the SimCLR network, the U-Net and the feature analysis ask an encoder the
same questions (how wide its pooled features are, which feature maps it gives at which
reduction, its per-stage embeddings); this module answers them for both families, so that
no network has per-architecture code. An encoder is a plain ``nn.Module`` with its
library's keys; ``encoder.backbone_name`` says which backbone it is (``resnet50``,
``timm/convnext_tiny``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from xdtrain.errors import UserError
from xdtrain.models import encoders, pyramid, timm_encoders
from xdtrain.models.base import Level

RESNET_REDUCTIONS = (2, 4, 8, 16, 32)  # stem, layer1-4


def build(backbone: str, in_channels: int = 3, image_size: int | None = None) -> nn.Module:
    """A randomly initialised encoder: ``resnet18|34|50`` (torchvision) or ``timm/<name>``.

    ``image_size`` (px, None: the model's default) is checked for timm backbones; raises
    :class:`UserError` for an unknown name or a size the model refuses."""
    if timm_encoders.is_timm(backbone):
        encoder = timm_encoders.build_timm_encoder(backbone, in_channels, image_size)
    elif backbone in encoders.ENCODERS:
        encoder = encoders.build_encoder(backbone, in_channels)
    else:
        raise UserError(
            f"model.name: unknown encoder {backbone!r}; choose one of "
            f"{sorted(encoders.ENCODERS)} or timm/<a timm model name>"
        )
    encoder.backbone_name = backbone
    return encoder


def name_of(encoder: nn.Module) -> str:
    return getattr(encoder, "backbone_name", "") or type(encoder).__name__


def is_timm(encoder: nn.Module) -> bool:
    return timm_encoders.is_timm(name_of(encoder))


def pooled_width(encoder: nn.Module) -> int:
    """Channels of ``encoder(x)``, the pooled features a classifier or projection head sees."""
    if is_timm(encoder):
        return timm_encoders.pooled_width(encoder)
    return encoders.ENCODERS[name_of(encoder)]


def feature_levels(encoder: nn.Module) -> tuple[list[int], list[Level]]:
    """Which feature maps a U-Net reads (indices for :func:`feature_maps`) and their
    channels and reductions, finest first."""
    if is_timm(encoder):
        return timm_encoders.feature_levels(encoder, name_of(encoder))
    channels = encoders.STAGE_CHANNELS[name_of(encoder)]
    levels = [Level(*t) for t in zip(encoders.STAGES, channels, RESNET_REDUCTIONS, strict=True)]
    return list(range(len(levels))), levels


def feature_maps(encoder: nn.Module, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
    """``[B, C_l, H / r_l, W / r_l]`` for each of the ``indices`` :func:`feature_levels` gave."""
    if is_timm(encoder):
        return timm_encoders.feature_maps(encoder, x, indices)
    maps = encoders.stage_features(encoder, x)
    return [maps[i] for i in indices]


def unused_by_features(encoder: nn.Module, indices: list[int]) -> list[str]:
    """Encoder parameters :func:`feature_maps` does not use (none for a ResNet)."""
    if is_timm(encoder):
        return timm_encoders.unused_by_features(encoder, indices)
    return []


def stage_names(encoder: nn.Module) -> list[str]:
    """Names of the stages of :func:`stage_embeddings`; the last is the pooled output."""
    if is_timm(encoder):
        return timm_encoders.stage_names(encoder, name_of(encoder))
    return list(encoders.STAGES)


def stage_embeddings(encoder: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """``[B, C_s]`` float32 per stage of :func:`stage_names`: each stage's map averaged over
    space; the last one is the encoder's output, the embedding a classifier head sees."""
    if is_timm(encoder):
        return timm_encoders.stage_embeddings(encoder, x, name_of(encoder))
    return encoders.stage_embeddings(encoder, x)


def unet_stride(encoder: nn.Module) -> int:
    """The U-Net's input must be a multiple of this: its deepest map's reduction (32 for a
    ResNet); for a ViT read through the pyramid, a multiple of both its patch size and the
    pyramid's coarsest level, 1/32 (224 for 14 px patches)."""
    _, levels = feature_levels(encoder)
    if len({level.reduction for level in levels}) == 1:
        return math.lcm(max(pyramid.REDUCTIONS), levels[0].reduction)
    return max(level.reduction for level in levels)
