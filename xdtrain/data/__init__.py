"""Batches for training and evaluation: one entry point over both backends.

``build_loader(data, split, rank=, world_size=)`` reads the shard folder written by
``xd-shard``, picks the pipeline from the augmentation preset (SimCLR views, classification
or segmentation; the evaluation graph for splits other than train) and returns an iterable
of batch dicts (see :mod:`xdtrain.data.batch`) with ``len()`` and ``set_epoch()``.
``data.backend: dali`` (default) decodes and augments with DALI, on the GPU when there is one;
``albumentations`` runs segmentation co-transforms on CPU DataLoader workers.
"""

from __future__ import annotations

from pathlib import Path

from xdtrain.config import DataConfig
from xdtrain.data.presets import PRESETS, get_preset
from xdtrain.data.shardset import ShardSet, open_split, sample_of
from xdtrain.errors import UserError

__all__ = ["build_loader", "resolve_device", "PRESETS"]


def resolve_device(device: str) -> str:
    """``auto`` is ``gpu`` when CUDA is usable, else ``cpu``; ``gpu`` without CUDA fails."""
    import torch

    has_cuda = torch.cuda.is_available()
    if device == "gpu" and not has_cuda:
        raise UserError("data.device: gpu asked for, but CUDA is not available; use auto or cpu")
    if device == "auto":
        return "gpu" if has_cuda else "cpu"
    return device


def shard_folder(data: DataConfig) -> Path:
    return Path(data.shards or Path("shards") / data.dataset)


def check_channels(data: DataConfig, shardset: ShardSet) -> None:
    stored = shardset.layout.stored_channels
    if data.channels != stored and stored != 1:
        raise UserError(
            f"data.channels: {data.dataset} images have {stored} channels; "
            f"set data.channels: {stored}"
            + ("" if stored == 3 else " (1 or 3 are for greyscale sources)")
        )
    if data.channels not in (1, 3) and stored == 1:
        raise UserError(
            f"data.channels: {data.dataset} is greyscale; use 1 or 3, not {data.channels}"
        )


def build_loader(
    data: DataConfig,
    split: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    debug: bool = False,
    train: bool | None = None,
    sample: int | None = None,
    sample_seed: int = 0,
):
    """The batches of ``split`` that ``rank`` of ``world_size`` reads.

    ``train`` (default: ``split == "train"``) shuffles, augments with ``data.augment`` and
    drops the last partial batch; otherwise the evaluation graph reads every sample once.
    ``sample``: read only a fixed sample of that many samples of the split, drawn with
    ``sample_seed`` (:func:`xdtrain.data.shardset.sample_of`)."""
    train = split == "train" if train is None else train
    shardset = open_split(shard_folder(data), data.dataset, split, data.fraction)
    if sample is not None:
        shardset = sample_of(shardset, sample, sample_seed)
    check_channels(data, shardset)
    kind = "segment" if shardset.layout.kind == "segmentation" else "classify"
    augment = data.augment or ("segment" if kind == "segment" else "standard")
    preset = PRESETS.get(augment)
    purpose = "simclr" if preset is not None and preset.purpose == "simclr" else kind
    aug = get_preset(augment, purpose, data.solarize)  # evaluation reads its eval_resize
    device = resolve_device(data.device)
    common = dict(
        batch_size=data.batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        train=train,
        debug=debug,
    )
    if data.backend == "albumentations":
        if purpose != "segment":
            raise UserError(
                "data.backend: albumentations runs segmentation co-transforms only; "
                f"{data.dataset} with preset {augment!r} needs data.backend: dali"
            )
        from xdtrain.data.albu_loader import AlbuLoader

        return AlbuLoader(
            shardset,
            aug,
            size=data.image_size,
            channels=data.channels,
            workers=0 if debug else data.workers,
            device=device,
            **common,
        )
    import torch

    from xdtrain.data.dali_loader import DaliLoader
    from xdtrain.data.dali_pipelines import Graph

    stage = purpose if purpose == "simclr" else f"{purpose}_{'train' if train else 'eval'}"
    graph = Graph(
        stage,
        shardset.layout,
        shardset.image_ext,
        shardset.bits,
        data.image_size,
        data.channels,
        views=data.views,
        aug=aug,
        device=device,
    )
    device_id = torch.cuda.current_device() if device == "gpu" else None
    threads = max(1, data.workers)  # 0 means the main process to a DataLoader; DALI needs one
    return DaliLoader(shardset, graph, threads=threads, device_id=device_id, **common)
