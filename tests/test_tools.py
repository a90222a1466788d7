"""The benchmark scripts run and print the JSON the docs quote (tiny sizes: no timing here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).parent.parent / "tools"


def test_bench_shard_prints_its_json(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(TOOLS / "bench_shard.py"),
            "--images-per-class",
            "2",
            "--cases",
            "1",
            "--repeats",
            "1",
            "--workers",
            "1",
            "--listing-per-class",
            "3",
            "--listing-val",
            "20",
            "--tmp",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(done.stdout)
    imagenet = report["imagenet_copy_through"]
    assert [r["images"] for r in imagenet["runs"]] == [40, 100]  # 10 classes, train + val
    for key in ("marginal_ratio_to_gnu_tar", "marginal_ratio_to_gnu_tar_fsync"):
        # tiny sizes: a value (or None when both sizes took equally long), not a measurement
        assert imagenet[key] is None or isinstance(imagenet[key], float)
    assert report["brats_full_size"]["cases"] == 1
    assert report["brats_full_size"]["slices_written"] > 0
    assert report["imagenet_1k_scan_and_plan"]["sources"] == 1000 * 3 + 20
    assert report["peak_rss_mib_max"] > 0


def test_bench_pipeline_prints_its_json(packed):
    done = subprocess.run(
        [
            sys.executable,
            str(TOOLS / "bench_pipeline.py"),
            "--shards",
            str(packed["imagenet"]),
            "--json",
            "--batch-size",
            "4",
            "--size",
            "32",
            "--batches",
            "2",
            "--warmup",
            "1",
            "--workers",
            "1",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(done.stdout)
    for key in ("dali", "baseline", "decode_bound"):
        assert report[key] > 0
    assert report["cores"] >= 1 and report["device"].startswith("cpu")
    assert report["settings"]["views"] == 2
