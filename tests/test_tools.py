"""The benchmark scripts run and print the JSON the docs quote (tiny sizes: no timing here)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, demo_args

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
            "--ct-patients",
            "3",
            "--ct-size",
            "small",
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
    ratios = ("marginal_ratio_to_gnu_tar", "marginal_ratio_to_gnu_tar_fsync")
    for key in (*ratios, "marginal_no_fsync_ratio_to_gnu_tar"):
        # tiny sizes: a value (or None when both sizes took equally long), not a measurement
        assert imagenet[key] is None or isinstance(imagenet[key], float)
    assert report["brats_full_size"]["cases"] == 1
    assert report["brats_full_size"]["slices_written"] > 0
    assert report["imagenet_1k_scan_and_plan"]["sources"] == 1000 * 3 + 20
    ct = report["dicom_ct_export"]
    # everything pydicom reads is written but the localizer (3 patients: no duplicate file)
    assert 0 < ct["slices_written"] == ct["slices_read_by_pydicom"] - 1
    assert ct["xd_shard_slices_per_s"] > 0 and ct["pydicom_read_slices_per_s"] > 0
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


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_train_weights_each_row_by_its_time():
    summarise = load_tool("bench_train").summarise
    row = dict(kind="train", loss=1.0)
    rows = [
        {**row, "epoch": 1, "step": 2, "samples_per_s": 1.0, "data_wait": 0.9},  # left out
        {**row, "epoch": 1, "step": 4, "samples_per_s": 8.0, "data_wait": 0.0},  # 1 s, last
        {"kind": "val", "epoch": 1, "step": 4},
        {**row, "epoch": 2, "step": 6, "samples_per_s": 4.0, "data_wait": 0.5},  # 2 s, first
        {**row, "epoch": 2, "step": 8, "samples_per_s": 8.0, "data_wait": 0.1},  # 1 s
        {**row, "epoch": 2, "step": 10, "samples_per_s": 2.0, "data_wait": 0.2},  # 4 s, last
    ]
    report = summarise(rows, global_batch=4)
    assert report["steps"] == 10 and report["rows_used"] == 4
    assert report["samples_per_s"] == 32 / 8  # 32 samples in 1 + 2 + 1 + 4 s
    assert abs(report["data_wait"] - (0.0 + 2 * 0.5 + 0.1 + 4 * 0.2) / 8) < 1e-12
    assert report["samples_per_s_within_epochs"] == 8.0  # only the row ending at step 8
    assert abs(report["data_wait_within_epochs"] - 0.1) < 1e-12
    assert report["max_memory_gib"] is None


def test_bench_train_runs_xd_train_and_prints_its_json(packed, tmp_path):
    settings = demo_args("pt_simclr_imagenet.yaml", packed["imagenet"], tmp_path / "unused")[3:]
    settings += ["--set", "data.batch_size=4", "--set", "train.epochs=2"]
    settings += ["--set", "train.limit_batches=3", "--set", "train.log_every=1"]
    config = str(ROOT / "configs" / "demo" / "pt_simclr_imagenet.yaml")
    done = subprocess.run(
        [sys.executable, str(TOOLS / "bench_train.py"), config, *settings],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(done.stdout)
    assert report["device"] == "cpu" and report["data_device"] == "cpu"
    assert report["image_size"] == 32 and report["batch_size_per_rank"] == 4
    assert report["steps"] == 6 and report["rows_used"] == 5
    assert report["samples_per_s"] > 0 and 0 <= report["data_wait"] <= 1
    assert report["samples_per_s_within_epochs"] > 0


def test_bench_queue_prints_its_json(tmp_path):
    """Reading and reconciling a small grid's jobs file (fake squeue/sacct output)."""
    done = subprocess.run(
        [sys.executable, str(TOOLS / "bench_queue.py"), "--lines", "30", "--tmp", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout)
    assert result["lines"] == 30 and 0 < result["waiting_lines"] < 30
    assert result["read_s"] > 0 and result["reconcile_fake_s"] > 0


def test_demo_cost_counts_what_a_command_wrote_and_each_file_once(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import demo_cost
    finally:
        sys.path.pop(0)
    write = ["dd", "if=/dev/zero", "of=big", "bs=1M", "count=8", "conv=fsync", "status=none"]
    result = demo_cost.timed(write, tmp_path, tmp_path / "log")
    # every byte passed to write() is counted, in this shell's children too
    assert result["wchar_bytes"] >= 8 * 2**20 and result["wall_s"] >= 0
    assert (tmp_path / "big").stat().st_size == 8 * 2**20
    os.link(tmp_path / "big", tmp_path / "same")  # a hard link is the same bytes on disk
    assert demo_cost.folder_bytes(tmp_path) == (tmp_path / "big").stat().st_blocks * 512 + (
        (tmp_path / "log").stat().st_blocks * 512
    )
    with pytest.raises(SystemExit, match="failed"):
        demo_cost.timed(["false"], tmp_path, tmp_path / "log")
