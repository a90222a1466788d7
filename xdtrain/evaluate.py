"""Scoring a model on a split: the loop ``xd-train`` runs every epoch and at the end."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch

from xdtrain import distributed
from xdtrain.tasks import Task


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
) -> dict:
    """Loss and task metrics of ``model`` over ``loader`` (every rank's part, reduced)."""
    model = getattr(model, "module", model)  # no DDP collectives: ranks differ in batches
    model.eval()
    config = replace(config, loss=replace(config.loss, gather=False))
    metrics = task.metrics(classes, config)
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
    result = {
        "loss": distributed.total(loss_sum, device) / max(distributed.total(count, device), 1)
    }
    result |= metrics.compute()
    result["samples"] = int(distributed.total(count, device))
    return result
