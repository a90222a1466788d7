"""``get_model``: one name, one constructor (timm's ``create_model`` in miniature).

Names: ``resnet18|34|50`` (classifier), ``unet_resnet18|34|50`` (U-Net on a ResNet
encoder), ``simclr_resnet18|34|50`` (encoder and projection head). Every model has an
``encoder`` attribute, a torchvision ResNet trunk with torchvision's keys, so
:func:`export_encoder` writes weights that ``torchvision.models.resnet50()`` loads.
"""

from __future__ import annotations

from torch import nn

from xdtrain.errors import UserError
from xdtrain.models.classifier import Classifier
from xdtrain.models.encoders import ENCODERS, build_encoder
from xdtrain.models.heads import projection_head
from xdtrain.models.simclr import SimCLRNet
from xdtrain.models.unet import UNet
from xdtrain.models.weights import LoadReport, export_encoder, load_encoder

__all__ = ["get_model", "MODELS", "export_encoder", "load_encoder", "LoadReport"]

MODELS = sorted([*ENCODERS, *(f"unet_{e}" for e in ENCODERS), *(f"simclr_{e}" for e in ENCODERS)])


def get_model(
    name: str,
    num_classes: int | None = None,
    in_channels: int = 3,
    encoder_weights: str | None = None,
    frozen_encoder: bool = False,
    projection_dims: list[int] | tuple[int, ...] = (2048, 128),
    projection_sigmoid: bool = False,
) -> nn.Module:
    """Build model ``name``; load ``encoder_weights`` into its encoder; freeze it if asked.

    The load report (keys loaded, missing, unexpected, adapted) is kept as
    ``model.encoder_load_report``."""
    kind, _, encoder_name = name.rpartition("_")
    if encoder_name not in ENCODERS or kind not in ("", "unet", "simclr"):
        raise UserError(f"model.name: unknown model {name!r}; choose one of {MODELS}")
    encoder = build_encoder(encoder_name, in_channels)
    width = ENCODERS[encoder_name]
    if kind == "simclr":
        model = SimCLRNet(
            encoder, projection_head(width, list(projection_dims), projection_sigmoid)
        )
    else:
        if not num_classes or num_classes < 1:
            raise UserError(f"model.num_classes: {name} needs a number of classes")
        if kind == "unet":
            model = UNet(encoder, encoder_name, num_classes)
        else:
            model = Classifier(encoder, width, num_classes)
    model.encoder_load_report = None
    if encoder_weights:
        model.encoder_load_report = load_encoder(model.encoder, encoder_weights)
    if frozen_encoder:
        model.freeze_encoder()
    return model
