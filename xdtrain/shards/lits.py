"""LiTS 2017: liver and tumour CT slices, split by volume, from either release.

* NIfTI release (``volume-N.nii``, ``segmentation-N.nii``): Hounsfield units windowed to
  ``--window`` (default -200,250) and scaled to 8 or 16 bit; volumes are read in slabs, so
  memory stays bounded for the longest scans.
* Kaggle PNG release (``volume-N_K.png``, ``segmentation-N_livermask_K.png``,
  ``segmentation-N_lesionmask_K.png``): already windowed 8-bit slices; the two masks are
  merged, tumour winning over liver.

Sample ``volume-3_042`` (volume, slice index; at least three digits)::

    img.png    1-channel CT slice
    mask.png   uint8: 0 background, 1 liver, 2 tumour
    pos.i32    int32 [volume index in the manifest's ``cases``, slice index, slices in volume]
    json       {"case", "slice", "slices"}

``--slices liver`` (default) keeps the training split's slices that hold liver or tumour;
``all`` keeps every slice. Validation and test volumes always keep every slice: selecting by
the ground truth would let the labels decide what is scored (a false positive on a slice
without liver would never count). A volume with an unreadable slice or slab is skipped whole:
per-case metrics need every slice.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from xdtrain.errors import UserError
from xdtrain.shards.base import (
    DECODE_ERRORS,
    SLICE_SELECTION,
    Layout,
    Sample,
    Scan,
    SkipItem,
    Source,
    float_pair,
    quantise,
    rel,
    slice_sample,
    slices_option,
    thins,
    walk,
)

name = "lits"
volumetric = True
groups_are_keys = False
CLASSES = ["background", "liver", "tumour"]
components = {
    "img.png": "1-channel CT slice (8 or 16 bit)",
    "mask.png": "uint8 labels 0 background, 1 liver, 2 tumour",
    "pos.i32": "int32 [volume index, slice index, slices in volume]",
    "json": "volume id, slice index, slices in volume",
}
layout = Layout("segmentation", "img.png", 1, "pos.i32", "int32", 3, mask="mask.png")
NIFTI = re.compile(r"(volume|segmentation)-(\d+)\.nii(\.gz)?")
PNG = re.compile(r"(?:volume-(\d+)_(\d+)|segmentation-(\d+)_(livermask|lesionmask)_(\d+))\.png")
SLAB = 32  # slices read at a time from a NIfTI volume


def add_arguments(group) -> None:
    group.add_argument(
        "--release",
        choices=["auto", "nifti", "png"],
        default="auto",
        help="LiTS: which release --src holds (default: detect)",
    )
    group.add_argument(
        "--window",
        default="-200,250",
        help="LiTS NIfTI: Hounsfield window low,high (default -200,250; write --window=-100,200)",
    )


def options(args) -> dict:
    lo, hi = float_pair(args.window, "--window", "-200,250")
    slices = slices_option(args, "LiTS", ("liver", "all"))
    return {"release": args.release, "window": [lo, hi], "slices": slices, "bits": args.bits or 8}


def split_ratios(ratios: dict[str, float], options: dict) -> dict[str, float]:
    return ratios


def scan(src: Path, options: dict) -> Scan:
    niftis = [Path(p) for p in walk(src, NIFTI.fullmatch)]
    pngs = [Path(p) for p in walk(src, PNG.fullmatch)]
    release = options["release"]
    if release == "auto":
        if niftis and pngs:
            raise UserError(f"{src}: holds both LiTS releases; pass --release nifti or png")
        release = "nifti" if niftis else "png" if pngs else None
    if release is None or not (niftis if release == "nifti" else pngs):
        raise UserError(f"{src}: no LiTS volume-N.nii or volume-N_K.png files found; check --src")
    sources, skipped = (_scan_nifti if release == "nifti" else _scan_png)(src, niftis or pngs)
    for index, source in enumerate(sources):
        source.params["case_index"] = index
        source.params["release"] = release
    info = {
        "release": release,
        "window_hu": options["window"] if release == "nifti" else "as stored in the PNGs",
        "bits": options["bits"] if release == "nifti" else 8,
        "slices": options["slices"],
        "slice_selection": SLICE_SELECTION,
        "mask": "liver 1, tumour 2 (tumour wins where the PNG masks overlap)",
        "cases": [s.key for s in sources],
        "slice_axis": "axial (NIfTI axis 2); PNG rows are NIfTI axis 1, columns axis 0",
    }
    return Scan(sources, CLASSES, skipped, [], info)


def _scan_nifti(src: Path, files: list[Path]):
    found: dict[int, dict[str, Path]] = defaultdict(dict)
    for path in files:
        kind, number, _ = NIFTI.fullmatch(path.name).groups()
        found[int(number)][kind] = path
    sources, skipped = [], []
    for number in sorted(found):
        pair = found[number]
        if set(pair) != {"volume", "segmentation"}:
            have = next(iter(pair.values()))
            lacking = "segmentation" if "volume" in pair else "volume"
            skipped.append({"input": rel(have, src), "reason": f"no matching {lacking} file"})
            continue
        key = f"volume-{number}"
        sources.append(
            Source(
                key,
                key,
                {
                    "input": rel(pair["volume"], src),
                    "volume": str(pair["volume"]),
                    "segmentation": str(pair["segmentation"]),
                },
            )
        )
    return sources, skipped


def _scan_png(src: Path, files: list[Path]):
    slices: dict[int, dict[int, dict[str, Path]]] = defaultdict(lambda: defaultdict(dict))
    for path in files:
        v, k, sv, kind, sk = PNG.fullmatch(path.name).groups()
        if v is not None:
            slices[int(v)][int(k)]["ct"] = path
        else:
            slices[int(sv)][int(sk)][kind] = path
    sources, skipped = [], []
    for number in sorted(slices):
        kept = []
        for k in sorted(slices[number]):
            parts = slices[number][k]
            lacking = [p for p in ("ct", "livermask", "lesionmask") if p not in parts]
            if lacking:
                have = next(iter(parts.values()))
                skipped.append(
                    {
                        "input": rel(have, src),
                        "reason": f"slice {k} of volume {number} lacks {', '.join(lacking)}",
                    }
                )
                continue
            kept.append((k, str(parts["ct"]), str(parts["livermask"]), str(parts["lesionmask"])))
        if kept:
            key = f"volume-{number}"
            first = Path(kept[0][1])
            sources.append(
                Source(
                    key, key, {"input": rel(first.parent, src) + f"/{key}_*.png", "slices": kept}
                )
            )
    return sources, skipped


def encode(source: Source, options: dict) -> list[Sample]:
    if source.params["release"] == "nifti":
        planes = _nifti_planes(source, options)
    else:
        planes = _png_planes(source)
    thin = options["slices"] == "liver" and thins(source)
    samples = []
    for k, image, mask, depth in planes:
        if not thin or mask.any():
            samples.append(slice_sample(source, k, depth, image, mask, {}))
    return samples


def _nifti_planes(source: Source, options: dict):
    """Yield (k, image, mask, depth) per axial slice, reading the volumes slab by slab."""
    import nibabel as nib  # imported on use: packing ImageNet does not need it

    try:
        volume = nib.load(source.params["volume"], keep_file_open=True)
        seg = nib.load(source.params["segmentation"], keep_file_open=True)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise SkipItem(f"unreadable NIfTI ({type(exc).__name__}: {str(exc)[:80]})") from None
    if volume.shape != seg.shape or len(volume.shape) != 3:
        raise SkipItem(f"volume {volume.shape} and segmentation {seg.shape} differ in shape")
    lo, hi = options["window"]
    depth = volume.shape[2]
    for z0 in range(0, depth, SLAB):
        z1 = min(depth, z0 + SLAB)
        try:
            hu = np.asarray(volume.dataobj[:, :, z0:z1], dtype=np.float32)
            labels = np.asarray(seg.dataobj[:, :, z0:z1])
        except Exception as exc:
            raise SkipItem(
                f"unreadable NIfTI data ({type(exc).__name__}: {str(exc)[:80]})"
            ) from None
        values = set(np.unique(labels).tolist())
        if not values <= {0, 1, 2}:
            raise SkipItem(f"segmentation holds labels {sorted(values - {0, 1, 2})} outside 0/1/2")
        image = quantise((hu - lo) / (hi - lo), options["bits"])
        mask = labels.astype(np.uint8)
        for i in range(z1 - z0):
            yield z0 + i, image[:, :, i].T, mask[:, :, i].T, depth


def _png_planes(source: Source):
    slices = source.params["slices"]
    depth = slices[-1][0] + 1
    for k, ct_path, liver_path, lesion_path in slices:
        ct, liver, lesion = (_read_png(p) for p in (ct_path, liver_path, lesion_path))
        if not (ct.shape == liver.shape == lesion.shape):
            raise SkipItem(
                f"slice {k}: CT {ct.shape} and masks {liver.shape}, {lesion.shape} differ in size"
            )
        mask = np.zeros(ct.shape, np.uint8)
        mask[liver > 0] = 1
        mask[lesion > 0] = 2
        yield k, ct, mask, depth


def _read_png(path: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L"))
    except DECODE_ERRORS as exc:
        raise SkipItem(f"{Path(path).name}: cannot decode image ({str(exc)[:60]})") from None


def cpu_bound(options: dict) -> bool:
    return True
