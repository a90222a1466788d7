"""DALI augmentation steps, one small function each, for CPU and GPU graphs alike.

Geometry (crop, resize, flip, rotation) runs on the decoded image as stored (``uint8`` or
``uint16``); everything after it runs on ``float32`` on the 0–1 scale (:func:`to_unit`).
Every intensity step computes in float and clamps its result once to [0, 1]: arithmetic on
integer nodes would wrap around (``uint8`` 10 − 20 is 246), and a step that rounded and
clamped after every operation would stack rounding errors.

Each step comes in two layers: an ``adjust_*``/``apply`` function that takes its parameters
(numbers or per-sample DALI nodes) and does exactly one thing, tested against torchvision,
PIL and albumentations on fixed parameters; and the random step the graphs use, which draws
those parameters per sample. The definitions follow ``torchvision.transforms.v2``
(brightness scales, contrast blends with the mean grey level, saturation with the greyscale
image); hue is DALI's rotation in YIQ space, not torchvision's HSV shift (see
docs/pipelines.md). Expensive steps run under a per-sample ``if`` so that skipped samples
cost nothing; the pipelines that use them are built with ``enable_conditionals=True``.
"""

from __future__ import annotations

import math as pymath

import numpy as np
from nvidia.dali import fn, math, types

from xdtrain.data.presets import Augment

# ImageNet statistics for RGB, on the 0–1 scale
RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)
# X-ray, CT and MRI: centred and spread to about unit variance
GREY_MEAN, GREY_STD = 0.5, 0.25
# torchvision's rgb_to_grayscale weights (ITU-R BT.601 luma)
LUMA = (0.2989, 0.587, 0.114)
SHARPEN_SIGMA = 1.0  # pixels: the unsharp mask's blur


# --------------------------------------------------------------------------- randomness


def coin(p: float):
    """A per-sample boolean that is true with probability ``p`` (a predicate for ``if``)."""
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def gated(p: float, low: float, high: float, neutral: float):
    """A per-sample factor drawn in [low, high] with probability ``p``, else ``neutral``."""
    if p <= 0 or high <= low:
        return neutral
    value = fn.random.uniform(range=[low, high])
    if p >= 1.0:
        return value
    on = fn.random.coin_flip(probability=p)  # int32 0 or 1
    return neutral + on * (value - neutral)


# --------------------------------------------------------------------------- geometry


def random_resized_crop(image, size: int, aug: Augment):
    """With probability ``crop_p`` a random area share and aspect ratio of the source (as
    torchvision's ``RandomResizedCrop``), else the whole image, resized to ``size`` square
    with antialiasing (as torchvision's ``resize``)."""
    if aug.crop_p >= 1.0:
        return _crop(image, size, aug)
    if coin(aug.crop_p):  # noqa: SIM108 - a DALI conditional needs the statement form
        image = _crop(image, size, aug)
    else:
        image = resize(image, size)
    return image


def _crop(image, size: int, aug: Augment):
    return fn.random_resized_crop(
        image,
        size=[size, size],
        random_area=list(aug.crop_area),
        random_aspect_ratio=list(aug.crop_ratio),
        antialias=True,
    )


def resize(image, size: int):
    """The whole image to ``size`` square: linear, antialiased when shrinking."""
    return fn.resize(image, size=[size, size], antialias=True)


def centre_crop(image, size: int, ratio: float):
    """Shorter side to ``size / ratio``, then the central ``size`` square (torchvision's
    ImageNet evaluation with ratio 0.875)."""
    resized = fn.resize(image, resize_shorter=round(size / ratio), antialias=True)
    return fn.crop(resized, crop=[size, size])


def shared_window(aug: Augment):
    """A relative crop window ``(start, end)`` in (row, column) order, drawn per sample:
    random area share and aspect ratio, with probability ``crop_p`` (else the whole image).
    Feed it to the ``resize`` of the image and of the mask to keep them aligned."""
    if aug.crop_p <= 0:  # the whole image: constants, no random nodes
        return types.Constant(np.float32([0.0, 0.0])), types.Constant(np.float32([1.0, 1.0]))
    low, high = aug.crop_area
    area = gated(aug.crop_p, low, high, 1.0)
    log_ratio = gated(aug.crop_p, pymath.log(aug.crop_ratio[0]), pymath.log(aug.crop_ratio[1]), 0.0)
    ratio = math.exp(log_ratio)
    width = math.min(math.sqrt(area * ratio), 1.0)
    height = math.min(math.sqrt(area / ratio), 1.0)
    x0 = fn.random.uniform(range=[0.0, 1.0]) * (1.0 - width)
    y0 = fn.random.uniform(range=[0.0, 1.0]) * (1.0 - height)
    start = fn.stack(y0, x0)
    end = fn.stack(y0 + height, x0 + width)
    return start, end


def resize_window(image, start, end, size: int, nearest: bool):
    """Resize the window ``start``–``end`` (relative) of ``image`` to ``size`` square:
    nearest neighbour for masks, else linear and antialiased (as :func:`resize`)."""
    return fn.resize(
        image,
        roi_start=start,
        roi_end=end,
        roi_relative=True,
        size=[size, size],
        interp_type=types.INTERP_NN if nearest else types.INTERP_LINEAR,
        antialias=not nearest,
    )


def rotate(image, angle, nearest: bool = False):
    """Rotate by ``angle`` degrees counter-clockwise about the centre, same size, 0 outside."""
    if nearest:
        return fn.rotate(
            image, angle=angle, keep_size=True, fill_value=0, interp_type=types.INTERP_NN
        )
    return fn.rotate(image, angle=angle, keep_size=True, fill_value=0.0)


def rotate_pair(image, mask, aug: Augment):
    """Rotate image (linear) and mask (nearest) by one angle, with probability ``rotate_p``."""
    if coin(aug.rotate_p):
        angle = fn.random.uniform(range=[-aug.rotate_degrees, aug.rotate_degrees])
        image = rotate(image, angle)
        mask = rotate(mask, angle, nearest=True)
    return image, mask


# --------------------------------------------------------------------------- intensity


def to_unit(image, peak: float):
    """``float32`` on the 0–1 scale from an image whose full intensity is ``peak``."""
    return fn.cast(image, dtype=types.FLOAT) * (1.0 / peak)


def clamp(image):
    return math.clamp(image, 0.0, 1.0)


def _centre(image, rgb: bool):
    """The level contrast pivots on: the mean grey (luma) level of an RGB image, as
    torchvision's ``adjust_contrast``; the mean of each channel otherwise (greyscale films,
    each MRI modality on its own)."""
    means = fn.reductions.mean(image, axes=[0, 1])  # [C]
    if not rgb:
        return means
    return means[0] * LUMA[0] + means[1] * LUMA[1] + means[2] * LUMA[2]


def adjust_brightness_contrast(image, brightness, contrast):
    """Greyscale and multi-channel images (films, CT, MRI): ``clamp(b · (m + c · (x − m)))``
    with ``m`` the mean of each channel: torchvision's ``adjust_brightness`` then
    ``adjust_contrast``, clamped once."""
    centre = _centre(image, rgb=False)
    return clamp(image * (brightness * contrast) + centre * (brightness * (1.0 - contrast)))


def adjust_colour(image, brightness=1.0, contrast=1.0, saturation=1.0, hue_turns=0.0):
    """RGB colour jitter in one pass: :func:`adjust_brightness_contrast`'s brightness and
    contrast (pivot: the mean luma), saturation blended with the greyscale image (0 gives
    it), hue turned by ``hue_turns`` of a full turn in YIQ space; clamped once.

    DALI's ``color_twist`` pivots contrast on 0.5, ``b · (0.5 + c · (x − 0.5))``; adding
    ``b · (1 − c) · (m − 0.5)``, a grey shift that saturation and hue leave as it is, moves
    the pivot to the mean ``m``."""
    twisted = fn.color_twist(
        image,
        brightness=brightness,
        contrast=contrast,
        saturation=saturation,
        hue=hue_turns * 360.0,
        dtype=types.FLOAT,
    )
    if isinstance(contrast, float) and contrast == 1.0:
        return clamp(twisted)
    shift = (_centre(image, rgb=True) - 0.5) * (brightness * (1.0 - contrast))
    return clamp(twisted + shift)


def gaussian_blur(image, sigma):
    """Gaussian blur of ``sigma`` pixels, window ``2·ceil(3σ) + 1`` (DALI's default)."""
    return fn.gaussian_blur(image, sigma=sigma)


def solarize(image, threshold: float = 0.5):
    """Invert (``1 − x``) every value at or above ``threshold`` (torchvision's ``solarize``)."""
    high = fn.cast(image >= threshold, dtype=types.FLOAT)
    return image + high * (1.0 - 2.0 * image)


def unsharp_mask(image, amount: float, sigma: float = SHARPEN_SIGMA):
    """``clamp(x + amount · (x − blur_σ(x)))`` (PIL's ``UnsharpMask`` with threshold 0)."""
    soft = fn.gaussian_blur(image, sigma=sigma)
    return clamp(image + amount * (image - soft))


def add_noise(image, stddev: float):
    """Additive Gaussian noise of ``stddev`` (0–1 scale), clamped."""
    return clamp(fn.noise.gaussian(image, stddev=stddev))


def colour_jitter(image, aug: Augment):
    """RGB: brightness, contrast, saturation and hue with probability ``jitter_p`` (factors in
    1 ± strength, hue in ± ``hue`` turns, as torchvision's ``ColorJitter`` draws them, applied
    in that fixed order), then greyscale with probability ``grey_p``."""
    if aug.jitter_p <= 0 and aug.grey_p <= 0:
        return image
    p = aug.jitter_p
    brightness = gated(p, max(0.0, 1 - aug.brightness), 1 + aug.brightness, 1.0)
    contrast = gated(p, max(0.0, 1 - aug.contrast), 1 + aug.contrast, 1.0)
    saturation = gated(p, max(0.0, 1 - aug.saturation), 1 + aug.saturation, 1.0)
    hue = gated(p, -aug.hue, aug.hue, 0.0)
    if aug.grey_p > 0:
        keep_colour = 1.0 - fn.random.coin_flip(probability=aug.grey_p)
        saturation = saturation * keep_colour
    return adjust_colour(image, brightness, contrast, saturation, hue)


def brightness_contrast(image, aug: Augment):
    """Any channel count (X-ray, CT, MRI): brightness and contrast with ``jitter_p``."""
    p = aug.jitter_p
    if p <= 0 or (aug.brightness <= 0 and aug.contrast <= 0):
        return image
    brightness = gated(p, max(0.0, 1 - aug.brightness), 1 + aug.brightness, 1.0)
    contrast = gated(p, max(0.0, 1 - aug.contrast), 1 + aug.contrast, 1.0)
    return adjust_brightness_contrast(image, brightness, contrast)


def random_blur(image, aug: Augment):
    """Blur with a per-sample sigma in ``blur_sigma``, with probability ``blur_p``.

    The window follows from sigma (DALI's default), which on CPU is about 1.4x faster than
    SimCLR's fixed 23-pixel window at 224 px and equal inside three sigmas."""
    if coin(aug.blur_p):
        image = gaussian_blur(image, fn.random.uniform(range=list(aug.blur_sigma)))
    return image


def random_solarize(image, aug: Augment):
    """Solarize with probability ``solarize_p``."""
    if coin(aug.solarize_p):
        image = solarize(image)
    return image


def random_sharpen(image, aug: Augment):
    """Unsharp mask of amount ``sharpness`` with probability ``sharpness_p``."""
    if coin(aug.sharpness_p):
        image = unsharp_mask(image, aug.sharpness)
    return image


def random_noise(image, aug: Augment):
    """Gaussian noise of ``noise_std`` with probability ``noise_p``."""
    if coin(aug.noise_p):
        image = add_noise(image, aug.noise_std)
    return image


# --------------------------------------------------------------------------- output


def normalise(image, channels: int, rgb: bool, mirror=None):
    """Float CHW from a 0–1 float HWC image, normalised with the statistics of its kind
    (ImageNet's for RGB, mean 0.5 and std 0.25 otherwise); optionally mirrored."""
    if rgb:
        mean, std = list(RGB_MEAN), list(RGB_STD)
    else:
        mean, std = [GREY_MEAN] * channels, [GREY_STD] * channels
    kwargs = {} if mirror is None else {"mirror": mirror}
    return fn.crop_mirror_normalize(
        image, mean=mean, std=std, dtype=types.FLOAT, output_layout="CHW", **kwargs
    )


def to_channels(chw, have: int, want: int):
    """Replicate a single channel to ``want`` (a greyscale film for a 3-channel encoder)."""
    if have == want:
        return chw
    return fn.cat(*([chw] * want), axis=0)
