"""Encoders from timm: any ``timm`` backbone, created without weights, keys unchanged.

``model.name: timm/<name>`` (``timm/convnext_tiny``, ``timm/vit_small_patch16_224``,
``timm/efficientnet_b0``, ``timm/resnet50d``, a name with a pretrained tag such as
``timm/vit_small_patch16_224.augreg_in21k``) is ``timm.create_model(name, pretrained=False,
num_classes=0, in_chans=C)``: the backbone with its pooled features as output and no
classifier, so its state dict has exactly timm's keys. Nothing is downloaded: weights come
only from ``model.encoder_weights`` (:mod:`xdtrain.models.weights`).

Input size: backbones whose constructor takes ``dynamic_img_size`` (ViT, DeiT, EVA, ...)
are built with it, so their position embeddings keep the shape of timm's default size and
are interpolated to any image size that is a multiple of the patch size; other fixed-size
backbones (``fixed_input_size`` in timm's config) are built with ``img_size`` = the data's
size. Every encoder is tried once on a zero image of the configured size when it is built,
so an image size the model refuses stops the run with one line before any data is read.

Feature maps (for the U-Net) come from timm's ``forward_intermediates``, the same maps
``features_only=True`` returns, taken from the unchanged backbone so its keys stay timm's.
"""

from __future__ import annotations

import copy
import inspect
import math
import sys

import torch
from torch import nn

from xdtrain.errors import UserError, first_line
from xdtrain.models.base import Level

PREFIX = "timm/"
# ViT-style backbones (one stride): blocks the U-Net's pyramid reads, as shares of the depth
# (UNETR and ViTDet read the 3rd, 6th, 9th and 12th of 12 blocks)
PYRAMID_BLOCKS = 4


def is_timm(name: str) -> bool:
    return name.startswith(PREFIX)


def _timm():
    import timm  # noqa: PLC0415  (several seconds to import: only when a timm name is used)

    return timm


def _constructor_takes(model: nn.Module, argument: str) -> bool:
    return argument in inspect.signature(type(model).__init__).parameters


def build_timm_encoder(name: str, in_channels: int = 3, image_size: int | None = None) -> nn.Module:
    """``timm/<name>`` without weights and classifier, for ``in_channels`` inputs of
    ``image_size`` px (None: timm's default size), tried once on a zero image.

    Raises :class:`UserError` for a name timm does not know or a size the model refuses."""
    timm = _timm()
    arch = name.removeprefix(PREFIX)
    family = arch.split("_")[0].split(".")[0]
    if not arch or not timm.is_model(arch):
        raise UserError(
            f"model.name: {name!r} is not a timm model; python -c 'import timm; "
            f'print(timm.list_models("*{family}*"))\' lists the names'
        )
    kwargs = dict(pretrained=False, num_classes=0, in_chans=in_channels)
    encoder = _create(timm, name, arch, **kwargs)
    default = encoder.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    size = image_size or default
    if _constructor_takes(encoder, "dynamic_img_size"):
        encoder = _create(timm, name, arch, dynamic_img_size=True, **kwargs)
    elif (
        size != default
        and encoder.pretrained_cfg.get("fixed_input_size")
        and _constructor_takes(encoder, "img_size")
    ):
        encoder = _create(timm, name, arch, img_size=size, **kwargs)
    try_size(encoder, name, in_channels, size)
    return encoder


def _create(timm, name: str, arch: str, **kwargs) -> nn.Module:
    """``timm.create_model``; what timm refuses (a pretrained tag it does not know, an
    argument the model does not take) becomes one line."""
    try:
        return timm.create_model(arch, **kwargs)
    except (RuntimeError, ValueError, TypeError, KeyError, AssertionError) as exc:
        raise UserError(f"model.name: timm cannot build {name!r}: {first_line(exc)}") from None


def try_size(encoder: nn.Module, name: str, in_channels: int, size: int) -> None:
    """Run ``encoder`` once on a zero ``size`` x ``size`` image: one line if it refuses."""
    patch = _patch_size(encoder)
    if patch and size % patch:
        unet = math.lcm(patch, 32)
        raise UserError(
            f"data.image_size {size}: {name} cuts images into {patch} px patches; use a "
            f"multiple of {patch} (e.g. {max(patch, size // patch * patch)}; for a U-Net a "
            f"multiple of {unet}, e.g. {max(unet, size // unet * unet)})"
        )
    training = encoder.training
    try:
        with torch.no_grad():
            encoder.eval()(torch.zeros(1, in_channels, size, size))
    except Exception as exc:  # timm's asserts and shape errors, whatever the family
        first = first_line(exc, 160)
        default = encoder.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        raise UserError(
            f"data.image_size {size}: {name} does not take {size} x {size} images ({first}); "
            f"try data.image_size={default}, timm's size for it"
        ) from None
    finally:
        encoder.train(training)


def _patch_size(encoder: nn.Module) -> int | None:
    embed = getattr(encoder, "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    if patch is None:
        return None
    return max(patch) if isinstance(patch, tuple | list) else int(patch)


def pooled_width(encoder: nn.Module) -> int:
    """Width of the pooled features ``encoder(x)`` returns (``head_hidden_size`` where a
    head has a pre-logits layer, else ``num_features``)."""
    return int(getattr(encoder, "head_hidden_size", None) or encoder.num_features)


def feature_levels(encoder: nn.Module, name: str) -> tuple[list[int], list[Level]]:
    """The ``forward_intermediates`` indices a U-Net reads and the maps they give, finest
    first: the deepest map of each reduction for a multi-stride backbone; for a single-stride
    (ViT-style) backbone :data:`PYRAMID_BLOCKS` blocks evenly spread over its depth.

    Raises :class:`UserError` for a backbone without ``forward_intermediates`` or whose
    reductions are not powers of two."""
    info = getattr(encoder, "feature_info", None)
    if not hasattr(encoder, "forward_intermediates") or not info:
        raise UserError(
            f"model.name: {name} has no forward_intermediates in timm, so it cannot be a U-Net "
            "encoder (it can still be a classifier or a SimCLR encoder)"
        )
    entries = [(e["module"], int(e["num_chs"]), int(e["reduction"])) for e in info]
    reductions = sorted({r for _, _, r in entries})
    if len(reductions) == 1:
        depth = len(entries)
        chosen = sorted({depth * (i + 1) // PYRAMID_BLOCKS - 1 for i in range(PYRAMID_BLOCKS)})
    else:
        bad = [r for r in reductions if r & (r - 1)]
        if bad:
            raise UserError(
                f"model.name: {name}'s feature maps are 1/{bad[0]} of the input; the U-Net's "
                "decoder doubles the size at each step and needs powers of two"
            )
        chosen = [max(i for i, e in enumerate(entries) if e[2] == r) for r in reductions]
    return chosen, [Level(*entries[i]) for i in chosen]


def feature_maps(encoder: nn.Module, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
    """``[B, C_l, H / r_l, W / r_l]`` for each of ``indices`` (:func:`feature_levels`)."""
    return encoder.forward_intermediates(x, indices=indices, intermediates_only=True)


def unused_by_features(encoder: nn.Module, indices: list[int]) -> list[str]:
    """Parameter names ``forward_intermediates(indices)`` never touches (a ViT's final norm,
    ConvNeXt's head norm, EfficientNet's last 1x1 convolution): what timm's
    ``prune_intermediate_layers`` would remove. Empty when the model cannot say."""
    if not hasattr(encoder, "prune_intermediate_layers"):
        return []
    pruned = copy.deepcopy(encoder)
    try:
        pruned.prune_intermediate_layers(indices, prune_norm=True, prune_head=True)
    except Exception:  # a model whose pruning is not implemented keeps every parameter
        return []
    kept = {name for name, _ in pruned.named_parameters()}
    return [name for name, _ in encoder.named_parameters() if name not in kept]


def stage_names(encoder: nn.Module, name: str) -> list[str]:
    """Names of :func:`stage_embeddings`: the feature levels' modules, then ``output``."""
    try:
        _, levels = feature_levels(encoder, name)
    except UserError:
        levels = []
    return [level.name for level in levels] + ["output"]


def stage_embeddings(encoder: nn.Module, x: torch.Tensor, name: str) -> list[torch.Tensor]:
    """``[B, C]`` per stage of :func:`stage_names`: each level's map averaged over space,
    then the encoder's own pooled output (what a classifier head sees)."""
    try:
        indices, _ = feature_levels(encoder, name)
    except UserError:
        indices = []
    pooled = [f.float().mean(dim=(2, 3)) for f in feature_maps(encoder, x, indices)]
    return [*pooled, encoder(x).float()]


# ------------------------------------------------------------------ weights of other shapes


def classifier_prefixes(encoder: nn.Module) -> tuple[str, ...]:
    """Key prefixes of timm's classifier for this model (``head.``, ``fc.``, ...): a full
    timm checkpoint's classifier keys, which the encoder (``num_classes=0``) lacks."""
    names = encoder.pretrained_cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names)


def timm_filter(encoder: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` through the ``checkpoint_filter_fn`` of the model's timm module, the rules
    timm applies to a checkpoint of another size (MaxViT's relative-position tables to
    other windows, a ViT's position embeddings); unchanged when the model has
    none or it fails on this file (the shape check then names the key)."""
    rule = getattr(sys.modules.get(type(encoder).__module__), "checkpoint_filter_fn", None)
    if rule is None:
        return state
    try:
        filtered = rule(dict(state), encoder)
    except Exception:  # written for timm's own files; a foreign layout keeps its tensors
        return state
    return filtered if isinstance(filtered, dict) and filtered else state


def adapt(encoder: nn.Module, key: str, value: torch.Tensor, shape: torch.Size):
    """``value`` reshaped by timm's own rules to fit ``shape``, or None if no rule applies:
    the first convolution to other input channels (``adapt_input_conv``: RGB summed for 1
    channel, repeated and rescaled for more) and absolute position embeddings to another
    patch grid (``resample_abs_pos_embed``, bicubic)."""
    first = encoder.pretrained_cfg.get("first_conv")
    first = (first,) if isinstance(first, str) else tuple(first or ())
    if key in {f"{f}.weight" for f in first} and value.ndim == 4 and value.shape[0] == shape[0]:
        from timm.models import adapt_input_conv  # noqa: PLC0415

        return adapt_input_conv(shape[1], value.float()).to(value.dtype)
    if key.endswith("pos_embed") and value.ndim == 3 and len(shape) == 3:
        prefix = 0 if getattr(encoder, "no_embed_class", False) else encoder.num_prefix_tokens
        old, new = value.shape[1] - prefix, shape[1] - prefix
        if old > 0 and new > 0 and math.isqrt(old) ** 2 == old and math.isqrt(new) ** 2 == new:
            from timm.layers import resample_abs_pos_embed  # noqa: PLC0415

            side = math.isqrt(new)
            return resample_abs_pos_embed(value, [side, side], num_prefix_tokens=prefix)
    return None
