"""``xd-synth``: write raw data sets in the real layouts, for tests, the demo and benchmarks."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from xdtrain.errors import run_cli
from xdtrain.progress import make_progress
from xdtrain.synth import GENERATORS, generate

ALL = "all"


def build_parser() -> argparse.ArgumentParser:
    counts = "; ".join(f"{name}: {gen.count_help}" for name, gen in GENERATORS.items())
    parser = argparse.ArgumentParser(
        prog="xd-synth",
        description="Generate raw data sets in the exact on-disk layouts of the real "
        "downloads; labels follow from image content. Each goes to OUT/<dataset>.",
    )
    parser.add_argument("dataset", choices=[*GENERATORS, ALL])
    parser.add_argument("--out", default="datasets", help="root folder (default: datasets)")
    parser.add_argument(
        "--size",
        choices=["small", "full"],
        default="small",
        help="small: tiny images for tests; full: the real image dimensions",
    )
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    parser.add_argument(
        "--count",
        type=int,
        default=None,
        help=f"how many items ({counts}); default depends on --size",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes that render items")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing data set written with other settings",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = list(GENERATORS) if args.dataset == ALL else [args.dataset]
    workers = max(1, min(args.workers, os.cpu_count() or 1))
    with make_progress(enabled=not args.quiet) as progress:
        folders = [
            generate(
                name,
                args.out,
                size=args.size,
                seed=args.seed,
                count=args.count,
                workers=workers,
                force=args.force,
                progress=progress,
            )
            for name in names
        ]
    if not args.quiet:
        Console(stderr=True).print(summary(folders))
    for folder in folders:
        print(folder)
    return 0


def summary(folders: list[Path]) -> Table:
    """Files and bytes written per data set."""
    table = Table(title="xd-synth", title_justify="left")
    for column in ("data set", "folder", "files", "MB"):
        table.add_column(column, justify="right" if column in ("files", "MB") else "left")
    for folder in folders:
        files = [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]
        size = sum(p.stat().st_size for p in files) / 1e6
        table.add_row(folder.name, str(folder), str(len(files)), f"{size:.1f}")
    return table


def entry() -> None:
    sys.exit(run_cli(main))
