"""Per-stage embeddings of encoders on a fixed sample of a split (``xd-analyze features``).

For each sample of a fixed, seeded sample of a split (:func:`xdtrain.data.shardset.sample_of`),
read through the split's evaluation graph, an encoder gives one embedding per stage: the
stage's feature map averaged over space (stem, layer1-4 for a ResNet; the last is the
encoder's output). They are stored beside the encoder, in ``<run>/features/``, as ``.npz``
with the sample keys, the labels and a ``meta`` record of what made them (the weights'
sha256, the shards' manifest sha256, split, sample size, seed, image size, channels): a
rerun with the same inputs reads them back, a changed input computes them again.

Labels are the task's: a class index (``multiclass``), a multi-hot vector (``multilabel``),
or for segmentation data which foreground classes the slice holds (``presence``, a multi-hot
vector over the classes after background), so that kNN and linear probes can ask a frozen
encoder whether it sees a tumour in a slice.

Encoders are ResNets (stages stem, layer1-4) or timm backbones (the feature levels a U-Net
reads, named by their modules, then ``output``, the pooled features;
:func:`xdtrain.models.backbones.stage_embeddings`). An encoder is read with the data's
channel count: weights trained on RGB meet a 4-channel BraTS slice through the same
first-convolution adaptation finetuning uses (:mod:`xdtrain.models.weights`), so the
features are what finetuning starts from.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xdtrain import __version__
from xdtrain.config import DataConfig
from xdtrain.data.batch import label_kind, sample_labels
from xdtrain.errors import UserError
from xdtrain.fileio import atomic_write
from xdtrain.models import backbones, parse_name
from xdtrain.models.encoders import encoder_name_of
from xdtrain.models.weights import encoder_keys, load_encoder, read_state_dict
from xdtrain.shards.tar import file_sha256

log = logging.getLogger("xdtrain.analysis")
FEATURES = "features"  # folder beside the encoder
RANDOM = "random:"  # encoder spec prefix: an untrained network, e.g. random:resnet18


@dataclass(frozen=True)
class Encoder:
    """An encoder to look at: where its weights are, what it is, where its features go."""

    label: str  # how tables and figures name it
    arch: str  # resnet18|34|50 or timm/<name>
    weights: Path | None  # None: randomly initialised (seeded), a baseline
    home: Path | None  # features go to <home>/features/; None: the caller's folder
    sha256: str  # of the weights file; "random-<seed>" for an untrained network


def encoder_source(spec: str | Path, seed: int = 0) -> Encoder:
    """The encoder ``spec`` names: a run folder (its ``encoder.pt``), a weights file
    (``encoder.pt``, a run's ``final.pt``/``last.pt``, a torchvision ResNet state dict) or
    ``random:<resnet18|34|50|timm/name>`` (untrained, seeded). The architecture is the run's
    ``model.name`` when the weights sit in a run folder, else a ResNet told by its blocks.
    :class:`UserError` for anything else."""
    text = str(spec)
    if text.startswith(RANDOM):
        arch = text[len(RANDOM) :]
        backbones.build(arch)  # raises for an unknown name
        return Encoder(f"random-init {arch}", arch, None, None, f"random-{seed}")
    path = Path(text)
    if path.is_dir():
        weights = path / "encoder.pt"
        if not weights.is_file():
            hint = (
                f" (the run has not finished; pass {path / 'last.pt'} to look at it as it is)"
                if (path / "last.pt").is_file()
                else " (pass a run folder written by xd-train, or an encoder.pt)"
            )
            raise UserError(f"{path}: no encoder.pt{hint}")
        label, home = path.resolve().name, path
    elif path.is_file():
        weights, home = path, path.parent
        parent = path.resolve().parent.name
        label = parent if path.name in ("encoder.pt", "final.pt") else f"{parent}/{path.stem}"
    else:
        raise UserError(
            f"{path}: no such run folder or weights file; pass a run folder, an encoder.pt "
            "or random:resnet18"
        )
    arch = run_backbone(home) or encoder_name_of(encoder_keys(read_state_dict(weights)))
    if arch is None:
        raise UserError(
            f"{weights}: not a ResNet-18/34/50 encoder (its layer blocks differ) and no run "
            "config.yaml beside it names the model; pass the run folder that wrote it"
        )
    return Encoder(label, arch, weights, home, file_sha256(weights))


def run_backbone(folder: Path) -> str | None:
    """The encoder named by ``model.name`` in ``folder/config.yaml`` (a run's), or None."""
    import yaml  # noqa: PLC0415

    path = folder / "config.yaml"
    try:
        name = (yaml.safe_load(path.read_text()) or {}).get("model", {}).get("name")
        return parse_name(name)[1] if isinstance(name, str) else None
    except (OSError, yaml.YAMLError, AttributeError, UserError):
        return None


def build(
    encoder: Encoder, channels: int, seed: int = 0, image_size: int | None = None
) -> torch.nn.Module:
    """The encoder network with its weights, for ``channels``-channel input of
    ``image_size`` px (None: the model's default), in eval mode."""
    if encoder.weights is None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = backbones.build(encoder.arch, channels, image_size)
    else:
        net = backbones.build(encoder.arch, channels, image_size)
        report = load_encoder(net, encoder.weights)
        if report.missing:
            raise UserError(
                f"{encoder.weights}: lacks {len(report.missing)} encoder tensors "
                f"({', '.join(report.missing[:3])}); features of a partly random encoder "
                "would mislead"
            )
    return net.eval()


@dataclass
class Features:
    """Embeddings of ``n`` samples: ``stages[name]`` float32 ``[n, C_stage]``, ``keys``
    ``[n]`` str, ``labels`` int64 ``[n]`` (multiclass) or uint8 ``[n, len(classes)]``."""

    stages: dict[str, np.ndarray]
    keys: np.ndarray
    labels: np.ndarray
    classes: list[str]
    meta: dict

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    def save(self, path: Path) -> Path:
        buffer = io.BytesIO()
        arrays = {f"stage_{k}": v for k, v in self.stages.items()}
        np.savez(
            buffer,
            keys=self.keys.astype(str),
            labels=self.labels,
            classes=np.array(self.classes, dtype=str),
            meta=np.array(json.dumps(self.meta)),
            **arrays,
        )
        return atomic_write(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> Features:
        try:
            with np.load(path, allow_pickle=False) as data:
                stages = {k[6:]: data[k] for k in data.files if k.startswith("stage_")}
                meta = json.loads(str(data["meta"]))
                order = meta.get("stages", list(stages))
                return cls(
                    {k: stages[k] for k in order},
                    data["keys"],
                    data["labels"],
                    [str(c) for c in data["classes"]],
                    meta,
                )
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(
                f"{path}: not a features file xd-analyze wrote ({exc}); delete it"
            ) from None


def eval_data(data: DataConfig) -> DataConfig:
    """``data`` read through its evaluation graph: a SimCLR config's views preset becomes
    the plain evaluation preset of its data (what a classifier or U-Net would see)."""
    from xdtrain.data.presets import PRESETS

    preset = PRESETS.get(data.augment)
    if preset is not None and preset.purpose == "simclr":
        data = dataclasses.replace(data, augment="")
    return data


def data_identity(data: DataConfig) -> dict:
    """What identifies the data read: the shard folder and its manifest's sha256."""
    from xdtrain.data import shard_folder

    folder = Path(shard_folder(data)).resolve()
    manifest = folder / "manifest.json"
    digest = file_sha256(manifest) if manifest.is_file() else None
    return {"shards": str(folder), "dataset": data.dataset, "manifest_sha256": digest}


def file_name(data: DataConfig, split: str, samples: int | None, seed: int, enc: Encoder) -> str:
    """``<shard folder>_<split>[_f<fraction>]_<n|all>_s<seed>_<px>px_<c>ch[_<which>].npz``;
    ``which``: the weights file's stem unless it is the run's ``encoder.pt``/``final.pt``,
    ``random-<arch>`` for an untrained encoder (several share a folder)."""
    from xdtrain.data import shard_folder

    size = "all" if samples is None else str(samples)
    tier = f"_f{data.fraction:g}" if split == "train" and data.fraction < 1 else ""
    name = f"{Path(shard_folder(data)).resolve().name}_{split}{tier}_{size}_s{seed}"
    name += f"_{data.image_size}px_{data.channels}ch"
    if enc.weights is None:
        name += f"_random-{enc.arch.replace('/', '-')}"
    elif enc.weights.name not in ("encoder.pt", "final.pt"):
        name += f"_{enc.weights.stem}"
    return name + ".npz"


def extract(
    encoders: Sequence[Encoder],
    data: DataConfig,
    split: str,
    *,
    samples: int | None = None,
    seed: int = 0,
    out: Path | None = None,
    reuse: bool = True,
) -> list[Path]:
    """Features of every encoder on one sample of ``split``, in one pass over the data.

    Written to ``<encoder home>/features/`` (``out/features/`` for an encoder without a home);
    files whose ``meta`` matches are reused (``reuse``). Returns the file of each encoder."""
    from xdtrain.data import resolve_device

    data = eval_data(data)
    targets, todo = [], []
    identity = data_identity(data)
    for enc in encoders:
        home = enc.home if enc.home is not None else out
        if home is None:
            raise ValueError(f"{enc.label}: an encoder without a home needs out=")
        path = Path(home) / FEATURES / file_name(data, split, samples, seed, enc)
        meta = {
            "encoder": enc.label,
            "arch": enc.arch,
            "weights": str(enc.weights.resolve()) if enc.weights else None,
            "weights_sha256": enc.sha256,
            **identity,
            "split": split,
            "sample": samples,
            "seed": seed,
            "image_size": data.image_size,
            "channels": data.channels,
            "augment": data.augment,
            "fraction": data.fraction if split == "train" else 1.0,
            "decoder": f"{data.backend}-{resolve_device(data.device)}",  # GPU decoding differs
            "xdtrain": __version__,
        }
        targets.append(path)
        if reuse and path.is_file() and _same_meta(path, meta):
            continue
        todo.append((enc, path, meta))
    if todo:
        for (_, path, meta), features in zip(
            todo, _run(todo, data, split, samples, seed), strict=True
        ):
            features.meta = meta | {
                "stages": list(features.stages),
                "samples": len(features.keys),
                "label_kind": features.meta["kind"],
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            features.save(path)
    return targets


def _same_meta(path: Path, meta: dict) -> bool:
    """Whether the stored file was made from the same inputs (its ``meta`` only is read)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            saved = json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError):
        return False
    return all(saved.get(k) == v for k, v in meta.items() if k != "xdtrain")


@torch.no_grad()
def _run(todo, data: DataConfig, split: str, samples: int | None, seed: int) -> list[Features]:
    from xdtrain.data import build_loader, resolve_device

    device = torch.device("cuda" if resolve_device(data.device) == "gpu" else "cpu")
    loader = build_loader(data, split, seed=seed, train=False, sample=samples, sample_seed=seed)
    if device.type == "cuda":  # fp32 as on the CPU: no TF32 matrix products or convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    shardset = loader.shardset
    nets = [build(enc, data.channels, seed, data.image_size).to(device) for enc, _, _ in todo]
    names = [backbones.stage_names(net) for net in nets]
    parts: list[list[list[np.ndarray]]] = [[[] for _ in stages] for stages in names]
    keys: list[str] = []
    labels: list[np.ndarray] = []
    kind, classes = label_kind(shardset.layout.kind, list(shardset.classes))
    for batch in loader:
        image = batch["image"].to(device, non_blocking=True)
        for net, part in zip(nets, parts, strict=True):
            for stage, pooled in zip(part, backbones.stage_embeddings(net, image), strict=True):
                stage.append(pooled.cpu().numpy())
        keys += list(batch["keys"])
        labels.append(sample_labels(batch, kind, len(classes)))
    if not keys:
        raise UserError(f"{shardset.folder}: the {split} split gave no sample")
    out = []
    for part, stage_list in zip(parts, names, strict=True):
        stages = {n: np.concatenate(chunks) for n, chunks in zip(stage_list, part, strict=True)}
        out.append(
            Features(stages, np.array(keys), np.concatenate(labels), classes, {"kind": kind})
        )
    return out
