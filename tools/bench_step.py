#!/usr/bin/env python3
"""One training step of a network, in parts: forward and backward, then the optimiser's
step, in milliseconds; prints JSON.

The network, its groups (decay/no-decay) and the optimiser are the trainer's
(``get_model``, ``build_optimizer``); the batch is random (images and labels, or masks for a
U-Net), so only the arithmetic is timed, not the data. Each setting runs ``--warmup`` steps,
then ``--steps`` timed ones; the figure is their median. Settings compared side by side:

- ``--optimizer`` ``fused`` (what ``build_optimizer`` chooses on the CPU and CUDA),
  ``foreach`` (torch's multi-tensor path, its default on CUDA) or ``single`` (one tensor at
  a time, its default on the CPU);
- ``--layout`` ``nchw`` or ``channels_last`` (``train.channels_last``).

Set ``OMP_NUM_THREADS`` to time it as one of the demo's jobs (one thread each). Example::

    OMP_NUM_THREADS=1 python tools/bench_step.py --model unet_resnet18 --channels 4 \\
        --classes 4 --size 32 --batch 16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from xdtrain.config import OptimConfig
from xdtrain.models import get_model
from xdtrain.optim import build_optimizer


def build(args, optimizer: str, layout: str):
    kind = "unet" if args.model.startswith("unet") else "classifier"
    torch.manual_seed(0)
    model = get_model(
        args.model,
        num_classes=args.classes,
        in_channels=args.channels,
        kind=kind,
        image_size=args.size,
    )
    images = torch.randn(args.batch, args.channels, args.size, args.size)
    if kind == "unet":
        target = torch.randint(0, args.classes, (args.batch, args.size, args.size))
    else:
        target = torch.randint(0, args.classes, (args.batch,))
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    config = OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-4)
    opt = build_optimizer(model, config, args.batch)
    if optimizer != "fused":  # the same groups and settings, another implementation
        for group in opt.param_groups:
            group["fused"] = None
            group["foreach"] = optimizer == "foreach"
    return model, opt, images, target


def time_setting(args, optimizer: str, layout: str) -> dict:
    model, opt, images, target = build(args, optimizer, layout)
    loss_fn = torch.nn.CrossEntropyLoss()
    passes, steps = [], []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = loss_fn(model(images), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        middle = time.perf_counter()
        opt.step()
        end = time.perf_counter()
        if i >= args.warmup:
            passes.append(middle - start)
            steps.append(end - middle)
    return {
        "optimizer": optimizer,
        "layout": layout,
        "forward_backward_ms": round(1000 * statistics.median(passes), 1),
        "optimizer_step_ms": round(1000 * statistics.median(steps), 1),
        "step_ms": round(1000 * (statistics.median(passes) + statistics.median(steps)), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="unet_resnet18")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument(
        "--optimizer",
        nargs="+",
        default=["fused", "foreach"],
        choices=["fused", "foreach", "single"],
    )
    parser.add_argument(
        "--layout", nargs="+", default=["nchw", "channels_last"], choices=["nchw", "channels_last"]
    )
    args = parser.parse_args()
    results = [time_setting(args, o, layout) for layout in args.layout for o in args.optimizer]
    print(
        json.dumps(
            {
                "model": args.model,
                "batch": args.batch,
                "size": args.size,
                "channels": args.channels,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "machine": platform.machine(),
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
