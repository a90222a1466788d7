"""``xd-shard``: pack a raw data set into shards; ``verify`` and ``info`` a shard folder."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console

from xdtrain.errors import UserError, run_cli
from xdtrain.progress import make_progress
from xdtrain.shards import PACKERS
from xdtrain.shards import manifest as manifest_mod
from xdtrain.shards.base import add_shared_arguments
from xdtrain.shards.pack import pack, shard_size
from xdtrain.shards.splits import DEFAULT_FRACTIONS, parse_fractions, parse_ratios

USAGE = f"""xd-shard --dataset {{{",".join(PACKERS)}}} [options]
       xd-shard verify DIR
       xd-shard info DIR
       xd-shard locate --src NIFTI_FOLDER NAME..."""


def pack_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xd-shard",
        usage=USAGE,
        description="Pack a raw data set into shuffled WebDataset shards with patient-level "
        "splits, a DALI index per shard and manifest.json.",
    )
    parser.add_argument("--dataset", required=True, choices=list(PACKERS))
    parser.add_argument("--src", help="raw data set folder (default: datasets/<dataset>)")
    parser.add_argument("--out", help="output folder (default: shards/<dataset>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of splits and shuffles")
    parser.add_argument(
        "--splits",
        default="0.7,0.1,0.2",
        help="train,val,test shares of patients' samples (default 0.7,0.1,0.2)",
    )
    parser.add_argument(
        "--fractions",
        default=",".join(str(f) for f in DEFAULT_FRACTIONS),
        help="nested training fractions chosen by patient (default 0.5,0.1,0.01; empty for none)",
    )
    parser.add_argument("--shard-size", default="256MB", help="target shard size (default 256MB)")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="encoding processes (default: all cores)",
    )
    parser.add_argument("--strict", action="store_true", help="stop at the first bad input")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace xd-shard's own earlier output in --out (packed with other arguments, or "
        "an unfinished run); files xd-shard did not write are never touched",
    )
    parser.add_argument(
        "--no-fsync",
        dest="fsync",
        action="store_false",
        help="leave writing shards to disk to the kernel, as tar does, instead of flushing "
        "each before recording it: faster; after a power cut run `xd-shard verify` (a rerun "
        "of an unfinished run checks its shards itself)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    add_shared_arguments(parser.add_argument_group("options of several data sets"))
    for name, packer in PACKERS.items():
        packer.add_arguments(parser.add_argument_group(f"{name} options"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("verify", "info"):
        return _folder_command(argv[0], argv[1:])
    if argv and argv[0] == "locate":
        return _locate(argv[1:])
    args = pack_parser().parse_args(argv)
    packer = PACKERS[args.dataset]
    src = Path(args.src or f"datasets/{args.dataset}")
    out = Path(args.out or f"shards/{args.dataset}")
    ratios = parse_ratios(args.splits)
    fractions = parse_fractions(args.fractions) if args.fractions.strip() else ()
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    with make_progress(enabled=not args.quiet) as progress:
        manifest = pack(
            packer,
            src,
            out,
            options=packer.options(args),
            seed=args.seed,
            ratios=ratios,
            fractions=fractions,
            shard_bytes=shard_size(args.shard_size),
            workers=args.workers,
            strict=args.strict,
            force=args.force,
            fsync=args.fsync,
            progress=progress,
        )
    if not args.quiet:
        _print_summary(Console(stderr=True), manifest)
    print(out)
    return 0


def _print_summary(console: Console, manifest: dict) -> None:
    """The splits, then the decisions, skipped inputs and notes (the first ten of each)."""
    console.print(manifest_mod.info_table(manifest))
    if manifest.get("decisions"):
        console.print(manifest_mod.decisions_table(manifest))
    if manifest["skipped"]:
        console.print(manifest_mod.entries_table(manifest["skipped"], "skipped inputs", "reason"))
    if manifest["notes"]:
        console.print(manifest_mod.entries_table(manifest["notes"], "notes", "note"))


def _folder_command(command: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"xd-shard {command}")
    parser.add_argument("folder", help="a folder written by xd-shard")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if command == "info":
        _print_summary(Console(), manifest_mod.load(folder))
        return 0
    checked, problems = manifest_mod.verify(folder)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        print(f"{folder}: {len(problems)} problem(s) in {checked} shard(s)", file=sys.stderr)
        return 1
    print(f"{folder}: {checked} shard(s) match the manifest")
    return 0


def _locate(argv: list[str]) -> int:
    """``xd-shard locate --src NIFTI_FOLDER NAME…``: the files behind the pseudonyms a NIfTI
    pack's messages and manifest name (``P…/S….nii.gz``), for whoever holds the key."""
    parser = argparse.ArgumentParser(
        prog="xd-shard locate",
        description="Print the files below --src behind pseudonyms of a --dataset nifti pack.",
    )
    parser.add_argument("names", nargs="+", help="pseudonyms (P…, S…) or P…/S….nii.gz names")
    parser.add_argument("--src", required=True, help="the NIfTI folder that was packed")
    parser.add_argument("--key-file", default=None, help="the pseudonym key of the pack")
    parser.add_argument("--patient-from", choices=["folder", "file"], default="folder")
    args = parser.parse_args(argv)
    from xdtrain.shards import nifti, pseudonyms

    key_file = Path(args.key_file) if args.key_file else pseudonyms.default_key_file()
    if not key_file.is_file():
        raise UserError(f"--key-file {key_file}: not found; pass the key the pack was made with")
    options = {"_key_file": str(key_file), "labels": None, "label_kind": "auto"}
    options["patient_from"] = args.patient_from
    wanted = [part.split(".")[0] for name in args.names for part in name.split("/") if part]
    found = nifti.locate(Path(args.src), options, wanted)
    for name in wanted:
        for path in found[name] or ["(no file below --src has this pseudonym under this key)"]:
            print(f"{name}\t{path}")
    return 0 if all(found.values()) else 1


def entry() -> None:
    sys.exit(run_cli(main))
