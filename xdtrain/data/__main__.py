"""``python -m xdtrain.data CONFIG``: run a config's input pipeline and show what it yields.

A quick check before a long run: which graph and device the config gets, the shapes and
types of a batch, batches per epoch and samples/s over a few batches.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import torch
from rich.console import Console
from rich.table import Table

from xdtrain.config import add_config_arguments, load_config
from xdtrain.data import PRESETS, build_loader
from xdtrain.errors import run_cli
from xdtrain.tasks import get_task


def describe(value) -> tuple[str, str]:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {list(value.shape)}", str(value.device)
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        first = value[0]
        return f"{len(value)} × {str(first.dtype).removeprefix('torch.')} {list(first.shape)}", str(
            first.device
        )
    if isinstance(value, list):
        return f"{len(value)} × {type(value[0]).__name__}" if value else "[]", "-"
    return f"{type(value).__name__} {value}", "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xdtrain.data",
        description="Run a config's input pipeline for a few batches and describe them.",
    )
    add_config_arguments(parser)
    parser.add_argument("--split", default="train", choices=["train", "val", "test"])
    parser.add_argument("--batches", type=int, default=5, help="batches to time (default 5)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    if not cfg.data.augment:  # the task's preset, as xd-train fills it in
        cfg = replace(cfg, data=replace(cfg.data, augment=get_task(cfg.task).default_augment))
    loader = build_loader(cfg.data, args.split, seed=cfg.run.seed, debug=cfg.run.debug)
    count = min(args.batches, len(loader))
    it = iter(loader)
    batch = next(it)
    start, samples = time.perf_counter(), 0
    for _ in range(count - 1):
        samples += len(next(it)["keys"])
    seconds = time.perf_counter() - start
    table = Table(title=f"{cfg.data.dataset} {args.split}: one batch")
    table.add_column("key")
    table.add_column("value")
    table.add_column("device")
    for key, value in batch.items():
        table.add_row(key, *describe(value))
    console = Console()
    console.print(table)
    rate = f"{samples / seconds:.0f} samples/s" if samples else "too few batches to time"
    backend = cfg.data.backend
    print(
        f"{len(loader)} batches per epoch of {cfg.data.batch_size}; preset {cfg.data.augment}, "
        f"backend {backend}; {rate} after the first batch"
    )
    print(f"evaluation (val, test): {evaluation_geometry(cfg.data)}")
    return 0


def evaluation_geometry(data) -> str:
    """What the evaluation graph does to an image, from the preset (docs/pipelines.md)."""
    preset = PRESETS[data.augment]
    size = data.image_size
    if preset.purpose == "segment":
        return f"image resized to {size} px; scored on the masks as stored"
    if preset.purpose == "simclr":
        return "the SimCLR views, as in training"
    if preset.eval_resize == "centre_crop":
        side = round(size / preset.eval_crop_ratio)
        return f"shorter side to {side} px, centre {size} px crop"
    return f"whole image resized to {size} px, as training does when it does not crop"


if __name__ == "__main__":
    sys.exit(run_cli(main))
