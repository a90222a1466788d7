"""Encoder weights in and out, in the encoder library's own keys.

Keys are torchvision's for a ResNet and timm's for a ``timm/<name>`` backbone. Loading
accepts an ``encoder.pt`` written by xdtrain, a full xdtrain checkpoint (its ``model``
entry), a torchvision state dict or a timm checkpoint (``.pth``/``.bin``, or
``.safetensors`` as the Hugging Face hub stores them), with or without DDP's ``module.``
prefix; a classifier in the file (``fc.*``, timm's ``head.*``) is left out. Weights of
another shape are adapted where the library has a rule: the first convolution to other
input channels, a ViT's position embeddings to another patch grid. It reports missing and
unexpected keys and fails when no key matched, since a silent mismatch (the study's
``strict=False``) trains from scratch while claiming otherwise.
"""

from __future__ import annotations

import argparse
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from xdtrain.errors import UserError, first_line
from xdtrain.fileio import atomic_write
from xdtrain.models import backbones, timm_encoders
from xdtrain.models.base import EncoderModel
from xdtrain.models.encoders import adapt_first_conv

log = logging.getLogger("xdtrain.models")
ENCODER_PREFIXES = ("module.", "encoder.", "backbone.")


@dataclass
class LoadReport:
    """What happened when encoder weights were loaded."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors in ``path``; one-line errors for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such weights file; check model.encoder_weights")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # noqa: PLC0415

            data = load_file(path, device="cpu")
        else:
            # timm's train.py stores its arguments (an argparse.Namespace) beside the weights
            with torch.serialization.safe_globals([argparse.Namespace]):
                data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip, a pickle with arbitrary objects, ...
        raise UserError(f"{path}: not a readable weights file ({first_line(exc)})") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]  # a full xdtrain checkpoint
    elif isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]  # a timm or Lightning training checkpoint (not its EMA)
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"{path}: holds no state dict of tensors")
    return data


def encoder_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain encoder keys: prefixes of wrappers removed, heads and decoders dropped when
    the state is a whole xdtrain network, a torchvision classifier (``fc.*``) dropped."""
    out = {}
    has_encoder = any(k.removeprefix("module.").startswith("encoder.") for k in state)
    for key, value in state.items():
        key = key.removeprefix("module.")
        if has_encoder:
            if not key.startswith("encoder."):
                continue  # heads, decoders
            key = key.removeprefix("encoder.")
        key = key.removeprefix("backbone.")
        if key.startswith("fc."):
            continue
        out[key] = value
    return out


def plain_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys with only the wrappers' prefixes (``module.``, ``backbone.``) removed."""
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


def matching_keys(state: dict[str, torch.Tensor], own: dict) -> dict[str, torch.Tensor]:
    """``state`` read as a whole xdtrain network (:func:`encoder_keys`) or as a bare
    encoder (:func:`plain_keys`), whichever names more of the encoder's ``own`` keys: a timm
    backbone may itself hold a module named ``encoder`` (Qwen3-ViT), whose file a
    whole-network reading would strip."""
    whole, bare = encoder_keys(state), plain_keys(state)
    return max((whole, bare), key=lambda keys: sum(k in own for k in keys))


def load_encoder(encoder: nn.Module, path: str | Path) -> LoadReport:
    """Load encoder weights from ``path`` into ``encoder`` (see the module docstring)."""
    own = encoder.state_dict()
    state = matching_keys(read_state_dict(path), own)
    timm = backbones.is_timm(encoder)
    report = LoadReport(str(path))
    if timm:
        before, state = state, timm_encoders.timm_filter(encoder, state)
        report.adapted += [
            k for k, v in state.items() if k in before and before[k].shape != v.shape
        ]
    classifier = timm_encoders.classifier_prefixes(encoder) if timm else ()
    usable = {}
    for key, value in state.items():
        if key not in own:
            if not key.startswith(classifier):  # a classifier the encoder lacks by design
                report.unexpected.append(key)
            continue
        if value.shape != own[key].shape:
            if timm:
                adapted = timm_encoders.adapt(encoder, key, value, own[key].shape)
            elif key == "conv1.weight" and value.shape[0] == own[key].shape[0]:
                adapted = adapt_first_conv(value, own[key].shape[1])
            else:
                adapted = None
            if adapted is None or adapted.shape != own[key].shape:
                raise UserError(
                    f"{path}: {key} has shape {tuple(value.shape)}, the model needs "
                    f"{tuple(own[key].shape)}; is it the same architecture as model.name "
                    f"({backbones.name_of(encoder)}), built for the same image size?"
                )
            value = adapted
            if key not in report.adapted:
                report.adapted.append(key)
        usable[key] = value
    if not usable:
        sample = ", ".join(list(state)[:3]) or "none"
        expected = ", ".join(list(own)[:2])
        raise UserError(
            f"{path}: no key matches the {backbones.name_of(encoder)} encoder (first keys: "
            f"{sample}); expected keys such as {expected}"
        )
    encoder.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    report.missing = sorted(k for k in own if k not in usable)
    if report.missing or report.unexpected:
        log.warning(
            "%s: loaded %d encoder tensors; missing %d (%s), unexpected %d (%s)",
            path,
            len(report.loaded),
            len(report.missing),
            ", ".join(report.missing[:5]),
            len(report.unexpected),
            ", ".join(report.unexpected[:5]),
        )
    return report


def export_encoder(model: nn.Module, path: str | Path) -> Path:
    """Write the encoder of ``model`` with its library's keys (atomically).

    ``torchvision.models.resnet50().load_state_dict(torch.load(path), strict=False)`` then
    reports only ``fc.weight`` and ``fc.bias`` as missing; for ``timm/<name>``,
    ``timm.create_model(name, num_classes=0, in_chans=C).load_state_dict(torch.load(path))``
    loads every key (add ``img_size`` for a fixed-size model trained at another size)."""
    encoder = model.encoder if isinstance(model, EncoderModel) else model
    state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    if not backbones.is_timm(encoder):
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return atomic_write(Path(path), buffer.getvalue())
