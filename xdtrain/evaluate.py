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
    progress=None,
    label: str = "eval",
) -> dict:
    """Loss and task metrics of ``model`` over ``loader`` (every rank's part, reduced).

    ``collect(batch, outputs)``, if given, sees every batch (for plots); ``metrics`` replaces
    the task's fresh metrics object, so the caller can read its details afterwards;
    ``progress`` (:func:`xdtrain.progress.make_progress`) shows the batches scored, as
    ``label``."""
    model = getattr(model, "module", model)  # no DDP collectives: ranks differ in batches
    model.eval()
    config = replace(config, loss=replace(config.loss, gather=False))
    metrics = metrics if metrics is not None else task.metrics(classes, config)
    loss_sum, count = 0.0, 0
    total = len(loader) if hasattr(loader, "__len__") else None
    if limit is not None and total is not None:
        total = min(total, limit)
    bar = progress.add_task(label, total=total, lines=True) if progress is not None else None
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
        if bar is not None:
            progress.update(bar, advance=1)
    if bar is not None:
        progress.remove_task(bar)
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


class Collector:
    """What the plots need, gathered batch by batch (a few samples, scores, labels)."""

    def __init__(self, kind: str, overlays: int):
        self.kind, self.overlays = kind, overlays
        self.scores: list = []
        self.labels: list = []
        # segmentation: (image, truth, prediction, case index or None, slice index or None)
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
                            int(batch["case"][i]) if "case" in batch else None,
                            int(batch["slice"][i]) if "slice" in batch else None,
                        )
                    )


def _sample_title(case: int | None, index: int | None, cases: list[str], key: str) -> str:
    """``"BraTS20_Training_001, slice 75"``: a sample's case id (the manifest's ``cases``
    entry) and slice index; the sample key where they are not known."""
    if case is None:
        return key
    name = cases[case] if 0 <= case < len(cases) else f"case {case}"
    return name if index is None else f"{name}, slice {index}"


def write_plots(collector, metrics, classes, folder: Path, split: str, shardset=None) -> list[str]:
    """Plots named ``<kind>_<split>.png`` (``split`` carries a checkpoint suffix);
    ``shardset``: the split read, whose manifest names the cases of the overlays."""
    import numpy as np

    from xdtrain import plots
    from xdtrain.shards import manifest as manifests

    written = []
    if collector.kind == "multilabel" and collector.scores:
        scores, labels = np.concatenate(collector.scores), np.concatenate(collector.labels)
        path = folder / f"roc_{split}.png"
        written.append(plots.roc_curves(scores, labels, classes, path, f"ROC per class, {split}"))
    elif collector.kind == "multiclass" and collector.scores:
        pred, true = np.concatenate(collector.scores), np.concatenate(collector.labels)
        matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
        np.add.at(matrix, (true, pred), 1)
        title = f"Confusion matrix, {split}"
        written.append(plots.confusion(matrix, classes, folder / f"confusion_{split}.png", title))
    elif collector.kind == "segmentation":
        if collector.samples:
            record = manifests.load(shardset.folder, missing_ok=True) if shardset else None
            cases = list(((record or {}).get("preprocessing") or {}).get("cases") or [])
            images, truths, preds, case, index = zip(*collector.samples, strict=True)
            titles = [
                _sample_title(c, s, cases, f"sample {k}")
                for k, (c, s) in enumerate(zip(case, index, strict=True))
            ]
            written.append(
                plots.overlays(
                    images,
                    truths,
                    preds,
                    folder / f"overlays_{split}.png",
                    classes,
                    titles,
                    f"Segmentation, {split}: first slices with a target",
                )
            )
        details = getattr(metrics, "details", None)
        if details:
            values = {n: list(r["dice_cases"].values()) for n, r in details["regions"].items()}
            path = folder / f"dice_{split}.png"
            written.append(plots.box_plot(values, path, title=f"Dice per case, {split}"))
    return [str(p) for p in written]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os

    from xdtrain import casetables
    from xdtrain.errors import UserError

    parser = argparse.ArgumentParser(
        prog="xd-eval", description="Score a trained run on a split; write metrics and plots."
    )
    parser.add_argument(
        "run",
        nargs="+",
        help="run folder written by xd-train (checkpoints/<run>); several are scored one after "
        "the other in this process",
    )
    parser.add_argument("--split", default="test", choices=["test", "val", "train"])
    parser.add_argument(
        "--checkpoint",
        default="final",
        help="final (the model xd-train scored and xd-report reports), last, best (the best "
        "validation epoch's, with train.save_best), or a path",
    )
    parser.add_argument("--batch-size", type=int, help="default: the run's data.batch_size")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], help="default: the run's")
    parser.add_argument(
        "--shards", help="shard folder (default: the run's data.shards, stored absolute)"
    )
    parser.add_argument("--overlays", type=int, default=6, help="segmentation samples to draw")
    parser.add_argument(
        "--force", action="store_true", help="replace scores written for another checkpoint"
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=casetables.RESAMPLES,
        metavar="N",
        help="patient-level bootstrap resamples of the per-class AUROC intervals (default "
        f"{casetables.RESAMPLES}; 0: none)",
    )
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        refused = UserError("xd-eval scores a run in one process; run it without torchrun")
        refused.quiet = os.environ.get("RANK", "0") != "0"  # rank 0 says it
        raise refused
    named = args.checkpoint not in ("final", "last", "best")
    if named and len(args.run) > 1:
        raise UserError(f"--checkpoint {args.checkpoint}: a file belongs to one run; pass one run")
    for run in args.run:
        score_run(Path(run), args)
    return 0


def score_run(folder: Path, args) -> None:
    """``xd-eval`` of one run folder with the parsed arguments ``args``."""
    import json

    from rich.console import Console

    from xdtrain import casetables, checkpoint, display, provenance
    from xdtrain.config import load_config
    from xdtrain.data import build_loader
    from xdtrain.errors import UserError, first_line
    from xdtrain.fileio import atomic_write
    from xdtrain.models import get_model
    from xdtrain.progress import make_progress
    from xdtrain.shards.tar import file_sha256
    from xdtrain.train import resolve

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
    path = {n: folder / f"{n}.pt" for n in ("final", "last", "best")}.get(
        args.checkpoint, Path(args.checkpoint)
    )
    if not path.is_file():
        if path.name == "final.pt":
            hint = " (the run has not finished; try --checkpoint last)"
        elif path.name == "best.pt":
            hint = " (written with train.save_best, at the first validation)"
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
    collector = Collector(kind, args.overlays)
    metrics = task.metrics(classes, config)
    tables = casetables.Tables(kind, loader.shardset, metrics, args.bootstrap)

    def collect(batch, outputs):
        collector(batch, outputs)
        tables(batch, outputs)

    with make_progress(every=config.train.log_every) as progress:
        result = evaluate(
            model, loader, task, classes, config, world.device, amp,
            collect=collect, metrics=metrics, progress=progress, label=args.split,
        )  # fmt: skip
    written = write_plots(collector, metrics, classes, folder, name, loader.shardset)
    tabled = tables.write(folder, name)
    report = {
        "run": str(folder.resolve()),
        "split": args.split,
        "checkpoint": str(path.resolve()),
        "checkpoint_sha256": digest,
        "metrics": result,
        "plots": written,
        "tables": tabled,
    }
    if tables.bootstrap:
        report["bootstrap"] = tables.bootstrap
    if changed:
        report["encoder_changed"] = changed
    atomic_write(out, json.dumps(report, indent=1, default=_json_value) + "\n")
    console = Console()
    names = list(getattr(metrics, "names", []))
    for table in display.tables(result, names, f"{folder.name}: {args.split} ({path.name})"):
        console.print(table)
    for note in display.notes(result):
        console.print(note, soft_wrap=True, highlight=False)
    print(f"wrote {out}" + "".join(f"\nwrote {p}" for p in written + tabled), flush=True)


def output_name(split: str, choice: str, path: Path) -> str:
    """``test`` for the final model, ``test_last`` for ``last.pt``, ``test_<stem>`` for any
    other checkpoint file: scores of different checkpoints never share a file."""
    if choice == "final":
        return split
    return f"{split}_{choice if choice in ('last', 'best') else path.stem}"


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
