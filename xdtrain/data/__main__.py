"""``python -m xdtrain.data CONFIG``: run a config's input pipeline and show what it yields.

A quick check before a long run: which graph and device the config gets, the shapes and
types of a batch, batches per epoch and samples/s over a few batches.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from xdtrain.config import add_config_arguments, load_config
from xdtrain.data import build_loader
from xdtrain.errors import run_cli


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
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
