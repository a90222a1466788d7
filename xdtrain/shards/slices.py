"""A user's own CT and MR (``--dataset dicom``, ``--dataset nifti``): what both packers share.

The two packers differ only in how they find volumes and read a slice's values
(:mod:`xdtrain.shards.dicom`, :mod:`xdtrain.shards.nifti`). Everything after that is here:
the options, the choice of slices (every slice, ``--slice-stride``, ``--slices-per-series``,
a seeded patient-balanced ``--max-samples`` subset: RadNet-12M against RadNet-1.28M), labels
from a CSV (:mod:`xdtrain.shards.labels`), windows (:mod:`xdtrain.shards.windows`), the
pseudonyms that replace every identifier (:mod:`xdtrain.shards.pseudonyms`) and the samples.

Sample ``S1a2b3c4d5e6f_042`` (series pseudonym, slice index along the series; 3+ digits)::

    img.png     the slice, one channel per window, size x size, 8 or 16 bit
    label.i64   int64 class index (single-label); -1 when packed without --labels
    labels.u8   uint8 multi-hot vector over the classes (multi-label packs, instead)
    json        {"patient", "series", "slice", "slices", "modality", "spacing_mm"}

``patient`` and ``series`` are pseudonyms; no header value that identifies a person, a
study or a series is stored. Slice 0 is the most inferior (axial), most right (sagittal) or
most anterior (coronal) slice; rows and columns follow the radiological view (see
:func:`xdtrain.shards.dicom.canonical_view`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xdtrain.errors import UserError
from xdtrain.rng import rng_for
from xdtrain.shards import labels as labels_mod
from xdtrain.shards import pseudonyms, windows
from xdtrain.shards.base import (
    Layout,
    Sample,
    SkipItem,
    Source,
    float_pair,
    int_bytes,
    json_bytes,
    output_side,
    png_bytes,
)

CT_FILL = -1024.0  # HU of air: pads CT slices to a square
UNLABELLED = -1
components = {
    "img.png": "the slice: one channel per --windows window (8 or 16 bit)",
    "label.i64": "int64 class index; -1 in packs without --labels",
    "labels.u8": "uint8 multi-hot vector over the classes (multi-label packs instead)",
    "json": "patient and series pseudonyms, slice index, slices, modality, spacing",
}


def add_arguments(group) -> None:
    """The options of both own-data packers (added once, with dicom's)."""
    group.add_argument(
        "--windows",
        default="soft",
        help="dicom, nifti: CT windows in HU, / between them: one (greyscale) or three "
        f"(a 3-channel stack); presets {', '.join(windows.PRESETS)} (default soft = "
        "-160,240); e.g. soft/lung/bone or --windows=-1000,400",
    )
    group.add_argument(
        "--modalities",
        default="CT",
        help="dicom, nifti: modalities packed, comma-separated, CT and/or MR (default CT); "
        "nifti files are taken to be the first",
    )
    group.add_argument(
        "--mr-percentiles",
        default="0.5,99.5",
        help="dicom, nifti: MR intensity window per series, low,high percentiles (default "
        "0.5,99.5); every --windows channel of an MR slice gets it",
    )
    group.add_argument(
        "--slice-stride",
        type=int,
        default=1,
        help="dicom, nifti: keep every N-th slice of a series (default 1: all)",
    )
    group.add_argument(
        "--slices-per-series",
        type=int,
        default=None,
        help="dicom, nifti: at most K evenly spaced slices per series",
    )
    group.add_argument(
        "--max-samples",
        type=int,
        default=None,
        help="dicom, nifti: at most M slices in all, shared equally between patients "
        "(seeded by --seed): e.g. a RadNet-1.28M-like subset of a RadNet-12M-like export",
    )
    group.add_argument(
        "--labels",
        default=None,
        help="dicom, nifti: CSV mapping PatientID / StudyInstanceUID / SeriesInstanceUID / file "
        "to label(s) (| between several); without it, packs for SimCLR (no labels)",
    )
    group.add_argument(
        "--label-kind",
        choices=labels_mod.KINDS,
        default="auto",
        help="dicom, nifti: single- or multi-label; auto (default): multi if a cell holds |",
    )
    group.add_argument(
        "--key-file",
        default=None,
        help="dicom, nifti: the secret key of the pseudonyms, kept outside --out (default "
        f"${pseudonyms.KEY_ENV} or ~/.config/xdtrain/pseudonym.key; created on first use)",
    )


def options(args, default_size: int = 256) -> dict:
    """The options both packers read, checked; raises :class:`UserError` for bad values."""
    for option, value in (("--slice-stride", args.slice_stride),):
        if value < 1:
            raise UserError(f"{option} {value}: must be at least 1")
    for option, value in (
        ("--slices-per-series", args.slices_per_series),
        ("--max-samples", args.max_samples),
    ):
        if value is not None and value < 1:
            raise UserError(f"{option} {value}: must be at least 1")
    modalities = sorted({m.strip().upper() for m in args.modalities.split(",") if m.strip()})
    if not modalities or set(modalities) - {"CT", "MR"}:
        raise UserError(f"--modalities {args.modalities}: CT, MR or CT,MR")
    low, high = float_pair(args.mr_percentiles, "--mr-percentiles", "0.5,99.5")
    if not 0 <= low < high <= 100:
        raise UserError(f"--mr-percentiles {args.mr_percentiles}: must lie in 0..100")
    size = output_side(args, default_size)
    labels = str(Path(args.labels).resolve()) if args.labels else None
    if labels and not Path(labels).is_file():
        what = "a folder" if Path(labels).is_dir() else "not found"
        raise UserError(f"--labels {args.labels}: {what}; pass the labels CSV file")
    key_file = Path(args.key_file) if args.key_file else pseudonyms.default_key_file()
    src = Path(args.src or f"datasets/{args.dataset}")
    out = Path(args.out or f"shards/{args.dataset}")
    pseudonyms.check_key_place(key_file, out, src)
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise UserError(
            f"--out {out}: lies inside --src {src}; every file below --src is read as part of "
            "the export: choose an --out outside it"
        )
    return {
        "windows": windows.parse_windows(args.windows),
        "modalities": modalities,
        "mr_percentiles": [low, high],
        "size": size,
        "bits": args.bits or 8,
        "slice_stride": args.slice_stride,
        "slices_per_series": args.slices_per_series,
        "max_samples": args.max_samples,
        "labels": labels,
        "label_kind": args.label_kind,
        "seed": args.seed,
        "_key_file": str(key_file.expanduser().resolve()),
    }


def split_ratios(ratios: dict[str, float], options: dict) -> dict[str, float]:
    return ratios


def layout_of(manifest: dict) -> Layout:
    """How the samples of one own-data shard folder are read: single- or multi-label (or
    unlabelled), one channel per window."""
    record = manifest.get("preprocessing", {})
    channels = len(record.get("windows_hu", [[0, 1]]))
    if record.get("labels", {}).get("kind") == "multi-label":
        return Layout(
            "multilabel",
            "img.png",
            channels,
            "labels.u8",
            "uint8",
            len(manifest["classes"]),
            rgb=False,
        )
    return Layout("multiclass", "img.png", channels, "label.i64", "int64", 1, rgb=False)


# --------------------------------------------------------------------------- scanning


@dataclass
class Context:
    """What a scan of one export needs beyond the files: pseudonyms, scrubber, labels."""

    options: dict
    names: pseudonyms.Pseudonyms
    scrub: pseudonyms.Scrubber
    table: labels_mod.LabelTable | None

    @classmethod
    def open(cls, src: Path, options: dict) -> Context:
        key = pseudonyms.load_key(Path(options["_key_file"]))  # its place: checked by options()
        table = None
        if options["labels"]:
            table = labels_mod.read(options["labels"], options["label_kind"], root=src)
        return cls(options, pseudonyms.Pseudonyms(key), pseudonyms.Scrubber(), table)

    @property
    def classes(self) -> list[str]:
        return self.table.classes if self.table else []


@dataclass
class Volume:
    """One series (or part of one) before selection: its slices in order, and its labels."""

    key: str  # series pseudonym (with a part suffix when a series was split)
    patient: str  # patient pseudonym
    where: str  # scrubbed path for messages and the manifest
    modality: str
    spacing: list[float]  # mm: rows, columns, slices (0 where unknown)
    slices: list  # per slice, whatever the packer's reader needs
    labels: list[tuple[str, ...] | None]  # per slice: class names, None unlabelled
    extra: dict  # packer-specific parameters for encode


def label_decisions(context: Context, unlabelled: int, what: str) -> list[dict]:
    """The manifest's decisions on labels: ``what`` (series, volumes) left out for want of a
    row, and rows that matched no input (a key spelled otherwise than in the export, a path
    not below --src), printed so that a loss is seen. None without --labels."""
    if context.table is None:
        return []
    record = context.table.record()
    return [
        {
            "decision": f"{what} without a labels row",
            "count": unlabelled,
            "detail": "left out (no label); --labels decides what is packed",
        },
        {
            "decision": "labels rows matching nothing",
            "count": record["rows_matching_nothing"],
            "detail": f"of {record['rows']} rows; check their keys (file paths are below --src)",
        },
    ]


def select(volumes: list[Volume], options: dict) -> tuple[list[Volume], dict]:
    """Each volume's kept slice indices (``extra["keep"]``) after ``--slice-stride``,
    ``--slices-per-series`` and ``--max-samples``; volumes with none dropped. Returns the
    kept volumes and the manifest's ``selection`` record."""
    available = 0
    candidates: dict[str, list[int]] = {}
    for volume in volumes:
        kept = [k for k in range(0, len(volume.slices), options["slice_stride"])]
        kept = [k for k in kept if volume.labels[k] is not None]
        per = options["slices_per_series"]
        if per is not None and len(kept) > per:
            kept = [kept[i] for i in _evenly(len(kept), per)]
        available += len(volume.slices)
        candidates[volume.key] = kept
    if options["max_samples"] is not None:
        candidates = _balanced(volumes, candidates, options["max_samples"], options["seed"])
    kept_volumes = []
    for volume in volumes:
        if candidates[volume.key]:
            volume.extra["keep"] = candidates[volume.key]
            kept_volumes.append(volume)
    record = {
        "slice_stride": options["slice_stride"],
        "slices_per_series": options["slices_per_series"],
        "max_samples": options["max_samples"],
        "max_samples_rule": "shared equally between patients, then between a patient's "
        "series; evenly spaced slices within a series; remainders seeded by --seed",
        "slices_found": available,
        "slices_kept": sum(len(v.extra["keep"]) for v in kept_volumes),
        "series_kept": len(kept_volumes),
        "patients_kept": len({v.patient for v in kept_volumes}),
    }
    return kept_volumes, record


def _evenly(n: int, k: int) -> list[int]:
    """``k`` of ``range(n)``, evenly spaced, first and last included when ``k`` > 1."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [n // 2]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _share(sizes: list[int], total: int, rng: np.random.Generator) -> list[int]:
    """Water-filling: at most ``total`` split as equally as ``sizes`` allow; the last few
    units go to members chosen by ``rng``."""
    if sum(sizes) <= total:
        return list(sizes)
    low, high = 0, max(sizes)
    while low < high:  # the largest equal share q with sum(min(size, q)) <= total
        q = (low + high + 1) // 2
        if sum(min(s, q) for s in sizes) <= total:
            low = q
        else:
            high = q - 1
    quota = [min(s, low) for s in sizes]
    left = total - sum(quota)
    open_ = [i for i, s in enumerate(sizes) if s > low]
    for i in rng.permutation(len(open_))[:left].tolist():
        quota[open_[i]] += 1
    return quota


def _balanced(volumes: list[Volume], candidates: dict, total: int, seed: int) -> dict:
    """At most ``total`` slices, shared equally between patients, then between each
    patient's volumes, evenly spaced within a volume."""
    by_patient: dict[str, list[Volume]] = defaultdict(list)
    for volume in volumes:
        by_patient[volume.patient].append(volume)
    patients = sorted(by_patient)
    sizes = [sum(len(candidates[v.key]) for v in by_patient[p]) for p in patients]
    quotas = _share(sizes, total, rng_for(seed, "max-samples"))
    out = {}
    for patient, quota in zip(patients, quotas, strict=True):
        members = sorted(by_patient[patient], key=lambda v: v.key)
        shares = _share(
            [len(candidates[v.key]) for v in members], quota, rng_for(seed, "max-samples", patient)
        )
        for volume, share in zip(members, shares, strict=True):
            kept = candidates[volume.key]
            out[volume.key] = [kept[i] for i in _evenly(len(kept), share)] if share else []
    return out


def sources(volumes: list[Volume], context: Context) -> list[Source]:
    """One :class:`Source` per kept volume; its group is the patient (splits by patient),
    its stratum the patient's first class (single-label packs)."""
    first_class: dict[str, str] = {}
    if context.table is not None and not context.table.multilabel:
        for volume in sorted(volumes, key=lambda v: v.key):
            names = next((n for n in volume.labels if n is not None), None)
            if names:
                first_class.setdefault(volume.patient, names[0])
    out = []
    for volume in volumes:
        keep = volume.extra["keep"]
        if context.table is None:
            stored = [[UNLABELLED]] * len(keep)
        else:
            stored = [context.table.vector(volume.labels[k]) for k in keep]
        params = {
            "input": volume.where,
            "patient": volume.patient,
            "modality": volume.modality,
            "spacing": volume.spacing,
            "depth": len(volume.slices),
            "slices": [volume.slices[k] for k in keep],
            "indices": keep,
            "stored_labels": stored,
            "multilabel": bool(context.table and context.table.multilabel),
            **{k: v for k, v in volume.extra.items() if k != "keep"},
        }
        out.append(
            Source(volume.key, volume.patient, params, stratum=first_class.get(volume.patient, ""))
        )
    return out


def info(context: Context, selection: dict, volumes: list[Volume]) -> dict:
    """The manifest's preprocessing record shared by both packers."""
    options = context.options
    spacings = np.array([v.spacing for v in volumes], np.float64) if volumes else np.zeros((0, 3))
    record = {
        "windows_hu": [list(w) for w in options["windows"]],
        "intensity": {
            "CT": "Hounsfield units (the modality LUT: RescaleSlope/RescaleIntercept), windowed",
            "MR": f"per series, percentiles {options['mr_percentiles']} to the window",
            "photometric": "MONOCHROME1 only inverts the display; values are not inverted",
        },
        "size": options["size"],
        "bits": options["bits"],
        "resize": "padded square (air for CT), area averaging down, bilinear up, before windowing",
        "selection": selection,
        "spacing_mm": _spacing_stats(spacings),
        "labels": _labels_record(context),
        "pseudonyms": {"method": pseudonyms.METHOD, "key_id": context.names.key_id},
        "cases": [v.key for v in volumes],
    }
    return record


def _labels_record(context: Context) -> dict:
    if context.table is None:
        return {"kind": "none"}
    record = context.table.record()
    record["file"] = context.scrub(record["file"])  # a CSV named after a patient
    return record


def _spacing_stats(spacings: np.ndarray) -> dict:
    """Min, median and max of the row, column and slice spacing over the kept series."""
    out = {}
    for axis, name in enumerate(("rows", "columns", "slices")):
        values = spacings[:, axis] if spacings.size else np.zeros(0)
        values = values[values > 0]
        if values.size:
            out[name] = {
                "min": round(float(values.min()), 4),
                "median": round(float(np.median(values)), 4),
                "max": round(float(values.max()), 4),
            }
    return out


# --------------------------------------------------------------------------- encoding


def mr_window(planes: list[np.ndarray], percentiles: list[float]) -> tuple[float, float]:
    """An MR volume's window: the ``percentiles`` (low, high) of all its kept slices."""
    values = np.concatenate([p.ravel() for p in planes]) if planes else np.zeros(1)
    low, high = (float(v) for v in np.percentile(values, percentiles))
    return low, (high if high > low else low + 1.0)


def samples(source: Source, planes: Iterable[np.ndarray], options: dict) -> list[Sample]:
    """The samples of one volume from its kept slices' values (``planes``, in the order of
    ``source.params["indices"]``, each HxW in the canonical view). CT slices are windowed in
    HU as they come, padded with air; an MR volume is read whole first, for its own
    percentile window (every channel the same), padded with its minimum."""
    if source.params["modality"] == "CT":
        chosen, fill = options["windows"], CT_FILL
    else:
        planes = list(planes)
        chosen = [mr_window(planes, options["mr_percentiles"])] * len(options["windows"])
        fill = min((float(p.min()) for p in planes), default=0.0)
    params = source.params
    depth = params["depth"]
    width = max(3, len(str(depth - 1)))
    multilabel = params["multilabel"]
    out = []
    for k, plane, stored in zip(params["indices"], planes, params["stored_labels"], strict=True):
        image = windows.render(plane, chosen, options["size"], options["bits"], fill)
        if multilabel:
            label_part = {"labels.u8": bytes(stored)}
            present = tuple(i for i, v in enumerate(stored) if v)
        else:
            label_part = {"label.i64": int_bytes(stored, np.int64)}
            present = () if stored[0] == UNLABELLED else (stored[0],)
        meta = {
            "patient": params["patient"],
            "series": source.key,
            "slice": k,
            "slices": depth,
            "modality": params["modality"],
            "spacing_mm": params["spacing"],
        }
        parts = {"img.png": png_bytes(image), **label_part, "json": json_bytes(meta)}
        out.append(Sample(f"{source.key}_{k:0{width}d}", parts, present))
    return out


def finite(values: np.ndarray, where: str) -> None:
    """Refuse NaN or infinite values (a broken export or conversion): raises ``SkipItem``."""
    if not np.isfinite(values).all():
        raise SkipItem(f"{where}: holds NaN or infinite values; the series is skipped")


def rounded(values, digits: int = 4) -> list[float]:
    return [round(float(v), digits) if math.isfinite(float(v)) else 0.0 for v in values]
