"""What ``xd-train`` checks before its first step: everything the run will read.

A run must never train for hours and then fail on something it could have known at the
start, nor "train" on a configuration that cannot learn. :func:`check_config` needs no file;
:func:`check_inputs` reads only manifests and the encoder weights, never a sample. Every
problem is a :class:`~xdtrain.errors.UserError` of one line naming the file or key and what
to do.
"""

from __future__ import annotations

import logging
import math

from xdtrain.data import check_channels, shard_folder
from xdtrain.data.shardset import ShardSet, batch_advice, open_split
from xdtrain.errors import UserError
from xdtrain.shards import manifest as manifests

log = logging.getLogger("xdtrain.preflight")
SPLITS = ("train", "val", "test")
NO_FINDING = "No Finding"  # ChestX-ray8's output that is no finding
STRIDE = 32  # the ResNet encoders' total stride


def check_config(config, task, world, source: str) -> None:
    """Refuse settings that cannot learn, before any file is read.

    SimCLR's NT-Xent contrasts each view with the other ``2N - 2`` views of its batch (Chen
    et al. 2020, eq. 1): with one sample per rank and the local loss there is no negative,
    the loss is exactly 0 and nothing is learned. ``world``: the ranks
    (:class:`xdtrain.distributed.World`); ``source``: the config file, named in messages.
    """
    data, world_size = config.data, world.size
    if config.train.sync_bn and world_size > 1 and world.device.type != "cuda":
        # torch refuses it only when DDP wraps the model, with a raw ValueError
        raise UserError(
            f"{source}: train.sync_bn: SyncBatchNorm needs CUDA devices, but the "
            f"{world_size} ranks run on CPU; set train.sync_bn: false on CPU "
            "(--set train.sync_bn=false)"
        )
    if task.model_kind == "simclr" and data.batch_size < 2 and not config.loss.gather:
        raise UserError(
            f"data.batch_size {data.batch_size}: SimCLR needs at least 2 samples per rank (each "
            "view's negatives are the other samples of its batch); set data.batch_size=2 or more"
        )
    if task.model_kind == "simclr" and data.batch_size * world_size < 2:
        raise UserError(
            "data.batch_size 1 on 1 rank: SimCLR needs at least 2 samples per step; "
            "set data.batch_size=2 or more"
        )
    _check_batch_norm(config, world_size)
    _check_model_input(config, task)
    if config.run.mlflow:
        from xdtrain.mlflow_log import check_installed

        check_installed()


def _check_model_input(config, task) -> None:
    """The image size against the network: a ViT's patch size or a fixed-size timm model's
    size (tried on a zero image), a U-Net's multiple of its deepest reduction."""
    from xdtrain.models import backbones, parse_name  # noqa: PLC0415  (torch, timm: slow)
    from xdtrain.models.unet import check_unet_encoder, check_unet_size  # noqa: PLC0415

    size = config.data.image_size
    _, backbone = parse_name(config.model.name)
    if backbone.startswith("timm/"):
        encoder = backbones.build(backbone, config.data.channels, size)
        if task.model_kind == "unet":
            check_unet_encoder(encoder, size)
    elif task.model_kind == "unet":
        check_unet_size(backbone, STRIDE, size)


def _check_batch_norm(config, world_size: int) -> None:
    """Batch norm in training mode needs two values per channel: the ResNet's last stage
    sees ``batch_size x (image_size / 32)^2`` of them per rank (all ranks with SyncBN)."""
    data = config.data
    if config.model.frozen_encoder:
        return  # frozen batch-norm statistics
    side = math.ceil(data.image_size / STRIDE)
    ranks = world_size if config.train.sync_bn else 1
    if data.batch_size * side * side * ranks >= 2:
        return
    raise UserError(
        f"data.batch_size {data.batch_size} at data.image_size {data.image_size}: the encoder's "
        f"last batch-norm layers would see one value per channel ({data.batch_size} sample x "
        f"{side}x{side}), which batch norm cannot train on; set data.batch_size=2 or more, or "
        f"data.image_size={2 * STRIDE} or more"
    )


def check_inputs(config, task, world_size: int) -> dict[str, ShardSet]:
    """Open every split the run will read and check that the run can learn and be scored.

    Returns the :class:`ShardSet` of ``train``, ``val`` and ``test`` (train at
    ``data.fraction``). Raises :class:`UserError` for a missing split, shard or fraction
    tier, channels the images lack, a training tier smaller than one batch per rank, a
    training split without two classes (classification) or any foreground (segmentation), an
    empty val or test split, and unreadable encoder weights.
    """
    data = config.data
    folder = shard_folder(data)
    splits = {}
    for split in SPLITS:
        shardset = open_split(
            folder, data.dataset, split, data.fraction if split == "train" else 1.0
        )
        check_channels(data, shardset)
        splits[split] = shardset
    manifest = manifests.load(folder)
    _check_train_size(splits["train"], data, task, world_size)
    if task.model_kind != "simclr":
        _check_task_fits(manifest, splits["train"], task)
        _check_labels(manifest, splits["train"], data)
    for split in ("val", "test"):
        if splits[split].samples == 0:
            raise UserError(
                f"{folder}/manifest.json: the {split} split holds no sample, so nothing can be "
                "scored; repack with larger --splits shares or more data"
            )
    weights = config.model.encoder_weights
    if weights:
        from xdtrain.models.weights import read_state_dict

        state = read_state_dict(weights)  # one-line errors for a missing or unreadable file
        broken = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
        if broken:
            raise UserError(
                f"{weights}: {len(broken)} tensor(s) hold NaN or infinite values (first: "
                f"{broken[0]}); the run that wrote them diverged: pass other weights"
            )
    return splits


def _check_train_size(train: ShardSet, data, task, world_size: int) -> None:
    where = f"{train.folder}/manifest.json"
    tier = f" at data.fraction {data.fraction:g}" if data.fraction < 1.0 else ""
    if train.samples == 0:
        advice = (
            "pick a larger data.fraction"
            if tier
            else "`xd-shard info` lists what was skipped; repack with more data"
        )
        raise UserError(f"{where}: the training split holds no sample{tier}; {advice}")
    per_rank = train.samples // world_size
    if per_rank >= data.batch_size:
        return
    smallest = 2 if task.model_kind == "simclr" else 1
    ranks = f"{world_size} ranks" if world_size > 1 else "1 rank"
    advice = batch_advice(train.samples, world_size, smallest)
    if tier:
        advice += ", or pick a larger data.fraction"
    raise UserError(
        f"{where}: the training split holds {train.samples} sample(s){tier}, fewer than one "
        f"batch of {data.batch_size} per rank on {ranks}; {advice}"
    )


def tier_classes(manifest: dict, fraction: float) -> dict[str, int]:
    """Samples per class in the training shards of ``fraction`` (class name -> count); the
    whole split's counts for manifests that do not count per shard (xdtrain 0.2 and older)."""
    entry = manifest["splits"]["train"]
    names = manifest["classes"]
    kept = set(manifests.shards(manifest, "train", fraction))
    shards = [s for s in entry["shards"] if s["name"] in kept]
    if any("classes" not in s for s in shards):
        return dict(entry.get("classes", {}))
    counts = dict.fromkeys(names, 0)
    for shard in shards:
        for index, n in shard["classes"].items():
            counts[names[int(index)]] += n
    return counts


def _check_task_fits(manifest: dict, train: ShardSet, task) -> None:
    """A classifier needs labelled shards of a classification layout, a U-Net masks."""
    where = f"{train.folder}/manifest.json"
    kind = train.layout.kind
    if task.model_kind == "classifier" and kind == "segmentation":
        raise UserError(
            f"{where}: {manifest['dataset']} shards hold segmentation masks; task "
            f"{task.name!r} classifies: pick a segmentation task or other shards"
        )
    if task.model_kind == "unet" and kind != "segmentation":
        raise UserError(f"{where}: {manifest['dataset']} shards hold no masks for {task.name!r}")
    if task.model_kind == "classifier" and not manifest.get("classes"):
        raise UserError(
            f"{where}: packed without labels (for SimCLR); finetuning needs them: repack "
            "with --labels CSV into another --out"
        )


def _check_labels(manifest: dict, train: ShardSet, data) -> None:
    """The training tier must hold something to learn: two classes, a positive finding, or
    foreground."""
    counts = tier_classes(manifest, data.fraction)
    where = f"{train.folder}/manifest.json"
    kind = train.layout.kind
    present = [name for name, n in counts.items() if n > 0]
    tier = f" at data.fraction {data.fraction:g}" if data.fraction < 1.0 else ""
    if kind == "multiclass" and len(present) < 2:
        raise UserError(
            f"{where}: the training split{tier} holds {len(present)} class(es) "
            f"({', '.join(present) or 'none'}); a classifier needs at least 2: "
            + ("pick a larger data.fraction or " if tier else "")
            + "repack with more classes (--classes) or more data"
        )
    if kind == "multilabel":
        unit = "film" if manifest["dataset"] == "chestxray8" else "sample"
        outputs = [name for name in counts if name != NO_FINDING]
        findings = [name for name in outputs if counts[name] > 0]
        if not findings:
            raise UserError(
                f"{where}: no training {unit}{tier} holds any finding; nothing can be learned: "
                + ("pick a larger data.fraction or " if tier else "")
                + "repack with more data"
            )
        absent = [name for name in outputs if counts[name] == 0]
        if absent:
            log.warning(
                "%s: no training %s holds %s; those outputs cannot be learned",
                where,
                unit,
                ", ".join(absent),
            )
    if kind == "segmentation" and not any(n > 0 for n in list(counts.values())[1:]):
        raise UserError(
            f"{where}: no training slice{tier} holds any foreground label; nothing can be "
            "segmented: "
            + ("pick a larger data.fraction or " if tier else "")
            + "repack with volumes that hold the target"
        )
