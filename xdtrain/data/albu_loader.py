"""The CPU path for segmentation: tar shards read by offset, albumentations on DataLoader
workers.

Same batch contract as the DALI loader (:mod:`xdtrain.data.batch`), same samples per rank
and epoch (:mod:`xdtrain.data.order`), and the same preset numbers: albumentations draws one
set of geometric parameters per sample and applies it to the image and, with
nearest-neighbour interpolation and no intensity change, to the mask.

What a batch holds depends only on (seed, rank, epoch): the main process fixes the order
(the epoch's pieces, then, for training, a seeded permutation of the rank's samples), cuts it
into batches, and a worker builds batch ``i`` from its list of samples, seeding each sample's
augmentation from (seed, rank, epoch, position). So ``data.workers`` changes neither the
samples, nor their order, nor their augmentation, nor ``len()``, and a run may be resumed
with another worker count.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from xdtrain.data.batch import labels
from xdtrain.data.dali_ops import GREY_MEAN, GREY_STD
from xdtrain.data.order import reader_pieces
from xdtrain.data.presets import Augment
from xdtrain.data.shardset import ShardSet, rank_batches
from xdtrain.errors import UserError
from xdtrain.rng import rng_for

log = logging.getLogger("xdtrain.data")
# OpenCV's INTER_NEAREST samples at floor(x * scale), half a pixel off the linear grid the
# image is resampled on; INTER_NEAREST_EXACT is centre-aligned, so masks stay on the image.
NEAREST = cv2.INTER_NEAREST_EXACT
# Shrinking images are area-averaged (OpenCV's INTER_AREA), as DALI and torchvision
# antialias them; masks are never averaged.
SHRINK = "image"


class BrightnessContrast(A.ImageOnlyTransform):
    """torchvision's brightness then contrast on a 0–1 float image of any channel count:
    ``clamp(b · (m + c · (x − m)))``, ``b`` and ``c`` drawn in ``1 ± strength``, ``m`` the
    mean of each channel (the grey level of a film, each MRI modality on its own); clamped
    once, as the DALI graphs do."""

    def __init__(self, brightness: float, contrast: float, p: float = 0.5):
        super().__init__(p=p)
        self.brightness, self.contrast = brightness, contrast

    def get_params(self) -> dict[str, float]:
        b, c = self.brightness, self.contrast
        return {
            "b": self.py_random.uniform(max(0.0, 1 - b), 1 + b),
            "c": self.py_random.uniform(max(0.0, 1 - c), 1 + c),
        }

    def apply(self, img: np.ndarray, b: float = 1.0, c: float = 1.0, **params: Any) -> np.ndarray:
        centre = img.mean(axis=(0, 1), keepdims=True) if img.ndim == 3 else img.mean()
        return np.clip(img * (b * c) + centre * (b * (1.0 - c)), 0.0, 1.0).astype(np.float32)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness", "contrast")


def transform(aug: Augment | None, size: int) -> A.Compose:
    """The albumentations Compose for a segmentation preset (``None``: evaluation resize of
    the image alone; scores are computed on the mask as stored)."""
    if aug is None:
        return A.Compose([A.Resize(size, size, area_for_downscale=SHRINK)])
    crop = A.RandomResizedCrop(
        size=(size, size),
        scale=aug.crop_area,
        ratio=aug.crop_ratio,
        mask_interpolation=NEAREST,
        area_for_downscale=SHRINK,
        p=aug.crop_p,
    )
    whole = A.Resize(
        size, size, mask_interpolation=NEAREST, area_for_downscale=SHRINK, p=1.0 - aug.crop_p
    )
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
    if aug.jitter_p > 0 and (aug.brightness > 0 or aug.contrast > 0):
        steps.append(BrightnessContrast(aug.brightness, aug.contrast, p=aug.jitter_p))
    return A.Compose(steps)


class _BadSample(Exception):
    pass


class _Batches(Dataset):
    """Batch ``i`` of an epoch, built in whichever worker asks for it."""

    def __init__(self, loader: AlbuLoader, batches: list[list[tuple[int, int]]], epoch: int):
        self.loader, self.batches, self.epoch = loader, batches, epoch
        self._refs: dict[int, list] = {}
        self._files: dict[int, Any] = {}
        self._compose: A.Compose | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        loader = self.loader
        if self._compose is None:
            self._compose = transform(loader.aug if loader.train else None, loader.size)
        items, bad = [], []
        for j, (shard, position) in enumerate(self.batches[i]):
            sample = self._read(shard, position)
            seed = rng_for(loader.seed, "albu", loader.rank, self.epoch, i, j).integers(2**31)
            self._compose.set_random_seed(int(seed))
            try:
                items.append(loader.prepare(sample, self._compose))
            except _BadSample as exc:
                if loader.debug:
                    raise UserError(str(exc)) from None
                what = "replaced within its batch" if loader.train else "left out of the scores"
                log.warning("%s; %s", exc, what)
                bad.append(j)
                items.append(None)
        good = [item for item in items if item is not None]
        if not good:
            folder = loader.shardset.folder
            raise UserError(
                f"{folder}: every sample of a batch failed to decode; "
                f"run `xd-shard verify {folder}`"
            )
        if loader.train:  # full batches: a good sample of the batch stands in
            good = [item or good[n % len(good)] for n, item in enumerate(items)]
        return _collate(good, len(bad))

    def _read(self, shard: int, position: int) -> dict:
        if shard not in self._refs:
            self._refs[shard] = self.loader.shardset.sample_refs(shard)
            self._files[shard] = open(self.loader.shardset.paths[shard], "rb")  # noqa: SIM115
        ref = self._refs[shard][position]
        sample: dict = ref.read(self._files[shard])
        sample["__key__"] = ref.key
        sample["__url__"] = self.loader.shardset.paths[shard]
        return sample

    def __del__(self):
        for fh in getattr(self, "_files", {}).values():
            fh.close()


def _collate(items: list[dict], bad: int) -> dict:
    """Stacked tensors; masks of different sizes (evaluation, as stored) padded with -1."""
    masks = [item["mask"] for item in items]
    height = max(m.shape[0] for m in masks)
    width = max(m.shape[1] for m in masks)
    mask = torch.full((len(masks), height, width), -1, dtype=torch.int64)
    for n, m in enumerate(masks):
        mask[n, : m.shape[0], : m.shape[1]] = m
    return {
        "image": torch.stack([item["image"] for item in items]),
        "mask": mask,
        "pos": torch.stack([item["pos"] for item in items]),
        "keys": [item["key"] for item in items],
        "bad": bad,
    }


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
        self.rank_samples, self._len = rank_batches(shardset, batch_size, rank, world_size, train)
        self.peak = 65535.0 if shardset.bits == 16 else 255.0
        self.epoch = 0
        self.bad_samples = 0

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_samples(self, epoch: int) -> list[tuple[int, int]]:
        """``(shard, position)`` of every sample this rank reads in ``epoch``, in order."""
        pieces = reader_pieces(self, epoch)
        samples = [(p.shard, i) for p in pieces for i in p.positions]
        if self.train:
            permutation = rng_for(self.seed, "albu-order", self.rank, epoch).permutation
            samples = [samples[i] for i in permutation(len(samples)).tolist()]
        return samples

    def prepare(self, sample: dict, compose: A.Compose) -> dict:
        """Decode, transform and normalise one raw sample (a dict of component bytes with
        ``__key__`` and ``__url__``). Training co-transforms image and mask; evaluation
        resizes the image alone and keeps the mask as stored."""
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
        if self.train:
            out = compose(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        else:
            image = compose(image=image)["image"]
        image = (np.ascontiguousarray(image) - GREY_MEAN) / GREY_STD
        if image.ndim == 2:
            image = image[:, :, None]
        chw = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32))
        if chw.shape[0] == 1 and self.channels == 3:
            chw = chw.expand(3, -1, -1).clone()
        pos = np.frombuffer(sample[layout.label], "<i4").astype(np.int64)
        return {
            "image": chw,
            "mask": torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64)),
            "pos": torch.from_numpy(pos),
            "key": sample["__key__"],
        }

    def __iter__(self):
        if self._len == 0:  # an evaluation rank whose share of the split is empty
            self.epoch += 1
            return
        samples = self.epoch_samples(self.epoch)
        size = self.batch_size
        batches = [samples[i * size : (i + 1) * size] for i in range(self._len)]
        loader = DataLoader(
            _Batches(self, batches, self.epoch),
            batch_size=None,
            shuffle=False,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_ignore_stop_signals,
        )
        for raw in loader:
            batch = {
                "image": raw["image"].to(self.device, non_blocking=True),
                "mask": raw["mask"].to(self.device, non_blocking=True),
            }
            batch.update(labels(self.shardset.layout, raw["pos"].to(self.device)))
            batch["keys"] = list(raw["keys"])
            batch["bad_samples"] = int(raw["bad"])
            self.bad_samples += batch["bad_samples"]
            yield batch
        self.epoch += 1


def _ignore_stop_signals(worker_id: int) -> None:
    """A worker ignores the stop signals a scheduler sends to every process of a job (SIGTERM
    on preemption, SIGUSR1/2 before a time limit): the training process handles them, writes
    its checkpoint and then ends its workers; a worker killed first would fail that step."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def _decode(data: bytes | None, flags: int):
    if data is None:
        return None
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags)
