"""The CPU path for segmentation: webdataset + DataLoader workers + albumentations.

Same batch contract as the DALI loader (:mod:`xdtrain.data.batch`), same rank split (each
rank reads the contiguous sample range DALI's ``shard_id`` would give it), and the same
preset numbers: albumentations draws one set of geometric parameters per sample and applies
it to the image and, with nearest-neighbour interpolation and no intensity change, to the
mask. Each worker reads its own contiguous part of the rank's range, opening only the
shards it touches, and shuffles inside a buffer seeded by (seed, rank, epoch, worker).
Training streams wrap around, so every rank yields exactly ``len()`` full batches.
"""

from __future__ import annotations

import logging
import math

import albumentations as A
import cv2
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from xdtrain.data.batch import labels
from xdtrain.data.dali_ops import GREY_MEAN, GREY_STD
from xdtrain.data.presets import Augment
from xdtrain.data.shardset import ShardSet, rank_range
from xdtrain.errors import UserError
from xdtrain.rng import rng_for

log = logging.getLogger("xdtrain.data")
SHUFFLE_BUFFER = 256
# OpenCV's INTER_NEAREST samples at floor(x * scale), half a pixel off the linear grid the
# image is resampled on; INTER_NEAREST_EXACT is centre-aligned, so masks stay on the image.
NEAREST = cv2.INTER_NEAREST_EXACT


def transform(aug: Augment | None, size: int) -> A.Compose:
    """The albumentations Compose for a segmentation preset (``None``: evaluation resize)."""
    if aug is None:
        return A.Compose([A.Resize(size, size, mask_interpolation=NEAREST)])
    crop = A.RandomResizedCrop(
        size=(size, size),
        scale=aug.crop_area,
        ratio=aug.crop_ratio,
        mask_interpolation=NEAREST,
        p=aug.crop_p,
    )
    whole = A.Resize(size, size, mask_interpolation=NEAREST, p=1.0 - aug.crop_p)
    if aug.crop_p >= 1:
        first = crop
    elif aug.crop_p <= 0:
        first = whole
    else:
        first = A.OneOf([crop, whole], p=1.0)  # picks one, weighted by their p
    steps = [first, A.HorizontalFlip(p=aug.flip_p)]
    if aug.rotate_p > 0:
        steps.append(
            A.Rotate(
                limit=aug.rotate_degrees,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=aug.rotate_p,
            )
        )
    if aug.jitter_p > 0:
        # additive brightness and multiplicative contrast on the 0-1 scale (the image only)
        steps.append(
            A.RandomBrightnessContrast(
                brightness_limit=aug.brightness, contrast_limit=aug.contrast, p=aug.jitter_p
            )
        )
    return A.Compose(steps)


class _Stream(IterableDataset):
    """Decoded, augmented samples of one rank's range, split among the workers."""

    def __init__(self, loader: AlbuLoader):
        self.loader = loader
        self.epoch = 0

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        lo, hi = self.loader.worker_range(worker, workers)
        rng = rng_for(self.loader.seed, "albu", self.loader.rank, self.epoch, worker)
        compose = transform(self.loader.aug, self.loader.size)
        compose.set_random_seed(int(rng.integers(2**31 - 1)))
        pending_bad = 0
        if hi <= lo:
            return
        while True:
            yielded = False
            for sample in self._shuffled(self._samples(lo, hi), rng):
                try:
                    item = self.loader.prepare(sample, compose)
                except _BadSample as bad:
                    if self.loader.debug:
                        raise UserError(str(bad)) from None
                    log.warning("%s; replaced by the next sample", bad)
                    pending_bad += 1
                    continue
                item["bad"] = pending_bad
                pending_bad = 0
                yielded = True
                yield item
            if not self.loader.train:
                return
            if not yielded:
                raise UserError(
                    f"{self.loader.shardset.folder}: no sample of this rank's part decodes; "
                    f"run `xd-shard verify {self.loader.shardset.folder}`"
                )

    def _shuffled(self, samples, rng):
        if not self.loader.train:
            yield from samples
            return
        buffer = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= SHUFFLE_BUFFER:
                yield buffer.pop(int(rng.integers(len(buffer))))
        rng.shuffle(buffer)
        yield from buffer

    def _samples(self, lo: int, hi: int):
        """Raw samples ``lo``–``hi`` of the split, opening only the shards they live in."""
        offsets = np.cumsum([0, *self.loader.counts])
        urls = [
            p
            for p, a, b in zip(self.loader.shardset.paths, offsets[:-1], offsets[1:], strict=True)
            if a < hi and b > lo
        ]
        if not urls:
            return
        first = int(np.searchsorted(offsets, lo, side="right") - 1)
        index = int(offsets[first])
        stream = wds.WebDataset(
            urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
        )
        for sample in stream:
            if index >= hi:
                break
            if index >= lo:
                yield sample
            index += 1


class _BadSample(Exception):
    pass


class AlbuLoader:
    """Segmentation batches from CPU workers; see the module docstring."""

    def __init__(
        self,
        shardset: ShardSet,
        aug: Augment | None,
        *,
        size: int,
        channels: int,
        batch_size: int,
        workers: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        train: bool = True,
        debug: bool = False,
        device: str = "cpu",
    ):
        self.shardset, self.aug, self.size, self.channels = shardset, aug, size, channels
        self.batch_size, self.workers, self.seed = batch_size, workers, seed
        self.rank, self.world_size, self.train, self.debug = rank, world_size, train, debug
        self.device = torch.device("cuda") if device == "gpu" else torch.device("cpu")
        self.counts = [_index_count(p) for p in shardset.index_paths]
        self.start, self.stop = rank_range(shardset.samples, rank, world_size)
        self.peak = 65535.0 if shardset.bits == 16 else 255.0
        self.epoch = 0
        self.bad_samples = 0
        ways = max(1, workers)
        if train:
            smallest = shardset.samples // world_size
            sizes = [_part(smallest, w, ways) for w in range(ways)]
            self._len = sum(s // batch_size for s in sizes)
        else:
            sizes = [_part(self.stop - self.start, w, ways) for w in range(ways)]
            self._len = sum(math.ceil(s / batch_size) for s in sizes)
        if self._len == 0:
            raise UserError(
                f"{shardset.folder}: the {shardset.split} split has {shardset.samples} samples, "
                f"too few for batches of {batch_size} on {ways} workers × {world_size} ranks; "
                "lower data.batch_size or data.workers"
            )
        self._stream = _Stream(self)

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def worker_range(self, worker: int, workers: int) -> tuple[int, int]:
        n = self.stop - self.start
        lo = self.start + n * worker // workers
        return lo, self.start + n * (worker + 1) // workers

    def prepare(self, sample: dict, compose: A.Compose) -> dict:
        """Decode, co-transform and normalise one raw webdataset sample."""
        where = f"{sample.get('__url__')}: sample {sample.get('__key__')}"
        layout = self.shardset.layout
        image = _decode(sample.get(self.shardset.image_ext), cv2.IMREAD_UNCHANGED)
        mask = _decode(sample.get(layout.mask), cv2.IMREAD_GRAYSCALE)
        if image is None or mask is None:
            raise _BadSample(f"{where} does not decode")
        if image.ndim == 2:
            image = image[:, :, None]
        if image.shape[:2] != mask.shape[:2]:
            raise _BadSample(f"{where}: image {image.shape[:2]} and mask {mask.shape[:2]} differ")
        if image.shape[2] == 4:
            image = image[:, :, [2, 1, 0, 3]]  # OpenCV reads 4-channel PNG as BGRA
        image = image.astype(np.float32) / self.peak
        out = compose(image=image, mask=mask)
        image = (np.ascontiguousarray(out["image"]) - GREY_MEAN) / GREY_STD
        if image.ndim == 2:
            image = image[:, :, None]
        chw = torch.from_numpy(image.transpose(2, 0, 1).copy())
        if chw.shape[0] == 1 and self.channels == 3:
            chw = chw.expand(3, -1, -1).clone()
        pos = np.frombuffer(sample[layout.label], "<i4").astype(np.int64)
        return {
            "image": chw,
            "mask": torch.from_numpy(np.ascontiguousarray(out["mask"]).astype(np.int64)),
            "pos": torch.from_numpy(pos),
            "key": sample["__key__"],
        }

    def __iter__(self):
        self._stream.epoch = self.epoch
        loader = DataLoader(
            self._stream,
            batch_size=self.batch_size,
            num_workers=self.workers,
            drop_last=self.train,
            pin_memory=self.device.type == "cuda",
        )
        for produced, raw in enumerate(loader):
            if produced == self._len:
                break
            batch = {
                "image": raw["image"].to(self.device, non_blocking=True),
                "mask": raw["mask"].to(self.device, non_blocking=True),
            }
            batch.update(labels(self.shardset.layout, raw["pos"].to(self.device)))
            batch["keys"] = list(raw["key"])
            batch["bad_samples"] = int(raw["bad"].sum())
            self.bad_samples += batch["bad_samples"]
            yield batch
        self.epoch += 1


def _decode(data: bytes | None, flags: int):
    if data is None:
        return None
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags)


def _part(n: int, worker: int, workers: int) -> int:
    return n * (worker + 1) // workers - n * worker // workers


def _index_count(index: str) -> int:
    with open(index) as fh:
        return int(fh.readline().split()[1])
