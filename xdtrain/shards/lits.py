"""LiTS 2017: liver and tumour CT slices, split by volume, from either release.

* NIfTI release (``volume-N.nii``, ``segmentation-N.nii``): Hounsfield units windowed to
  ``--window`` (default -200,250) and scaled to 8 or 16 bit; volumes are read in slabs, so
  memory stays bounded for the longest scans. The release mixes voxel orientations (RAS and
  LPS volumes, masks whose affine differs from their volume's): volume and mask are each
  brought to LPS from their own affine and must then agree in world space (or, with
  ``--geometry image``, the mask takes the volume's affine); see :mod:`xdtrain.shards.orientation`.
* Kaggle PNG release (``volume-N_K.png``, ``segmentation-N_livermask_K.png``,
  ``segmentation-N_lesionmask_K.png``): already windowed 8-bit slices; the two masks are
  merged, tumour winning over liver. A CT slice stored in colour is reduced to one channel
  and noted (lossless when its channels are equal).

Sample ``volume-3_042`` (volume, slice index; at least three digits)::

    img.png    1-channel CT slice
    mask.png   uint8: 0 background, 1 liver, 2 tumour
    pos.i32    int32 [volume index in the manifest's ``cases``, slice index, slices in volume]
    json       {"case", "slice", "slices"}

Slices are stored at the file's own grid (never resampled). The manifest's
``preprocessing.case_spacing_mm`` holds each volume's voxel size in mm, in the order of
``cases`` and of a rebuilt volume's axes (slice, PNG row, PNG column: LPS axes 2, 1, 0), from
the CT volume's affine; null for the PNG release, which stores no spacing.

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
from xdtrain.shards import orientation
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
    return {
        "release": args.release,
        "window": [lo, hi],
        "slices": slices,
        "bits": args.bits or 8,
        "geometry": args.geometry,
    }


def split_ratios(ratios: dict[str, float], options: dict) -> dict[str, float]:
    return ratios


def scan(src: Path, options: dict) -> Scan:
    """Find the release's files; for the NIfTI release, read and check every header."""
    niftis = [Path(p) for p in walk(src, NIFTI.fullmatch)]
    pngs = [Path(p) for p in walk(src, PNG.fullmatch)]
    release = options["release"]
    if release == "auto":
        if niftis and pngs:
            raise UserError(f"{src}: holds both LiTS releases; pass --release nifti or png")
        release = "nifti" if niftis else "png" if pngs else None
    if release is None or not (niftis if release == "nifti" else pngs):
        raise UserError(f"{src}: no LiTS volume-N.nii or volume-N_K.png files found; check --src")
    if release == "nifti":
        sources, skipped, notes = _scan_nifti(src, niftis, options["geometry"])
    else:
        (sources, skipped), notes = _scan_png(src, pngs), []
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
    }
    if release == "nifti":
        original = {s.key: s.params["orientation"] for s in sources}
        reoriented = sum(s.params["reoriented"] for s in sources)
        info["geometry"] = orientation.GEOMETRY[options["geometry"]]
        info["orientation"] = orientation.orientation_record(original, reoriented)
        info["slice_axis"] = (
            "axial: LPS axis 2 (slice 0 most inferior); PNG rows are LPS axis 1 (anterior at "
            "the top), columns LPS axis 0 (the patient's right on the left)"
        )
        info["case_spacing_mm"] = [s.params["spacing_mm"] for s in sources]
    else:
        info["slice_axis"] = "as stored in the PNGs"
        info["case_spacing_mm"] = None  # the PNG release stores no voxel size
    return Scan(sources, CLASSES, skipped, notes, info)


def _scan_nifti(src: Path, files: list[Path], geometry: str):
    """(sources, skipped, notes) of the NIfTI release: volume/segmentation pairs whose headers
    agree in world space (``geometry``: see :func:`xdtrain.shards.orientation.read_case`)."""
    found: dict[int, dict[str, Path]] = defaultdict(dict)
    for path in files:
        kind, number, _ = NIFTI.fullmatch(path.name).groups()
        found[int(number)][kind] = path
    sources, skipped, notes = [], [], []
    for number in sorted(found):
        pair = found[number]
        if set(pair) != {"volume", "segmentation"}:
            have = next(iter(pair.values()))
            lacking = "segmentation" if "volume" in pair else "volume"
            skipped.append({"input": rel(have, src), "reason": f"no matching {lacking} file"})
            continue
        where = rel(pair["volume"], src)
        try:
            case = orientation.read_case({k: pair[k] for k in ("volume", "segmentation")}, geometry)
        except SkipItem as exc:
            skipped.append({"input": where, "reason": str(exc)})
            continue
        notes += [{"input": where, "note": note} for note in case.notes]
        key = f"volume-{number}"
        params = {
            "input": where,
            "volume": str(pair["volume"]),
            "segmentation": str(pair["segmentation"]),
            "transforms": case.transforms(),
            "orientation": case.image.codes,
            "reoriented": case.reoriented,
            "spacing_mm": _volume_spacing(case.image.spacing),
        }
        sources.append(Source(key, key, params))
    return sources, skipped, notes


def _volume_spacing(spacing) -> list[float]:
    """Voxel size in mm along a rebuilt volume's axes (slice, PNG row, PNG column) from the
    (3,) size along LPS axes 0, 1, 2: a PNG is ``volume[:, :, k].T``, as in BraTS. Rounded
    to 1e-6 mm."""
    return [round(float(spacing[axis]), 6) for axis in (2, 1, 0)]


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
    for k, image, mask, depth, note in planes:
        if not thin or mask.any():
            sample = slice_sample(source, k, depth, image, mask, {})
            sample.note = note
            samples.append(sample)
    return samples


def _nifti_planes(source: Source, options: dict):
    """Yield (k, image, mask, depth, None) per axial slice in the LPS orientation (k = 0 most
    inferior), reading volume and segmentation slab by slab."""
    transforms = source.params["transforms"]
    volume = orientation.open_image(source.params["volume"], "volume")
    seg = orientation.open_image(source.params["segmentation"], "segmentation")
    lo, hi = options["window"]
    depth = orientation.canonical_depth(volume.shape, transforms["volume"])
    slabs = zip(
        orientation.canonical_slabs(volume, transforms["volume"], SLAB, "volume"),
        orientation.canonical_slabs(seg, transforms["segmentation"], SLAB, "segmentation"),
        strict=True,
    )
    for (k0, hu), (_, labels) in slabs:
        values = set(np.unique(labels).tolist())
        if not values <= {0, 1, 2}:
            raise SkipItem(f"segmentation holds labels {sorted(values - {0, 1, 2})} outside 0/1/2")
        image = quantise((hu.astype(np.float32) - lo) / (hi - lo), options["bits"])
        mask = labels.astype(np.uint8)
        for i in range(hu.shape[2]):
            yield k0 + i, image[:, :, i].T, mask[:, :, i].T, depth, None


def _png_planes(source: Source):
    """Yield (k, image, mask, depth, note) per slice of the PNG release; ``note`` says how
    a CT slice not stored as greyscale was reduced to one channel."""
    slices = source.params["slices"]
    depth = slices[-1][0] + 1
    folder = Path(source.params["input"]).parent
    for k, ct_path, liver_path, lesion_path in slices:
        (ct, how), (liver, _), (lesion, _) = (
            _read_png(p) for p in (ct_path, liver_path, lesion_path)
        )
        if not (ct.shape == liver.shape == lesion.shape):
            raise SkipItem(
                f"slice {k}: CT {ct.shape} and masks {liver.shape}, {lesion.shape} differ in size"
            )
        mask = np.zeros(ct.shape, np.uint8)
        mask[liver > 0] = 1
        mask[lesion > 0] = 2
        note = None if how is None else {"input": str(folder / Path(ct_path).name), "note": how}
        yield k, ct, mask, depth, note


def _read_png(path: str) -> tuple[np.ndarray, str | None]:
    """A PNG slice as H×W uint8 greyscale (Pillow's ``convert("L")``), and, unless it was
    stored as 8-bit greyscale, how it was reduced. Raises :class:`SkipItem` if undecodable."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L")), _reduction(image)
    except DECODE_ERRORS as exc:
        raise SkipItem(f"{Path(path).name}: cannot decode image ({str(exc)[:60]})") from None


def _reduction(image: Image.Image) -> str | None:
    """How ``convert("L")`` reduces ``image`` to one channel, for the manifest's notes."""
    if image.mode == "L":
        return None
    if image.mode not in ("RGB", "RGBA"):
        return f"{image.mode} PNG converted to 8-bit greyscale"
    rgb = np.asarray(image.convert("RGB"))
    if (rgb == rgb[..., :1]).all():
        return f"{image.mode} PNG with equal colour channels stored as one channel (lossless)"
    return (
        f"{image.mode} PNG with differing colour channels reduced to its luminance "
        "(0.299 R + 0.587 G + 0.114 B)"
    )


def cpu_bound(options: dict) -> bool:
    return True
