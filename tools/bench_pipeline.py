#!/usr/bin/env python3
"""SimCLR input-pipeline throughput on ImageNet shards; prints JSON.

Measures, in one run on the same shards (the train split of ``--shards``), samples/s of:

* ``dali``: xdtrain's DALI SimCLR pipeline (``build_loader``, preset ``--preset``): decode
  once, then per view random resized crop, flip, colour jitter, greyscale, blur, normalise;
  ``mixed`` decoding and GPU operators where there is a GPU (``--device auto``);
* ``baseline``: what a user would otherwise write: the webdataset library, PIL decoding once,
  ``torchvision.transforms.v2`` for both views (the same SimCLR recipe), a DataLoader with
  one worker per core;
* ``decode_bound``: decoding alone on all cores, the faster of DALI (``mixed`` on a GPU) and
  PIL (libjpeg-turbo) in DataLoader workers; no augmentation pipeline can beat it.

A sample is one image turned into ``--views`` views of ``--size`` px. Each figure is counted
over ``--batches`` batches after ``--warmup`` batches (pipeline start-up excluded).

Example::

    xd-synth imagenet --out /tmp/raw --size full --count 300
    xd-shard --dataset imagenet --src /tmp/raw/imagenet --out /tmp/shards/imagenet
    python tools/bench_pipeline.py --shards /tmp/shards/imagenet --json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
import warnings

import torch

from xdtrain.shards import manifest as manifests

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def shard_urls(folder: str) -> list[str]:
    manifest = manifests.load(folder)
    return [os.path.join(folder, n) for n in manifests.shards(manifest, "train")]


def _timed(batches, count: int, warmup: int, size_of, sync=lambda: None) -> float:
    """Samples/s over ``count`` batches of the iterator ``batches`` after ``warmup``."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    sync()
    start, samples = time.perf_counter(), 0
    for _ in range(count):
        samples += size_of(next(it))
    sync()
    return samples / (time.perf_counter() - start)


# --------------------------------------------------------------------------- baseline


class TwoViews:
    """torchvision v2 SimCLR views of one decoded image (picklable for DataLoader workers)."""

    def __init__(self, size: int, views: int, blur: bool):
        from torchvision.transforms import v2

        steps = [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        if blur:
            steps.append(v2.RandomApply([v2.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
        self.transform, self.views = v2.Compose(steps), views

    def __call__(self, sample):
        image, label = sample
        return [self.transform(image) for _ in range(self.views)], label


def decode_pil(sample):
    from PIL import Image

    image = Image.open(io.BytesIO(sample["jpg"]))
    image = image.convert("RGB")  # forces the full decode
    return image, int(sample["cls"])


def _decoded_size(sample):
    image, label = sample
    return image.size[0], label


def webdataset_loader(urls, batch_size, workers, mapper):
    import webdataset as wds

    warnings.filterwarnings("ignore", message=".*shardshuffle", category=UserWarning)
    dataset = (
        wds.WebDataset(urls, resampled=True, nodesplitter=None)
        .shuffle(1000)
        .map(decode_pil)
        .map(mapper)
    )
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, persistent_workers=False
    )


def bench_baseline(args, urls) -> float:
    loader = webdataset_loader(
        urls, args.batch_size, args.workers, TwoViews(args.size, args.views, True)
    )
    return _timed(loader, args.batches, args.warmup, lambda b: len(b[1]))


def bench_pil_decode(args, urls) -> float:
    loader = webdataset_loader(urls, args.batch_size, args.workers, _decoded_size)
    return _timed(loader, args.batches, args.warmup, lambda b: len(b[1]))


# --------------------------------------------------------------------------- DALI


def bench_dali(args, device: str) -> float:
    from xdtrain.config import DataConfig
    from xdtrain.data import build_loader

    config = DataConfig(
        dataset="imagenet",
        shards=args.shards,
        augment=args.preset,
        image_size=args.size,
        views=args.views,
        batch_size=args.batch_size,
        workers=args.workers,
        device=device,
    )
    loader = build_loader(config, "train")
    batches = _forever(loader)
    return _timed(batches, args.batches, args.warmup, lambda b: len(b["keys"]), _sync(device))


def bench_dali_decode(args, urls, device: str) -> float:
    from nvidia.dali import fn, pipeline_def, types

    indexes = [u[: -len(".tar")] + ".idx" for u in urls]

    @pipeline_def
    def decode_only():
        jpg = fn.readers.webdataset(
            paths=urls, index_paths=indexes, ext=["jpg"], random_shuffle=True, initial_fill=512
        )
        return fn.decoders.image(
            jpg, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB
        )

    pipe = decode_only(
        batch_size=args.batch_size,
        num_threads=args.workers,
        device_id=0 if device == "gpu" else None,
        prefetch_queue_depth=2,
    )
    pipe.build()

    def runs():
        while True:
            yield pipe.run()

    return _timed(runs(), args.batches, args.warmup, lambda out: len(out[0]), _sync(device))


def _forever(loader):
    while True:
        yield from loader


def _sync(device: str):
    return torch.cuda.synchronize if device == "gpu" else (lambda: None)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True, help="an ImageNet shard folder (xd-shard)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--preset", default="simclr")
    parser.add_argument("--batches", type=int, default=30, help="batches counted per figure")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="threads/workers")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--json", action="store_true", help="print only the JSON")
    args = parser.parse_args(argv)
    urls = shard_urls(args.shards)
    # DataLoader workers fork: run them before DALI threads or CUDA exist in this process
    pil_decode = bench_pil_decode(args, urls)
    baseline = bench_baseline(args, urls)
    from xdtrain.data import resolve_device

    device = resolve_device(args.device)
    dali_decode = bench_dali_decode(args, urls, device)
    dali = bench_dali(args, device)
    gpu = torch.cuda.get_device_name(0) if device == "gpu" else None
    result = {
        "dali": round(dali, 1),
        "baseline": round(baseline, 1),
        "decode_bound": round(max(pil_decode, dali_decode), 1),
        "dali_vs_baseline": round(dali / baseline, 2),
        "decode_only": {"pil": round(pil_decode, 1), "dali": round(dali_decode, 1)},
        "cores": os.cpu_count(),
        "device": gpu or f"cpu ({platform.processor() or platform.machine()})",
        "settings": {
            "batch_size": args.batch_size,
            "size": args.size,
            "views": args.views,
            "preset": args.preset,
            "workers": args.workers,
            "batches": args.batches,
        },
    }
    if not args.json:
        print(f"DALI {dali:.0f} samples/s, baseline {baseline:.0f}", file=sys.stderr)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
