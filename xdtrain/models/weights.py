"""Encoder weights in and out, in plain torchvision ResNet keys.

Loading accepts an ``encoder.pt`` written by xdtrain, a full xdtrain checkpoint (its
``model`` entry) or a torchvision ResNet state dict, with or without DDP's ``module.``
prefix. It reports missing and unexpected keys and fails when no key matched, since a
silent mismatch (the study's ``strict=False``) trains from scratch while claiming otherwise.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from xdtrain.errors import UserError
from xdtrain.fileio import atomic_write
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
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip, a pickle with arbitrary objects, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a readable weights file ({first[:200]})") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]  # a full xdtrain checkpoint
    elif isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"{path}: holds no state dict of tensors")
    return data


def encoder_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain torchvision encoder keys: prefixes of wrappers removed, classifier and heads
    dropped when the state is a whole network."""
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


def load_encoder(encoder: nn.Module, path: str | Path) -> LoadReport:
    """Load encoder weights from ``path`` into ``encoder`` (see the module docstring)."""
    state = encoder_keys(read_state_dict(path))
    own = encoder.state_dict()
    report = LoadReport(str(path))
    usable = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        if key == "conv1.weight" and value.shape[1] != own[key].shape[1]:
            value = adapt_first_conv(value, own[key].shape[1])
            report.adapted.append(key)
        if value.shape != own[key].shape:
            raise UserError(
                f"{path}: {key} has shape {tuple(value.shape)}, the model needs "
                f"{tuple(own[key].shape)}; is it the same ResNet depth as model.name?"
            )
        usable[key] = value
    if not usable:
        sample = ", ".join(list(state)[:3]) or "none"
        raise UserError(
            f"{path}: no key matches the encoder (first keys: {sample}); expected torchvision "
            "ResNet keys such as conv1.weight, layer1.0.conv1.weight"
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
    """Write the encoder of ``model`` with plain torchvision keys (atomically).

    ``torchvision.models.resnet50().load_state_dict(torch.load(path), strict=False)`` then
    reports only ``fc.weight`` and ``fc.bias`` as missing."""
    encoder = getattr(model, "encoder", model)
    state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return atomic_write(Path(path), buffer.getvalue())
