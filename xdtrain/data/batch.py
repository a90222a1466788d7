"""The batch contract both backends honour.

A batch is a dict of torch tensors (on the GPU when the pipeline runs there):

- ``views``: list of ``[B, C, S, S]`` float tensors (SimCLR), or ``image``: ``[B, C, S, S]``;
- ``label``: ``int64 [B]`` class index (ImageNet) or ``float32 [B, 15]`` multi-hot
  (ChestX-ray8), absent for segmentation;
- ``mask``: ``int64 [B, S, S]`` in training (segmentation); in evaluation ``int64 [B, H, W]``,
  each slice's mask as stored, padded with -1 to the largest of the batch (scores are
  computed at the stored grid); with ``case``, ``slice``, ``slices``: ``int64 [B]`` from
  ``pos.i32``, so 3-D volumes can be rebuilt for per-case metrics;
- ``keys``: list of the samples' keys; ``bad_samples``: samples in this batch that failed
  to decode and were replaced by others of the batch.
"""

from __future__ import annotations

import numpy as np
import torch

from xdtrain.shards.base import Layout


def key_of(info: bytes) -> tuple[str, str]:
    """``(shard path, sample key)`` from DALI's ``source_info`` (``path:offset:member``)."""
    text = info.rstrip(b"\0").decode()
    path, _, rest = text.rpartition(":")
    path = path.rpartition(":")[0]
    return path, rest.partition(".")[0]


def labels(layout: Layout, raw: torch.Tensor) -> dict[str, torch.Tensor]:
    """The label entries of a batch from the fixed-size binary label component."""
    if layout.kind == "multiclass":
        return {"label": raw.reshape(-1).long()}
    if layout.kind == "multilabel":
        return {"label": raw.float()}
    pos = raw.long()
    return {"case": pos[:, 0], "slice": pos[:, 1], "slices": pos[:, 2]}


# Multi-label outputs that are no finding of their own: ChestX-ray8's "No Finding" is the
# absence of the 14 findings, left out of a mean AUROC as the task leaves it out.
NOT_SCORED = ("No Finding",)


def scored_classes(kind: str, classes: list[str]) -> list[int]:
    """Indices of the classes a mean AUROC over multi-label outputs averages."""
    if kind == "multiclass":
        return list(range(len(classes)))
    return [i for i, name in enumerate(classes) if name not in NOT_SCORED]


def label_kind(layout_kind: str, classes: list[str]) -> tuple[str, list[str]]:
    """``(kind, class names)`` of per-sample labels (:func:`sample_labels`): ``multiclass``,
    ``multilabel``, or for segmentation ``presence``, over the classes after background."""
    if layout_kind == "segmentation":
        return "presence", classes[1:]
    return layout_kind, classes


def sample_labels(batch: dict, kind: str, num_classes: int) -> np.ndarray:
    """One label per sample of ``batch``: int64 ``[B]`` class indices (``multiclass``) or
    uint8 ``[B, num_classes]`` multi-hot (``multilabel``; ``presence``: which foreground
    classes the slice's mask holds, class ``c`` of the vector being mask value ``c + 1``)."""
    if kind == "multiclass":
        return batch["label"].cpu().numpy().astype(np.int64)
    if kind == "multilabel":
        return (batch["label"].cpu().numpy() > 0.5).astype(np.uint8)
    mask = batch["mask"].cpu().flatten(1)
    present = [(mask == c).any(1) for c in range(1, num_classes + 1)]
    return torch.stack(present, 1).numpy().astype(np.uint8)
