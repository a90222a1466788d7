#!/usr/bin/env python3
"""Packing throughput and memory of xd-shard on full-size synthetic data; prints JSON.

Measures, in one run on the same files:

* ImageNet copy-through images/s of ``xd-shard --workers N``, and of GNU ``tar cf`` over the
  same image files (the speed of merely reading and writing them), and their ratio; also
  against ``tar cf`` followed by ``sync`` of the archive (xd-shard makes every shard durable
  before it records it), and ``xd-shard --no-fsync`` (write-back left to the kernel, as tar
  leaves it) against plain ``tar cf``;
* full-size BraTS cases/s (240x240x155, four modalities) with ``--workers N``;
* a full-size generated hospital CT export (``xd-synth dicom --size full``: 512x512 series of
  about 300 slices, the generator's quirks included: big-endian, RLE, JPEG 2000, multi-frame)
  packed by ``xd-shard --dataset dicom --workers N`` (slices/s, peak RSS), against the bound
  of pydicom reading and decoding the same files to Hounsfield units in N processes without
  writing anything;
* the peak RSS of the largest process of each run (worker processes included: sampled from
  /proc), at two ImageNet sizes, and of scanning and
  planning a full ImageNet-1k listing (1.28 million images), the only part of a run whose
  memory grows with the data set.

Page-cache copies are fast and noisy, so every measurement is the median of interleaved runs
(in an order shuffled anew for each repeat), each after a ``sync``; the marginal rate between
the two ImageNet sizes cancels the fixed costs of a run (interpreter start, imports,
manifest).

Example::

    python tools/bench_shard.py --images-per-class 200 --cases 8 --ct-patients 2 --workers 2 \
        --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from xdtrain.synth import generate

# Runs a command and reports its wall time and the peak RSS of its largest process. Worker
# processes started by a forkserver are not children of the command, and getrusage misses
# them once their parent exits without waiting; so the RSS of every process of the tree is
# also sampled from /proc (every 20 ms) and the larger of the two is reported.
_MEASURE = """
import json, os, resource, subprocess, sys, tempfile, time

def tree(root):
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found

def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0

start = time.perf_counter()
errors = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would stall the command
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=errors)
largest = 0
while process.poll() is None:
    largest = max([largest] + [rss_kib(pid) for pid in tree(process.pid)])
    time.sleep(0.02)
errors.seek(0)
stderr = errors.read()
seconds = time.perf_counter() - start
peak_kib = max(largest, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"rc": process.returncode, "seconds": seconds, "peak_rss_kib": peak_kib,
                  "stderr": stderr.decode()[-2000:]}))
"""


def measure(command: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"{command[0]} failed: {result['stderr']}")
    return result


def xd_shard_command(dataset: str, src: Path, out: Path, workers: int, *extra: str) -> list[str]:
    exe = str(Path(sys.executable).with_name("xd-shard"))
    return [
        exe,
        "--dataset",
        dataset,
        "--src",
        str(src),
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--quiet",
        *extra,
    ]


def warm(folder: Path) -> int:
    """Read every file once so both contenders start from the page cache; return the count."""
    count = 0
    for path in folder.rglob("*"):
        if path.is_file():
            path.read_bytes()
            count += 1
    return count


def _median_runs(commands: dict[str, list[str]], outputs: list[Path], repeats: int) -> dict:
    """Run each command ``repeats`` times, interleaved in shuffled order, after a sync; keep
    the median run.

    The previous run's output is deleted before each run, outside the timing: removing
    hundreds of megabytes is not part of writing them.
    """
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    for repeat in range(repeats):
        # A seeded shuffle per repeat: the file system's state after a run (freed blocks,
        # pages left to write back) affects the run after it, so no contender may always
        # follow the same one.
        names = list(commands)
        random.Random(repeat).shuffle(names)
        for name in names:
            command = commands[name]
            for output in outputs:
                if output.is_dir():
                    shutil.rmtree(output)
                output.unlink(missing_ok=True)
            subprocess.run(["sync"], check=True)
            runs[name].append(measure(command))
    return {name: sorted(r, key=lambda x: x["seconds"])[len(r) // 2] for name, r in runs.items()}


def bench_imagenet(root: Path, sizes: list[int], workers: int, repeats: int) -> dict:
    """Copy-through against GNU tar, end to end at each size and as a marginal rate."""
    rows = []
    for per_class in sizes:
        src = generate(
            "imagenet", root / f"raw-{per_class}", size="full", count=per_class, workers=workers
        )
        images = warm(src / "ILSVRC")
        out = root / f"shards-{per_class}"
        best = _median_runs(
            {
                "tar": ["tar", "cf", str(root / "gnu.tar"), "-C", str(src), "ILSVRC"],
                # tar made as durable as xd-shard makes its shards
                "tar_fsync": [
                    "sh",
                    "-c",
                    f'tar cf "{root}/gnu.tar" -C "{src}" ILSVRC && sync "{root}/gnu.tar"',
                ],
                "xd_shard": xd_shard_command("imagenet", src, out, workers),
                "xd_shard_no_fsync": xd_shard_command("imagenet", src, out, workers, "--no-fsync"),
            },
            [out, root / "gnu.tar"],
            repeats,
        )
        megabytes = sum(p.stat().st_size for p in (src / "ILSVRC").rglob("*.JPEG")) / 1e6
        rows.append(
            {
                "images": images,
                "megabytes": round(megabytes, 1),
                "gnu_tar_seconds": round(best["tar"]["seconds"], 3),
                "xd_shard_seconds": round(best["xd_shard"]["seconds"], 3),
                "gnu_tar_images_per_s": round(images / best["tar"]["seconds"], 1),
                "xd_shard_images_per_s": round(images / best["xd_shard"]["seconds"], 1),
                "ratio_to_gnu_tar": round(best["tar"]["seconds"] / best["xd_shard"]["seconds"], 3),
                "gnu_tar_fsync_seconds": round(best["tar_fsync"]["seconds"], 3),
                "ratio_to_gnu_tar_fsync": round(
                    best["tar_fsync"]["seconds"] / best["xd_shard"]["seconds"], 3
                ),
                "xd_shard_no_fsync_seconds": round(best["xd_shard_no_fsync"]["seconds"], 3),
                "no_fsync_ratio_to_gnu_tar": round(
                    best["tar"]["seconds"] / best["xd_shard_no_fsync"]["seconds"], 3
                ),
                "xd_shard_peak_rss_mib": round(best["xd_shard"]["peak_rss_kib"] / 1024, 1),
            }
        )
        shutil.rmtree(out, ignore_errors=True)
        (root / "gnu.tar").unlink(missing_ok=True)
    small, large = rows[0], rows[-1]
    extra = large["images"] - small["images"]
    tar_rate = _rate(extra, large["gnu_tar_seconds"] - small["gnu_tar_seconds"])
    tar_fsync_rate = _rate(extra, large["gnu_tar_fsync_seconds"] - small["gnu_tar_fsync_seconds"])
    ours_rate = _rate(extra, large["xd_shard_seconds"] - small["xd_shard_seconds"])
    ours_no_fsync_rate = _rate(
        extra, large["xd_shard_no_fsync_seconds"] - small["xd_shard_no_fsync_seconds"]
    )
    return {
        "runs": rows,
        # Fixed costs (interpreter start, imports, manifest) cancel in the difference.
        "marginal_gnu_tar_images_per_s": _round(tar_rate, 1),
        "marginal_xd_shard_images_per_s": _round(ours_rate, 1),
        "marginal_ratio_to_gnu_tar": _ratio(ours_rate, tar_rate),
        "marginal_gnu_tar_fsync_images_per_s": _round(tar_fsync_rate, 1),
        # both leave durable output
        "marginal_ratio_to_gnu_tar_fsync": _ratio(ours_rate, tar_fsync_rate),
        "marginal_xd_shard_no_fsync_images_per_s": _round(ours_no_fsync_rate, 1),
        # both leave write-back to the kernel
        "marginal_no_fsync_ratio_to_gnu_tar": _ratio(ours_no_fsync_rate, tar_rate),
    }


def _rate(extra: int, seconds: float) -> float | None:
    """Images/s of the extra images; None when the sizes are too close to time apart."""
    return extra / seconds if seconds > 0 else None


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return None if ours is None or theirs is None else round(ours / theirs, 3)


_PLAN_MEMORY = """
import argparse, json, resource, sys
from pathlib import Path
from xdtrain.shards import imagenet
from xdtrain.shards.pack import plan_groups, shuffled
from xdtrain.shards.splits import DEFAULT_FRACTIONS, parse_ratios
args = argparse.Namespace(classes=1000, max_side=None, val_share=0.5, check="header", quality=None)
options = imagenet.options(args)
scan = imagenet.scan(Path(sys.argv[1]), options)
groups = plan_groups(imagenet, scan, ratios=parse_ratios("0.7,0.1,0.2"),
                     fractions=DEFAULT_FRACTIONS, seed=0, options=options)
name, largest = max(groups, key=lambda g: len(g[1]))
units = shuffled(largest, 0, name)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"sources": len(scan.sources), "peak_rss_mib": round(peak, 1)}))
"""


def bench_imagenet_1k_plan(root: Path, per_class: int = 1281, val: int = 50_000) -> dict:
    """Peak RSS of scanning and planning a full-size ImageNet-1k listing.

    The tree holds 1.28 million hard links to one small JPEG: real directory entries for the
    scan, no 140 GB of data. What a run keeps per image lives in this phase; the writing phase
    adds a bounded amount (the ``runs`` above).
    """
    from PIL import Image

    src = root / "imagenet-1k-listing"
    image = root / "tiny.JPEG"
    Image.new("RGB", (8, 8)).save(image, quality=90)
    wnids = [f"n{10_000_000 + i:08d}" for i in range(1000)]
    train = src / "ILSVRC/Data/CLS-LOC/train"
    for wnid in wnids:  # file systems cap the links to one file: one JPEG per folder
        (train / wnid).mkdir(parents=True)
        first = train / wnid / f"{wnid}_0.JPEG"
        shutil.copy(image, first)
        for n in range(1, per_class):
            os.link(first, train / wnid / f"{wnid}_{n}.JPEG")
    (src / "ILSVRC/Data/CLS-LOC/val").mkdir(parents=True)
    rows = []
    for n in range(1, val + 1):
        target = src / f"ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_{n:08d}.JPEG"
        if n % 10_000 == 1:
            shutil.copy(image, target)
            first = target
        else:
            os.link(first, target)
        rows.append(f"ILSVRC2012_val_{n:08d},{wnids[n % 1000]} 0 0 7 7")
    (src / "LOC_synset_mapping.txt").write_text("".join(f"{w} class {w}\n" for w in wnids))
    (src / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows))
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _PLAN_MEMORY, str(src)], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    result["seconds"] = round(time.perf_counter() - start, 1)
    shutil.rmtree(src)
    return result


def bench_brats(root: Path, cases: int, workers: int) -> dict:
    src = generate("brats", root / "raw-brats", size="full", count=cases, workers=workers)
    warm(src)
    ours = measure(xd_shard_command("brats", src, root / "shards-brats", workers))
    manifest = json.loads((root / "shards-brats" / "manifest.json").read_text())
    slices = sum(e["samples"] for e in manifest["splits"].values())
    return {
        "cases": cases,
        "slices_written": slices,
        "cases_per_s": round(cases / ours["seconds"], 3),
        "slices_per_s": round(slices / ours["seconds"], 1),
        "peak_rss_mib": round(ours["peak_rss_kib"] / 1024, 1),
    }


# The bound of DICOM packing: pydicom reads every image file, decodes its pixel data and
# applies the modality LUT, in N processes, writing nothing.
_PYDICOM_BOUND = """
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

def frames(path):
    import pydicom
    from pydicom.pixels import apply_modality_lut
    try:
        ds = pydicom.dcmread(path)
    except Exception:
        return 0
    if "PixelData" not in ds or getattr(ds, "Modality", "") != "CT":
        return 0
    hu = apply_modality_lut(ds.pixel_array, ds)
    return hu.shape[0] if hu.ndim == 3 else 1

files = [str(p) for p in sorted(Path(sys.argv[1]).rglob("*")) if p.is_file()]
with ProcessPoolExecutor(int(sys.argv[2])) as pool:
    print(sum(pool.map(frames, files, chunksize=8)), file=sys.stderr)
"""


def bench_dicom(root: Path, patients: int, size: str, workers: int) -> dict:
    src = generate("dicom", root / "raw-dicom", size=size, count=patients, workers=workers)
    files = warm(src)
    key = root / "pseudonym.key"
    ours = measure(
        xd_shard_command(
            "dicom", src, root / "shards-dicom", workers, "--key-file", str(key), "--size", "256"
        )
    )
    manifest = json.loads((root / "shards-dicom" / "manifest.json").read_text())
    slices = sum(e["samples"] for e in manifest["splits"].values())
    bound = measure([sys.executable, "-c", _PYDICOM_BOUND, str(src), str(workers)])
    read = int(bound["stderr"].strip().splitlines()[-1])
    return {
        "patients": patients,
        "size": size,
        "files": files,
        "slices_written": slices,
        "slices_read_by_pydicom": read,
        "xd_shard_slices_per_s": round(slices / ours["seconds"], 1),
        "pydicom_read_slices_per_s": round(read / bound["seconds"], 1),
        "ratio_to_pydicom_read": _ratio(slices / ours["seconds"], read / bound["seconds"]),
        "xd_shard_peak_rss_mib": round(ours["peak_rss_kib"] / 1024, 1),
        "pydicom_read_peak_rss_mib": round(bound["peak_rss_kib"] / 1024, 1),
        "output": "256x256 8-bit PNG, one window (soft)",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images-per-class",
        type=int,
        default=100,
        help="ImageNet images per class (10 classes), also packed at 4x",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement")
    parser.add_argument(
        "--listing-per-class",
        type=int,
        default=1281,
        help="training entries per class of the ImageNet-1k listing",
    )
    parser.add_argument(
        "--listing-val",
        type=int,
        default=50_000,
        help="validation entries of the ImageNet-1k listing",
    )
    parser.add_argument("--cases", type=int, default=8, help="full-size BraTS cases")
    parser.add_argument("--ct-patients", type=int, default=2, help="patients of the CT export")
    parser.add_argument(
        "--ct-size", choices=["full", "small"], default="full", help="small: for tests only"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--only",
        choices=["imagenet", "brats", "dicom", "plan"],
        action="append",
        help="run only these parts (repeatable; default: all)",
    )
    parser.add_argument("--tmp", help="scratch folder (default: a new temporary folder)")
    args = parser.parse_args()
    root = Path(args.tmp or tempfile.mkdtemp(prefix="bench_shard_"))
    root.mkdir(parents=True, exist_ok=True)
    parts = set(args.only or ["imagenet", "brats", "dicom", "plan"])
    imagenet = brats = ct = plan = None
    try:
        if "imagenet" in parts:
            sizes = [args.images_per_class, args.images_per_class * 4]
            imagenet = bench_imagenet(root, sizes, args.workers, args.repeats)
        if "brats" in parts:
            brats = bench_brats(root, args.cases, args.workers)
        if "dicom" in parts:
            ct = bench_dicom(root, args.ct_patients, args.ct_size, args.workers)
        if "plan" in parts:
            plan = bench_imagenet_1k_plan(root, args.listing_per_class, args.listing_val)
    finally:
        if not args.tmp:
            shutil.rmtree(root, ignore_errors=True)
    peaks = [r["xd_shard_peak_rss_mib"] for r in imagenet["runs"]] if imagenet else []
    peaks += [brats["peak_rss_mib"]] if brats else []
    peaks += [ct["xd_shard_peak_rss_mib"]] if ct else []
    report = {
        "benchmark": "bench_shard",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "workers": args.workers,
        "imagenet_copy_through": imagenet,
        "brats_full_size": brats,
        "dicom_ct_export": ct,
        "imagenet_1k_scan_and_plan": plan,
        "peak_rss_mib_max": max(peaks) if peaks else None,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
