"""The DALI pipelines, one graph per purpose, for CPU (``device_id=None``) and GPU alike.

A graph reads like its augmentation list. It takes the encoded components of a sample from
either the shard reader or, when a batch must be rebuilt after a decoding failure, from
``external_source`` nodes with the same names, so both paths run the same operators.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from xdtrain.data import dali_ops as ops
from xdtrain.data.presets import Augment, for_greyscale
from xdtrain.shards.base import Layout

PURPOSES = ("simclr", "classify_train", "classify_eval", "segment_train", "segment_eval")
DTYPES = {"int64": types.INT64, "uint8": types.UINT8, "int32": types.INT32}
MASK_PAD = 255  # evaluation masks are padded with it to the batch's largest (-1 in batches)


@dataclass(frozen=True)
class Graph:
    """Everything a pipeline's graph depends on, apart from batch size, threads and seed."""

    purpose: str
    layout: Layout
    image_ext: str
    bits: int
    size: int
    channels: int  # channels of the output images
    views: int = 2
    aug: Augment | None = None
    device: str = "cpu"  # "cpu" or "gpu"

    @property
    def outputs(self) -> tuple[str, ...]:
        """Names of the pipeline's outputs, in order."""
        if self.purpose == "simclr":
            images = tuple(f"view{i}" for i in range(self.views))
        elif self.purpose.startswith("segment"):
            images = ("image", "mask")
        else:
            images = ("image",)
        return (*images, "label", "info")

    @property
    def components(self) -> list[str]:
        """Shard components the reader returns: image, label, then mask if any."""
        parts = [self.image_ext, self.layout.label]
        return parts + ([self.layout.mask] if self.layout.mask else [])


def build(graph: Graph, *, batch_size, threads, seed, device_id=None, reader=None):
    """A built pipeline for ``graph``; ``reader`` holds ``fn.readers.webdataset`` arguments
    (paths, index_paths, shard_id, …), or ``None`` for ``external_source`` inputs."""

    # DALI's conditionals (``if`` on a random draw, dali_ops.coin) transpile the graph's
    # Python through autograph, about 1.5 s per build on a CPU: only the training graphs
    # draw, the evaluation graphs branch on the config alone
    @pipeline_def(enable_conditionals=graph.purpose in CONDITIONAL)
    def pipe():
        inputs = read(graph, reader) if reader is not None else external(graph)
        return GRAPHS[graph.purpose](inputs, graph)

    dev = device_id if graph.device == "gpu" else None
    p = pipe(
        batch_size=batch_size,
        num_threads=threads,
        device_id=dev,
        seed=seed,
        # external_source inputs are fed one batch per run(): nothing to prefetch
        prefetch_queue_depth=2 if reader is not None else 1,
        exec_dynamic=True,
    )
    p.build()
    return p


def read(graph: Graph, reader: dict) -> dict:
    """Encoded components from the shards, plus the padded ``source_info`` of each sample."""
    parts = fn.readers.webdataset(
        ext=graph.components,
        dtypes=[types.UINT8, DTYPES[graph.layout.label_dtype]]
        + ([types.UINT8] if graph.layout.mask else []),
        missing_component_behavior="error",
        name="reader",
        **reader,
    )
    inputs = {"image": parts[0], "label": parts[1]}
    if graph.layout.mask:
        inputs["mask"] = parts[2]
    inputs["info"] = fn.pad(fn.get_property(parts[0], key="source_info"), fill_value=0)
    return inputs


def external(graph: Graph) -> dict:
    names = ["image", "label"] + (["mask"] if graph.layout.mask else []) + ["info"]
    return {name: fn.external_source(name=name, device="cpu") for name in names}


def external_batch(graph: Graph, samples: list[dict[str, bytes]], infos: list[bytes]) -> dict:
    """``feed_input`` data for :func:`external` from raw component bytes."""
    width = max(len(i) for i in infos)
    label_dtype = np.dtype(graph.layout.label_dtype).newbyteorder("<")
    data = {
        "image": [np.frombuffer(s[graph.image_ext], np.uint8) for s in samples],
        "label": [np.frombuffer(s[graph.layout.label], label_dtype).copy() for s in samples],
        "info": [np.frombuffer(i.ljust(width, b"\0"), np.uint8) for i in infos],
    }
    if graph.layout.mask:
        data["mask"] = [np.frombuffer(s[graph.layout.mask], np.uint8) for s in samples]
    return data


# --------------------------------------------------------------------------- decoding


def peak(graph: Graph) -> float:
    return 65535.0 if graph.bits == 16 and graph.image_ext.endswith("png") else 255.0


def decode_image(encoded, graph: Graph):
    """HWC ``uint8`` (or ``uint16`` for 16-bit PNG), on the GPU when the graph is."""
    if graph.layout.colour:
        kind = types.RGB
    elif graph.layout.stored_channels == 1 and peak(graph) == 255.0:
        kind = types.GRAY
    else:
        kind = types.ANY_DATA  # 4-channel MRI, 16-bit CT, CT window stacks: as stored
    dtype = types.UINT16 if peak(graph) > 255 else types.UINT8
    if graph.device == "gpu" and graph.image_ext == "jpg":
        return fn.decoders.image(encoded, device="mixed", output_type=kind)
    image = fn.decoders.image(encoded, device="cpu", output_type=kind, dtype=dtype)
    return image.gpu() if graph.device == "gpu" else image


def decode_mask(encoded, graph: Graph):
    mask = fn.decoders.image(encoded, device="cpu", output_type=types.GRAY)
    return mask.gpu() if graph.device == "gpu" else mask


# --------------------------------------------------------------------------- graphs


def _colour(image, graph: Graph, aug: Augment):
    """The intensity steps of SimCLR and classification, per sample, in SimCLR's order, on
    the 0–1 float image (8- and 16-bit sources alike)."""
    if graph.layout.greyscale:
        image = ops.brightness_contrast(image, for_greyscale(aug))
    else:
        image = ops.colour_jitter(image, aug)
    if aug.blur_p > 0:
        image = ops.random_blur(image, aug)
    if aug.solarize_p > 0:
        image = ops.random_solarize(image, aug)
    if aug.sharpness_p > 0:
        image = ops.random_sharpen(image, aug)
    if aug.noise_p > 0:
        image = ops.random_noise(image, aug)
    return image


def _finish(image, graph: Graph, mirror=None):
    """Normalised CHW with the network's channel count, from a 0–1 float HWC image."""
    stored = graph.layout.stored_channels
    chw = ops.normalise(image, stored, rgb=graph.layout.colour, mirror=mirror)
    return ops.to_channels(chw, stored, graph.channels)


def _augment_view(decoded, graph: Graph):
    aug = graph.aug
    view = ops.random_resized_crop(decoded, graph.size, aug)
    view = _colour(ops.to_unit(view, peak(graph)), graph, aug)
    mirror = fn.random.coin_flip(probability=aug.flip_p)
    return _finish(view, graph, mirror)


def simclr_views(inputs: dict, graph: Graph):
    """N views of each sample: decode once, then crop, flip and colour each view."""
    decoded = decode_image(inputs["image"], graph)
    views = [_augment_view(decoded, graph) for _ in range(graph.views)]
    return (*views, inputs["label"], inputs["info"])


def classify_train(inputs: dict, graph: Graph):
    image = _augment_view(decode_image(inputs["image"], graph), graph)
    return image, inputs["label"], inputs["info"]


def classify_eval(inputs: dict, graph: Graph):
    """The preset's evaluation geometry: the whole image resized (as training without a
    crop), or the shorter side to size / ratio and the centre crop (ImageNet's recipe)."""
    decoded = decode_image(inputs["image"], graph)
    aug = graph.aug
    if aug is not None and aug.eval_resize == "centre_crop":
        image = ops.centre_crop(decoded, graph.size, aug.eval_crop_ratio)
    else:
        image = ops.resize(decoded, graph.size)
    return _finish(ops.to_unit(image, peak(graph)), graph), inputs["label"], inputs["info"]


def _float_image(inputs: dict, graph: Graph):
    return ops.to_unit(decode_image(inputs["image"], graph), peak(graph))


def segment_train(inputs: dict, graph: Graph):
    """Image and mask share the crop window, flip and rotation; the mask is resampled with
    nearest neighbour and never intensity-augmented."""
    aug = graph.aug
    image = _float_image(inputs, graph)
    mask = decode_mask(inputs["mask"], graph)
    start, end = ops.shared_window(aug)
    image = ops.resize_window(image, start, end, graph.size, nearest=False)
    mask = ops.resize_window(mask, start, end, graph.size, nearest=True)
    flip = fn.random.coin_flip(probability=aug.flip_p)
    image = fn.flip(image, horizontal=flip)
    mask = fn.flip(mask, horizontal=flip)
    if aug.rotate_p > 0:
        image, mask = ops.rotate_pair(image, mask, aug)
    if aug.jitter_p > 0:
        image = ops.brightness_contrast(image, aug)
    return _finish(image, graph), mask, inputs["label"], inputs["info"]


def segment_eval(inputs: dict, graph: Graph):
    """The image resized to the network's size; the mask as stored (scores are computed at
    the stored grid), padded with :data:`MASK_PAD` to the largest mask of the batch."""
    image = ops.resize(_float_image(inputs, graph), graph.size)
    mask = fn.pad(decode_mask(inputs["mask"], graph), fill_value=MASK_PAD)
    return _finish(image, graph), mask, inputs["label"], inputs["info"]


CONDITIONAL = ("simclr", "classify_train", "segment_train")  # graphs with random branches
GRAPHS = {
    "simclr": simclr_views,
    "classify_train": classify_train,
    "classify_eval": classify_eval,
    "segment_train": segment_train,
    "segment_eval": segment_eval,
}
