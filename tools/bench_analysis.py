#!/usr/bin/env python3
"""Cost of feature-space analysis, and of the kNN monitor in a run; prints JSON.

``features``: ``xd-analyze features``' extraction (read a fixed sample through the
evaluation graph, every stage's pooled embedding, the ``.npz`` written) for untrained
encoders of each ``--arch`` on ``--samples`` samples of a shard folder's split, as seconds
per 1,000 samples; the loader's start is included, as a user pays it. Then linear CKA
between two encoders' five stages (5 x 5 matrix), and the kNN and linear probes of every
stage (a train-split bank, the val split as queries).

``--runs DIR``: for every run folder under DIR whose ``metrics.jsonl`` has ``monitor`` rows,
the monitor's seconds against the epoch's training time (from the train rows' samples/s)
and its share of the run's wall time between the first and the last row.

Example::

    python tools/bench_analysis.py --shards shards/chestxray8 \\
        --config configs/demo/ft_chestxray8.yaml --samples 1000 --arch resnet18 \\
        --arch resnet50 --runs checkpoints/demo
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml


def bench_features(args) -> dict:
    from xdtrain.analysis.cka import cka_matrix
    from xdtrain.analysis.cli import load_data
    from xdtrain.analysis.features import Features, encoder_source, extract
    from xdtrain.analysis.measures import probes

    data = load_data(args.config, [f"data.shards={Path(args.shards).resolve()}"])
    if args.image_size:
        data = dataclasses.replace(data, image_size=args.image_size)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            enc = encoder_source(f"random:{arch}")
            start = time.perf_counter()
            (path,) = extract([enc], data, args.split, samples=args.samples, out=Path(tmp))
            seconds = time.perf_counter() - start
            test = Features.load(path)
            n = len(test.keys)
            rng = np.random.default_rng(0)  # a second encoder's features: another object
            noisy = {
                k: v + rng.normal(size=v.shape).astype(v.dtype) for k, v in test.stages.items()
            }
            start = time.perf_counter()
            cka_matrix(test.stages, noisy)
            cka_seconds = time.perf_counter() - start
            # probes: a train-split bank against the val split (never a sample against itself)
            bank = test
            if args.split != "train":
                (bank_path,) = extract([enc], data, "train", samples=args.samples, out=Path(tmp))
                bank = Features.load(bank_path)
            (query_path,) = extract([enc], data, "val", samples=args.samples, out=Path(tmp))
            start = time.perf_counter()
            probes(bank, Features.load(query_path))
            probe_seconds = time.perf_counter() - start
            out[arch] = {
                "samples": n,
                "image_size": data.image_size,
                "seconds": round(seconds, 2),
                "seconds_per_1000": round(seconds / n * 1000, 2),
                "samples_per_s": round(n / seconds, 1),
                "cka_5x5_seconds": round(cka_seconds, 3),
                "probes_seconds": round(probe_seconds, 2),
                "file_mb": round(path.stat().st_size / 2**20, 2),
            }
    return out


def monitor_share(runs: Path) -> dict:
    from xdtrain.runlog import read_metrics

    out = {}
    for metrics in sorted(runs.rglob("metrics.jsonl")):
        rows = read_metrics(metrics)
        watched = [r for r in rows if r["kind"] == "monitor"]
        if not watched:
            continue
        train = [r for r in rows if r["kind"] == "train"]
        epochs = {}
        last_step = 0
        for r in train:  # each train row covers the steps since the row before it
            steps = r["step"] - last_step
            last_step = r["step"]
            batch = r["samples_per_s"]
            epochs.setdefault(r["epoch"], []).append((steps, batch))
        config = metrics.parent / "config.yaml"
        batch_size = yaml.safe_load(config.read_text())["data"]["batch_size"]
        epoch_seconds = [
            sum(s * batch_size / v for s, v in parts) for _, parts in sorted(epochs.items())
        ]
        monitor_seconds = [r["knn_seconds"] for r in watched]
        wall = rows[-1]["time"] - rows[0]["time"]
        metric = "knn_top1" if "knn_top1" in watched[0] else "knn_auroc"
        out[metrics.parent.name] = {
            "metric": metric,
            "by_epoch": {r["epoch"]: round(r[metric], 4) for r in watched},
            "chance": watched[-1]["knn_chance"],
            "monitor_seconds": [round(s, 2) for s in monitor_seconds],
            "train_epoch_seconds": [round(s, 1) for s in epoch_seconds],
            "monitor_share_of_epoch": round(
                float(np.mean(monitor_seconds[1:])) / float(np.mean(epoch_seconds)), 3
            ),
            "monitor_share_of_wall": round(sum(monitor_seconds[1:]) / wall, 3) if wall else None,
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", help="shard folder (features benchmark)")
    parser.add_argument("--config", help="config whose data section reads --shards")
    parser.add_argument("--split", default="test")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--arch", action="append", default=[])
    parser.add_argument("--runs", help="folder of runs with monitor rows")
    args = parser.parse_args()
    result = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(),
        }
    }
    if args.shards:
        result["features"] = bench_features(args)
    if args.runs:
        result["monitor"] = monitor_share(Path(args.runs))
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
