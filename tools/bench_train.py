#!/usr/bin/env python3
"""Training throughput of ``xd-train``: run a config for a few epochs, print JSON.

The figures come from the run's own ``metrics.jsonl``, so they are what a user's run logs:
each train row covers the steps since the row before it, with its samples/s and the share of
that time the loop waited for the next batch. The script leaves out the run's first row
(cuDNN autotuning, the first pipeline's start) and reports:

- ``samples_per_s`` / ``data_wait``: over all remaining rows, epoch boundaries included;
- ``..._within_epochs``: over the rows that hold neither an epoch's first step nor its
  last (during which the next epoch's pipeline is built);
- ``max_memory_gib``: the peak GPU memory of rank 0 (GPU runs only).

A sample is one image (SimCLR: one image, two views). Validation and the final test pass are
not training time and are not counted. With ``--nproc N`` it runs under ``torchrun``.

Example::

    python tools/bench_train.py configs/pt_simclr_imagenet.yaml \\
        --set data.image_size=224 --set train.epochs=3 --set train.log_every=5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarise(rows: list[dict], global_batch: int, skip: int = 1) -> dict:
    """Throughput over the train rows of a run (see the module's doc); ``skip`` first rows
    are left out."""
    train = [r for r in rows if r["kind"] == "train"]
    windows = []
    for before, row, after in zip([None, *train[:-1]], train, [*train[1:], None], strict=True):
        steps = row["step"] - (before["step"] if before else 0)
        samples = steps * global_batch
        windows.append(
            {
                "samples": samples,
                "seconds": samples / row["samples_per_s"],
                "wait": row["data_wait"],
                # an epoch's first step waits for its pipeline; during its last step the
                # next epoch's pipeline is built
                "boundary": before is None
                or before["epoch"] != row["epoch"]
                or after is None
                or after["epoch"] != row["epoch"],
            }
        )
    used = windows[skip:]
    if not used:
        raise SystemExit(f"bench_train: {len(train)} train rows; need more than {skip}")

    def rate(ws):
        if not ws:
            return None, None
        seconds = sum(w["seconds"] for w in ws)
        wait = sum(w["wait"] * w["seconds"] for w in ws) / seconds
        return sum(w["samples"] for w in ws) / seconds, wait

    overall, wait = rate(used)
    inner, inner_wait = rate([w for w in used if not w["boundary"]])
    memory = [r["max_memory_gib"] for r in train if "max_memory_gib" in r]
    return {
        "steps": train[-1]["step"],
        "rows_used": len(used),
        "samples_per_s": overall,
        "data_wait": wait,
        "samples_per_s_within_epochs": inner,
        "data_wait_within_epochs": inner_wait,
        "max_memory_gib": max(memory) if memory else None,
        "last_loss": train[-1]["loss"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="an xd-train config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--nproc", type=int, default=1, help="processes (torchrun when > 1)")
    parser.add_argument("--skip", type=int, default=1, help="first train rows left out")
    parser.add_argument("--run-dir", help="keep the run here (default: a temporary folder)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        run = Path(args.run_dir or Path(tmp) / "run")
        launcher = [sys.executable, "-m", "xdtrain.train"]
        if args.nproc > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            launcher += ["--nproc_per_node", str(args.nproc), "-m", "xdtrain.train"]
        command = [*launcher, args.config, "--run-dir", str(run), "--force"]
        for setting in args.set:
            command += ["--set", setting]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=sys.stderr)
        wall = time.perf_counter() - start
        config = yaml.safe_load((run / "config.yaml").read_text())
        env = json.loads((run / "env.json").read_text())
        data = config["data"]
        report = {
            "config": args.config,
            "settings": args.set,
            "device": env["devices"][0],
            "world_size": env["world_size"],
            "precision": env["precision"],
            "model": config["model"]["name"],
            "image_size": data["image_size"],
            "batch_size_per_rank": data["batch_size"],
            "channels_last": config["train"]["channels_last"],
            "data_device": data["device"]
            if data["device"] != "auto"
            else ("cpu" if env["devices"] == ["cpu"] else "gpu"),
            **summarise(read_rows(run / "metrics.jsonl"), data["batch_size"] * env["world_size"]),
            "wall_s": wall,
        }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
