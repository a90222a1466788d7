"""Augmentation presets: what each training pipeline does to a sample, as plain numbers.

A preset is data, not code, so the DALI graphs and the albumentations path read the same
numbers and a run's config names exactly what was applied. Every random choice is drawn per
sample. Probabilities are per sample; a strength of 0 turns a step off.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from xdtrain.errors import UserError


@dataclass(frozen=True)
class Augment:
    name: str
    purpose: Literal["simclr", "classify", "segment"]
    # geometry: random resized crop (area share and aspect ratio of the source), flip, rotation
    crop_p: float = 1.0
    crop_area: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    rotate_p: float = 0.0
    rotate_degrees: float = 0.0
    # colour: jitter strengths as torchvision's ColorJitter (factor drawn in 1 ± strength)
    jitter_p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0  # fraction of a full turn, at most 0.5
    grey_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels of the output view
    solarize_p: float = 0.0
    sharpness_p: float = 0.0
    sharpness: float = 1.0  # unsharp-mask amount
    noise_p: float = 0.0
    noise_std: float = 0.05  # on the 0–1 intensity scale
    # evaluation (val, test) of classification: "whole" resizes the whole image to the
    # network's size, as training does when it does not crop; "centre_crop" resizes the
    # shorter side to size / eval_crop_ratio and takes the central square (ImageNet's)
    eval_resize: Literal["whole", "centre_crop"] = "whole"
    eval_crop_ratio: float = 0.875


# SimCLR (Chen et al. 2020, appendix A): colour strength s = 1 gives 0.8/0.8/0.8/0.2.
SIMCLR = Augment(
    "simclr",
    "simclr",
    jitter_p=0.8,
    brightness=0.8,
    contrast=0.8,
    saturation=0.8,
    hue=0.2,
    grey_p=0.2,
    blur_p=0.5,
)

PRESETS: dict[str, Augment] = {
    p.name: p
    for p in (
        SIMCLR,
        # the study's pretraining views: SimCLR's without the Gaussian blur
        replace(SIMCLR, name="simclr_study", blur_p=0.0),
        # SimCLR's recipe for small images (its CIFAR-10 runs): colour strength 0.5, no blur
        replace(
            SIMCLR,
            name="simclr_small",
            brightness=0.4,
            contrast=0.4,
            saturation=0.4,
            hue=0.1,
            blur_p=0.0,
        ),
        # the torchvision reference recipe for ImageNet classification
        Augment("standard", "classify", eval_resize="centre_crop"),
        # the study's finetuning set: every step on its own with probability 0.2; most
        # films are not cropped, so evaluation sees the whole film as training mostly does
        Augment(
            "study",
            "classify",
            crop_p=0.2,
            flip_p=0.2,
            jitter_p=0.2,
            brightness=0.4,
            contrast=0.4,
            saturation=0.4,
            hue=0.1,
            grey_p=0.2,
            blur_p=0.2,
            sharpness_p=0.2,
            noise_p=0.2,
        ),
        Augment("none", "classify", crop_p=0.0, flip_p=0.0),
        # segmentation: shared geometry for image and mask, intensity for the image only
        Augment(
            "segment",
            "segment",
            crop_area=(0.5, 1.0),
            rotate_p=0.5,
            rotate_degrees=15.0,
            jitter_p=0.5,
            brightness=0.2,
            contrast=0.2,
        ),
        Augment(
            "segment_geometry", "segment", crop_area=(0.5, 1.0), rotate_p=0.5, rotate_degrees=15.0
        ),
        Augment("segment_none", "segment", crop_p=0.0, flip_p=0.0),
    )
}


def get_preset(name: str, purpose: str, solarize_p: float = 0.0) -> Augment:
    """The preset ``name`` checked against what the pipeline is for."""
    preset = PRESETS.get(name)
    if preset is None:
        raise UserError(f"data.augment: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    if preset.purpose != purpose:
        fits = sorted(n for n, p in PRESETS.items() if p.purpose == purpose)
        raise UserError(
            f"data.augment: preset {name!r} is for {preset.purpose}, this run needs a "
            f"{purpose} preset: {fits}"
        )
    if solarize_p:
        preset = replace(preset, solarize_p=solarize_p)
    return preset


def for_greyscale(preset: Augment) -> Augment:
    """X-ray, CT and MRI: brightness and contrast jitter only (no hue, saturation, greyscale)."""
    return replace(preset, saturation=0.0, hue=0.0, grey_p=0.0)
