"""DALI augmentation steps, one small function each, for CPU and GPU graphs alike.

Each function takes and returns a DALI ``DataNode`` and draws its random parameters per
sample. Steps that cost nothing when off (colour factors) are gated arithmetically: the
factor is 1 for samples that skip the step. Expensive steps (blur, sharpening, noise,
rotation) run under a per-sample ``if`` so that skipped samples cost nothing; the
pipelines that use them are built with ``enable_conditionals=True``.
"""

from __future__ import annotations

import math as pymath

from nvidia.dali import fn, math, types

from xdtrain.data.presets import Augment

# ImageNet statistics for RGB, on the 0–255 scale the decoders produce
RGB_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
RGB_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# X-ray, CT and MRI: on the 0–1 scale, centred and spread to about unit variance
GREY_MEAN, GREY_STD = 0.5, 0.25


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


def random_resized_crop(image, size: int, aug: Augment):
    """Crop a random area share and aspect ratio of the source and resize it to ``size``."""
    if aug.crop_p >= 1.0:
        return _crop(image, size, aug)
    if coin(aug.crop_p):
        image = _crop(image, size, aug)
    else:
        image = fn.resize(image, size=[size, size], antialias=False)
    return image


def _crop(image, size: int, aug: Augment):
    return fn.random_resized_crop(
        image,
        size=[size, size],
        random_area=list(aug.crop_area),
        random_aspect_ratio=list(aug.crop_ratio),
        antialias=False,
    )


def colour_jitter(image, aug: Augment):
    """RGB ``uint8``: brightness, contrast, saturation, hue with probability ``jitter_p``,
    then greyscale with probability ``grey_p`` (saturation 0), in one ``color_twist``."""
    if aug.jitter_p <= 0 and aug.grey_p <= 0:
        return image
    p = aug.jitter_p
    brightness = gated(p, max(0.0, 1 - aug.brightness), 1 + aug.brightness, 1.0)
    contrast = gated(p, max(0.0, 1 - aug.contrast), 1 + aug.contrast, 1.0)
    saturation = gated(p, max(0.0, 1 - aug.saturation), 1 + aug.saturation, 1.0)
    hue = gated(p, -aug.hue * 360.0, aug.hue * 360.0, 0.0)
    if aug.grey_p > 0:
        keep_colour = 1.0 - fn.random.coin_flip(probability=aug.grey_p)
        saturation = saturation * keep_colour
    return fn.color_twist(
        image, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue
    )


def brightness_contrast(image, aug: Augment, centre: float | None = None):
    """Any channel count (X-ray, CT, MRI): brightness and contrast with ``jitter_p``."""
    p = aug.jitter_p
    if p <= 0 or (aug.brightness <= 0 and aug.contrast <= 0):
        return image
    brightness = gated(p, max(0.0, 1 - aug.brightness), 1 + aug.brightness, 1.0)
    contrast = gated(p, max(0.0, 1 - aug.contrast), 1 + aug.contrast, 1.0)
    kwargs = {} if centre is None else {"contrast_center": centre}
    return fn.brightness_contrast(image, brightness=brightness, contrast=contrast, **kwargs)


def gaussian_blur(image, aug: Augment):
    """Blur with a per-sample sigma in ``blur_sigma``, with probability ``blur_p``.

    The window follows from sigma (DALI's default), which on CPU is about 1.4x faster than
    SimCLR's fixed 23-pixel window at 224 px and equal inside three sigmas."""
    if coin(aug.blur_p):
        image = fn.gaussian_blur(image, sigma=fn.random.uniform(range=list(aug.blur_sigma)))
    return image


def solarize(image, aug: Augment):
    """``uint8``: invert pixels at or above 128, with probability ``solarize_p``."""
    if coin(aug.solarize_p):
        high = fn.cast(image >= 128, dtype=types.FLOAT)
        flipped = image + high * (255.0 - 2.0 * image)
        image = fn.cast(flipped, dtype=types.UINT8)
    return image


def sharpen(image, aug: Augment, peak: float):
    """Unsharp mask (image + a·(image − blur)) with probability ``sharpness_p``."""
    if coin(aug.sharpness_p):
        soft = fn.gaussian_blur(image, sigma=1.0)
        sharp = image + aug.sharpness * (image - soft)
        image = fn.cast(math.clamp(sharp, 0.0, peak), dtype=types.UINT8)
    return image


def gaussian_noise(image, aug: Augment, peak: float):
    """Additive Gaussian noise of ``noise_std`` (0–1 scale), with probability ``noise_p``."""
    if coin(aug.noise_p):
        image = fn.noise.gaussian(image, stddev=aug.noise_std * peak)
    return image


def normalise(image, channels: int, rgb: bool, mirror=None, peak: float = 255.0):
    """Float CHW normalised with the statistics of its kind; optionally mirrored.

    ``peak`` is the value of full intensity in ``image`` (255, 65535, or 1 for floats)."""
    if rgb:
        mean = [m * peak / 255 for m in RGB_MEAN]
        std = [s * peak / 255 for s in RGB_STD]
    else:
        mean, std = [GREY_MEAN * peak] * channels, [GREY_STD * peak] * channels
    kwargs = {} if mirror is None else {"mirror": mirror}
    return fn.crop_mirror_normalize(
        image, mean=mean, std=std, dtype=types.FLOAT, output_layout="CHW", **kwargs
    )


def to_channels(chw, have: int, want: int):
    """Replicate a single channel to ``want`` (a greyscale film for a 3-channel encoder)."""
    if have == want:
        return chw
    return fn.cat(*([chw] * want), axis=0)


def shared_window(aug: Augment):
    """A relative crop window ``(start, end)`` in (row, column) order, drawn per sample:
    random area share and aspect ratio, with probability ``crop_p`` (else the whole image).
    Feed it to the ``resize`` of the image and of the mask to keep them aligned."""
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


def rotate_pair(image, mask, aug: Augment):
    """Rotate image (linear) and mask (nearest) by one angle, with probability ``rotate_p``."""
    if coin(aug.rotate_p):
        angle = fn.random.uniform(range=[-aug.rotate_degrees, aug.rotate_degrees])
        image = fn.rotate(image, angle=angle, keep_size=True, fill_value=0.0)
        mask = fn.rotate(
            mask, angle=angle, keep_size=True, fill_value=0, interp_type=types.INTERP_NN
        )
    return image, mask


def resize_window(image, start, end, size: int, nearest: bool):
    """Resize the window ``start``–``end`` (relative) of ``image`` to ``size`` square."""
    return fn.resize(
        image,
        roi_start=start,
        roi_end=end,
        roi_relative=True,
        size=[size, size],
        interp_type=types.INTERP_NN if nearest else types.INTERP_LINEAR,
        antialias=False,
    )
