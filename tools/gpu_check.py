#!/usr/bin/env python3
"""A short SimCLR training check on a GPU, fed by the DALI pipeline; prints JSON.

It builds the GPU loader (``mixed`` decoding, GPU augmentation) on ImageNet shards, runs
``--steps`` optimisation steps of a torchvision ResNet with a projection head and a local
NT-Xent loss under bf16 autocast and channels_last, and reports samples/s, the share of
time the step waited for data, the loss at the start and the end, and peak GPU memory.

Example::

    python tools/gpu_check.py --shards /tmp/shards/imagenet --model resnet50 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
import torchvision

from xdtrain.config import DataConfig
from xdtrain.data import build_loader


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = z1.shape[0]
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, target)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device")
    config = DataConfig(
        dataset="imagenet",
        shards=args.shards,
        augment="simclr",
        image_size=args.size,
        batch_size=args.batch_size,
        workers=args.workers,
        device="gpu",
    )
    torch.backends.cudnn.benchmark = True
    loader = build_loader(config, "train")
    encoder = getattr(torchvision.models, args.model)()
    width = encoder.fc.in_features
    encoder.fc = torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.ReLU(inplace=True), torch.nn.Linear(width, 128)
    )
    model = encoder.cuda().to(memory_format=torch.channels_last)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
    losses, waits, samples = [], 0.0, 0
    batches = iter(_forever(loader))
    start = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            torch.cuda.synchronize()
            start, waits, samples = time.perf_counter(), 0.0, 0
        t0 = time.perf_counter()
        batch = next(batches)
        waits += time.perf_counter() - t0
        v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in batch["views"])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nt_xent(model(v1), model(v2), 0.5)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        samples += v1.shape[0]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "device": torch.cuda.get_device_name(0),
        "model": args.model,
        "batch_size": args.batch_size,
        "size": args.size,
        "steps": args.steps,
        "samples_per_s": round(samples / seconds, 1),
        "data_wait_share": round(waits / seconds, 3),
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "all_finite": all(map(lambda x: x == x and abs(x) != float("inf"), losses)),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "cpu_threads": args.workers,
    }
    print(json.dumps(result, indent=1))
    return 0


def _forever(loader):
    while True:
        yield from loader


if __name__ == "__main__":
    raise SystemExit(main())
