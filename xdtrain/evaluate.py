"""Scoring a model on a split: the loop ``xd-train`` runs every epoch and at the end."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from xdtrain import distributed
from xdtrain.tasks import Task

log = logging.getLogger("xdtrain.evaluate")


@dataclass(frozen=True)
class Precision:
    """Autocast settings: ``dtype`` None runs in float32; ``fp16`` also needs a GradScaler."""

    device_type: str
    dtype: torch.dtype | None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def precision(amp: str, device: torch.device) -> Precision:
    """``auto``: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return Precision(device.type, None)
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return Precision(device.type, torch.bfloat16 if amp == "bf16" else torch.float16)


def to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    """Tensors of ``batch`` on ``device``; 4-D images in channels-last memory layout."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if channels_last and value.ndim == 4 and value.is_floating_point():
                value = value.contiguous(memory_format=torch.channels_last)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            value = [to_device({"v": v}, device, channels_last)["v"] for v in value]
        out[key] = value
    return out


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    task: Task,
    classes: list[str],
    config,
    device: torch.device,
    amp: Precision,
    limit: int | None = None,
    collect=None,
    metrics=None,
) -> dict:
    """Loss and task metrics of ``model`` over ``loader`` (every rank's part, reduced).

    ``collect(batch, outputs)``, if given, sees every batch (for plots); ``metrics`` replaces
    the task's fresh metrics object, so the caller can read its details afterwards."""
    model = getattr(model, "module", model)  # no DDP collectives: ranks differ in batches
    model.eval()
    config = replace(config, loss=replace(config.loss, gather=False))
    metrics = metrics if metrics is not None else task.metrics(classes, config)
    loss_sum, count = 0.0, 0
    for index, batch in enumerate(loader):
        if limit is not None and index >= limit:
            break
        batch = to_device(batch, device, config.train.channels_last)
        with amp.autocast():
            loss, outputs = task.forward(model, batch, config)
        size = len(batch["keys"])
        loss_sum += float(loss) * size
        count += size
        metrics.update(outputs, batch)
        if collect is not None:
            collect(batch, outputs)
    result = {
        "loss": distributed.total(loss_sum, device) / max(distributed.total(count, device), 1)
    }
    result |= metrics.compute()
    result["samples"] = int(distributed.total(count, device))
    incomplete = result.get("incomplete_cases")
    if incomplete and getattr(loader, "shardset", None) is not None and distributed.is_main():
        log.warning(
            "%s, %s split: %d case(s) scored on part of their volume (a slice missing or "
            "left out after failing to decode); their per-case scores are not whole-volume",
            loader.shardset.folder,
            loader.shardset.split,
            incomplete,
        )
    return result


# --------------------------------------------------------------------------- xd-eval


class _Collector:
    """What the plots need, gathered batch by batch (a few samples, scores, labels)."""

    def __init__(self, kind: str, overlays: int):
        self.kind, self.overlays = kind, overlays
        self.scores: list = []
        self.labels: list = []
        self.samples: list = []

    def __call__(self, batch: dict, outputs) -> None:
        if self.kind == "multilabel":
            self.scores.append(torch.sigmoid(outputs.float()).cpu().numpy())
            self.labels.append(batch["label"].cpu().numpy())
        elif self.kind == "multiclass":
            self.scores.append(outputs.argmax(1).cpu().numpy())
            self.labels.append(batch["label"].cpu().numpy())
        elif self.kind == "segmentation":
            # the first slices that hold any target, in the order they are read, at the
            # grid they are scored on (the stored masks'; the image brought to it)
            for i in range(len(batch["keys"])):
                if len(self.samples) >= self.overlays:
                    break
                mask = batch["mask"][i]
                if int((mask > 0).sum()) > 0:
                    h, w = int((mask >= 0).any(1).sum()), int((mask >= 0).any(0).sum())
                    image = batch["image"][i : i + 1, :1].float()  # at the network's size
                    image = torch.nn.functional.interpolate(image, size=(h, w), mode="bilinear")
                    self.samples.append(
                        (
                            image[0, 0].cpu().numpy(),
                            mask[:h, :w].cpu().numpy(),
                            outputs[i, :h, :w].cpu().numpy(),
                        )
                    )


def _plots(collector, metrics, classes, folder: Path, split: str) -> list[str]:
    """Plots named ``<kind>_<split>.png`` (``split`` carries a checkpoint suffix)."""
    import numpy as np

    from xdtrain import plots

    written = []
    if collector.kind == "multilabel" and collector.scores:
        scores, labels = np.concatenate(collector.scores), np.concatenate(collector.labels)
        written.append(plots.roc_curves(scores, labels, classes, folder / f"roc_{split}.png"))
    elif collector.kind == "multiclass" and collector.scores:
        pred, true = np.concatenate(collector.scores), np.concatenate(collector.labels)
        matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
        np.add.at(matrix, (true, pred), 1)
        written.append(plots.confusion(matrix, classes, folder / f"confusion_{split}.png"))
    elif collector.kind == "segmentation":
        if collector.samples:
            images, truths, preds = zip(*collector.samples, strict=True)
            written.append(
                plots.overlays(
                    images, truths, preds, folder / f"overlays_{split}.png", len(classes)
                )
            )
        details = getattr(metrics, "details", None)
        if details:
            values = {n: list(r["dice_cases"].values()) for n, r in details["regions"].items()}
            written.append(plots.box_plot(values, "Dice per case", folder / f"dice_{split}.png"))
    return [str(p) for p in written]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import os

    from rich.console import Console
    from rich.table import Table

    from xdtrain import checkpoint, provenance
    from xdtrain.config import load_config
    from xdtrain.data import build_loader
    from xdtrain.errors import UserError, first_line
    from xdtrain.fileio import atomic_write
    from xdtrain.models import get_model
    from xdtrain.shards.tar import file_sha256
    from xdtrain.train import resolve

    parser = argparse.ArgumentParser(
        prog="xd-eval", description="Score a trained run on a split; write metrics and plots."
    )
    parser.add_argument("run", help="run folder written by xd-train (checkpoints/<run>)")
    parser.add_argument("--split", default="test", choices=["test", "val", "train"])
    parser.add_argument("--checkpoint", default="final", help="final, last, or a path")
    parser.add_argument("--batch-size", type=int, help="default: the run's data.batch_size")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], help="default: the run's")
    parser.add_argument(
        "--shards", help="shard folder (default: the run's data.shards, stored absolute)"
    )
    parser.add_argument("--overlays", type=int, default=6, help="segmentation samples to draw")
    parser.add_argument(
        "--force", action="store_true", help="replace scores written for another checkpoint"
    )
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        refused = UserError("xd-eval scores a run in one process; run it without torchrun")
        refused.quiet = os.environ.get("RANK", "0") != "0"  # rank 0 says it
        raise refused
    folder = Path(args.run)
    if not (folder / "config.yaml").is_file():
        raise UserError(f"{folder}: no config.yaml; pass a run folder written by xd-train")
    config, task = resolve(load_config(folder / "config.yaml"))
    data = config.data
    if args.batch_size:
        data = replace(data, batch_size=args.batch_size)
    if args.device:
        data = replace(data, device=args.device)
    if args.shards:  # moved since the run: the same content elsewhere
        data = replace(data, shards=str(Path(args.shards).resolve()))
    config = replace(config, data=data)
    path = {"final": folder / "final.pt", "last": folder / "last.pt"}.get(
        args.checkpoint, Path(args.checkpoint)
    )
    if not path.is_file():
        if path.name == "final.pt":
            hint = " (the run has not finished; try --checkpoint last)"
        elif path.name == "last.pt":
            hint = ""
        else:
            hint = " (--checkpoint takes final, last or the path of a checkpoint file)"
        raise UserError(f"{path}: no checkpoint{hint}")
    name = output_name(args.split, args.checkpoint, path)
    out = folder / f"eval_{name}.json"
    digest = file_sha256(path)
    _check_overwrite(out, digest, args.force)
    changed = provenance.encoder_changed(provenance.read_env(folder))
    if changed:
        log.warning("%s: %s", folder, changed)
    state = checkpoint.load(path)
    world = distributed.init(data.device)
    loader = build_loader(data, args.split, seed=config.run.seed, train=False)
    classes = list(loader.shardset.classes)
    model = get_model(
        config.model.name,
        num_classes=config.model.num_classes or (None if task.name == "simclr" else len(classes)),
        in_channels=data.channels,
        projection_dims=config.model.projection_dims,
        projection_sigmoid=config.model.projection_sigmoid,
        kind=task.model_kind,
        image_size=data.image_size,
    )
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        first = first_line(exc, 160)
        raise UserError(f"{path}: does not fit the run's {config.model.name} ({first})") from None
    model.to(world.device)
    if config.train.channels_last:
        model.to(memory_format=torch.channels_last)
    amp = precision(config.train.amp, world.device)
    kind = {"simclr": "simclr"}.get(task.name, loader.shardset.layout.kind)
    collector = _Collector(kind, args.overlays)
    metrics = task.metrics(classes, config)
    result = evaluate(
        model, loader, task, classes, config, world.device, amp, collect=collector, metrics=metrics
    )
    written = _plots(collector, metrics, classes, folder, name)
    report = {
        "run": str(folder.resolve()),
        "split": args.split,
        "checkpoint": str(path.resolve()),
        "checkpoint_sha256": digest,
        "metrics": result,
        "plots": written,
    }
    if changed:
        report["encoder_changed"] = changed
    atomic_write(out, json.dumps(report, indent=1, default=_json_value) + "\n")
    table = Table(title=f"{folder.name}: {args.split} ({path.name})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
    print(f"wrote {out}" + "".join(f"\nwrote {p}" for p in written))
    return 0


def output_name(split: str, choice: str, path: Path) -> str:
    """``test`` for the final model, ``test_last`` for ``last.pt``, ``test_<stem>`` for any
    other checkpoint file: scores of different checkpoints never share a file."""
    if choice == "final":
        return split
    return f"{split}_{'last' if choice == 'last' else path.stem}"


def _check_overwrite(out: Path, digest: str, force: bool) -> None:
    """Refuse to replace scores of another checkpoint (another sha256) unless ``force``."""
    import json

    from xdtrain.errors import UserError

    if force or not out.exists():
        return
    try:
        before = json.loads(out.read_text()).get("checkpoint_sha256")
    except (OSError, ValueError, AttributeError):
        before = None
    if before != digest:
        raise UserError(
            f"{out}: holds the scores of another checkpoint (its file has changed since); "
            "pass --force to replace them, or move the file away to keep them"
        )


def _json_value(value):
    return None if value != value else value  # NaN -> null


def entry() -> None:
    import sys

    from xdtrain.errors import run_cli

    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
