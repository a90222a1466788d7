"""``get_model``: one name, one constructor (timm's ``create_model`` in miniature).

Names: ``resnet18|34|50`` (classifier), ``unet_resnet18|34|50`` (U-Net on a ResNet
encoder), ``simclr_resnet18|34|50`` (encoder and projection head), and ``timm/<name>`` for
any timm backbone (``timm/convnext_tiny``, ``timm/vit_small_patch16_224``), whose network
is the task's: ``kind`` ``classifier``, ``simclr`` or ``unet`` (``unet_timm/<name>`` and
``simclr_timm/<name>`` name it outright). Every model has an ``encoder`` attribute with its
library's keys (torchvision's for a ResNet, timm's otherwise), so :func:`export_encoder`
writes weights that ``torchvision.models.resnet50()`` or ``timm.create_model(name,
num_classes=0)`` loads.
"""

from __future__ import annotations

from torch import nn

from xdtrain.errors import UserError
from xdtrain.models import backbones
from xdtrain.models.classifier import Classifier
from xdtrain.models.encoders import ENCODERS
from xdtrain.models.heads import projection_head
from xdtrain.models.simclr import SimCLRNet
from xdtrain.models.timm_encoders import PREFIX as TIMM
from xdtrain.models.unet import UNet, check_unet_encoder
from xdtrain.models.weights import LoadReport, export_encoder, load_encoder

__all__ = [
    "get_model", "MODELS", "KINDS", "parse_name", "export_encoder", "load_encoder", "LoadReport",
]  # fmt: skip

MODELS = sorted([*ENCODERS, *(f"unet_{e}" for e in ENCODERS), *(f"simclr_{e}" for e in ENCODERS)])
KINDS = ("classifier", "simclr", "unet")
_PREFIXES = {"": "classifier", "unet_": "unet", "simclr_": "simclr"}


def parse_name(name: str) -> tuple[str | None, str]:
    """``(kind, backbone)`` of a model name: ``unet_resnet18`` -> ``("unet", "resnet18")``,
    ``timm/convnext_tiny`` -> ``(None, "timm/convnext_tiny")`` (any kind). Raises
    :class:`UserError` for a name that is neither."""
    head, timm_mark, rest = name.partition(TIMM)
    if timm_mark and head in _PREFIXES and rest:
        return (_PREFIXES[head] if head else None), TIMM + rest
    kind, _, backbone = name.rpartition("_")
    if backbone in ENCODERS and f"{kind}_".lstrip("_") in _PREFIXES:
        return _PREFIXES[f"{kind}_".lstrip("_")], backbone
    raise UserError(
        f"model.name: unknown model {name!r}; choose one of {MODELS} or timm/<a timm model name>"
    )


def get_model(
    name: str,
    num_classes: int | None = None,
    in_channels: int = 3,
    encoder_weights: str | None = None,
    frozen_encoder: bool = False,
    projection_dims: list[int] | tuple[int, ...] = (2048, 128),
    projection_sigmoid: bool = False,
    kind: str | None = None,
    image_size: int | None = None,
) -> nn.Module:
    """Build model ``name`` as a ``kind`` network (None: the name's, a classifier for
    ``timm/<name>``); load ``encoder_weights`` into its encoder; freeze it if asked.

    ``image_size`` (px; None: the model's default) is checked before any data is read: a
    ViT's patch size, a fixed-size model's size, a U-Net's multiple of 32. The load report
    (keys loaded, missing, unexpected, adapted) is kept as ``model.encoder_load_report``.
    Raises :class:`UserError` for an unknown name, a kind the name contradicts, a size the
    model refuses, or weights that do not fit."""
    named, backbone = parse_name(name)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind {kind!r}: one of {KINDS}")
    if named and kind and named != kind:
        raise UserError(f"model.name: {name!r} is a {named} model, not a {kind}")
    kind = named or kind or "classifier"
    encoder = backbones.build(backbone, in_channels, image_size)
    width = backbones.pooled_width(encoder)
    if kind == "simclr":
        model = SimCLRNet(
            encoder, projection_head(width, list(projection_dims), projection_sigmoid)
        )
    else:
        if not num_classes or num_classes < 1:
            raise UserError(f"model.num_classes: {name} needs a number of classes")
        if kind == "unet":
            if image_size:
                check_unet_encoder(encoder, image_size)
            model = UNet(encoder, num_classes)
        else:
            model = Classifier(encoder, width, num_classes)
    model.encoder_load_report = None
    if encoder_weights:
        model.encoder_load_report = load_encoder(model.encoder, encoder_weights)
    if frozen_encoder:
        model.freeze_encoder()
    return model
