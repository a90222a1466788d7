"""Heads on top of an encoder: the SimCLR projection head."""

from __future__ import annotations

from torch import nn


def projection_head(in_features: int, dims: list[int], sigmoid: bool = False) -> nn.Sequential:
    """SimCLR's MLP: Linear layers of widths ``dims`` with BN + ReLU between them.

    ``[2048, 128]`` on a ResNet-50 is SimCLR's 2048→2048→128; ``[2048, 2048, 128]`` with
    ``sigmoid`` is the study's three-layer head."""
    if not dims:
        raise ValueError("model.projection_dims: at least one layer width")
    layers: list[nn.Module] = []
    width = in_features
    for i, out in enumerate(dims):
        last = i == len(dims) - 1
        layers.append(nn.Linear(width, out, bias=last))
        if not last:
            layers += [nn.BatchNorm1d(out), nn.ReLU(inplace=True)]
        width = out
    if sigmoid:
        layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)
