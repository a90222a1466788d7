"""ResNet encoders: torchvision ResNets without their classifier, keys unchanged.

An encoder is a plain ``torchvision.models.ResNet`` whose ``fc`` is an identity, so its
state dict has exactly torchvision's keys minus ``fc.*``: weights exported from xdtrain load
into ``torchvision.models.resnet50()`` and the other way round.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

ENCODERS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}  # name -> feature width
# the encoder's stages, in the order of :func:`stage_features`
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
# blocks per stage (layer1-4) and block kind: how a state dict tells its depth
_DEPTHS = {"resnet18": ((2, 2, 2, 2), False), "resnet34": ((3, 4, 6, 3), False)}
_DEPTHS["resnet50"] = ((3, 4, 6, 3), True)
# channels of the feature maps at 1/2 (stem), 1/4, 1/8, 1/16 and 1/32 of the input
STAGE_CHANNELS = {
    "resnet18": (64, 64, 128, 256, 512),
    "resnet34": (64, 64, 128, 256, 512),
    "resnet50": (64, 256, 512, 1024, 2048),
}


def build_encoder(name: str, in_channels: int = 3) -> torchvision.models.ResNet:
    """A randomly initialised ResNet trunk (``fc`` = identity) taking ``in_channels``."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}")
    encoder = getattr(torchvision.models, name)(weights=None)
    encoder.fc = nn.Identity()
    if in_channels != 3:
        old = encoder.conv1
        encoder.conv1 = nn.Conv2d(
            in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False
        )
        nn.init.kaiming_normal_(encoder.conv1.weight, mode="fan_out", nonlinearity="relu")
    return encoder


def stage_features(encoder: torchvision.models.ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Feature maps at 1/2, 1/4, 1/8, 1/16 and 1/32 of the input size (for the U-Net)."""
    stem = encoder.relu(encoder.bn1(encoder.conv1(x)))
    x1 = encoder.layer1(encoder.maxpool(stem))
    x2 = encoder.layer2(x1)
    x3 = encoder.layer3(x2)
    x4 = encoder.layer4(x3)
    return [stem, x1, x2, x3, x4]


def stage_embeddings(encoder: torchvision.models.ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Each stage's feature map averaged over space: ``[B, C_s]`` per stage of :data:`STAGES`
    (the last one is the encoder's output, the embedding a classifier head sees)."""
    return [f.float().mean(dim=(2, 3)) for f in stage_features(encoder, x)]


def encoder_name_of(state: dict[str, torch.Tensor]) -> str | None:
    """Which of :data:`ENCODERS` a state dict with torchvision keys is (by its blocks per
    stage and whether they are bottlenecks), or None."""
    blocks = []
    for layer in range(1, 5):
        prefix = f"layer{layer}."
        indices = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
        blocks.append(max(indices) + 1 if indices else 0)
    bottleneck = "layer1.0.conv3.weight" in state
    for name, (depths, deep) in _DEPTHS.items():
        if tuple(blocks) == depths and bottleneck == deep:
            return name
    return None


def adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Pretrained ``conv1`` weights for ``in_channels`` inputs.

    The summed response over the source channels is spread evenly over the new ones, so an
    image whose channels are all equal gives the same activation as before: RGB -> 1 channel
    is the sum over RGB, RGB -> 4 channels repeats 3/4 of the RGB mean."""
    if weight.shape[1] == in_channels:
        return weight
    total = weight.sum(dim=1, keepdim=True)
    return total.repeat(1, in_channels, 1, 1) / in_channels
