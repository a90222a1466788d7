"""Classification of a user's own data set: single- or multi-label, classes from the manifest.

One task for every data set packed with ``--labels`` (``xd-shard --dataset dicom`` or
``nifti``): the manifest says whether it is single-label (a class index per sample,
cross-entropy) or multi-label (a multi-hot vector, binary cross-entropy per class), and names
the classes, so a new data set needs no Python module. The batch says which: ``label`` is an
``int64 [B]`` class index or a ``float32 [B, C]`` multi-hot vector.

Metrics: ``auroc_mean``, the mean over classes of the one-vs-rest AUROC (scikit-learn's
``roc_auc_score``) of the softmax probabilities (single-label; as sklearn's
``multi_class="ovr", average="macro"``, ranked by their log-odds, which never saturate) or of
each class's logit (multi-label); a class
without both positives and negatives in the split is left out of the mean and named in
``auroc_undefined``. Single-label runs also report top-1 accuracy (and top-5 with more than
five classes).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from xdtrain.distributed import sum_tensor
from xdtrain.losses import multilabel_bce
from xdtrain.metrics import MultiLabelAUROC, TopKAccuracy
from xdtrain.tasks.base import Metrics, Task, class_weights


def log_odds(logits: torch.Tensor) -> torch.Tensor:
    """``log(p_k / (1 - p_k))`` of the softmax probabilities ``p``, ``[B, C]`` float64:
    ``l_k - logsumexp_{j != k} l_j``. It ranks samples as ``p_k`` does (AUROC is invariant to
    monotonic maps) but never saturates: a float32 softmax ties at 0 and at 1 once logits
    lie tens apart, and a log-softmax at 0 for the top class."""
    values = logits.detach().double()
    eye = torch.eye(values.shape[1], dtype=torch.bool, device=values.device)
    others = values.unsqueeze(1).expand(-1, values.shape[1], -1).masked_fill(eye, float("-inf"))
    return values - torch.logsumexp(others, dim=2)


def multilabel(batch: dict) -> bool:
    return batch["label"].is_floating_point()


def forward(model, batch: dict, config):
    logits = model(batch["image"])
    weight = class_weights(config)
    if multilabel(batch):
        return multilabel_bce(logits, batch["label"], weight), logits.detach()
    weight = None if weight is None else weight.to(logits.device)
    return F.cross_entropy(logits.float(), batch["label"], weight=weight), logits.detach()


class ClassScores(Metrics):
    """Mean one-vs-rest AUROC (and top-k accuracy for single-label batches)."""

    def __init__(self, classes: list[str]):
        self.names = list(classes)
        self.auroc = MultiLabelAUROC(self.names)
        self.accuracy = TopKAccuracy((1, 5) if len(self.names) > 5 else (1,))
        self.single: bool | None = None

    def update(self, outputs, batch: dict) -> None:
        labels = batch["label"]
        self.single = not multilabel(batch)
        if self.single:
            self.auroc.update(log_odds(outputs), F.one_hot(labels, len(self.names)))
            self.accuracy.update(outputs, labels)
        else:
            self.auroc.update(outputs, labels)

    def compute(self) -> dict[str, float]:
        # collectives under DDP: every rank calls each, also a rank that saw no batch
        result = self.auroc.compute()
        accuracy = self.accuracy.compute()
        single = sum_tensor(torch.tensor([float(bool(self.single))], dtype=torch.float64))
        flat: dict = {"auroc_mean": result["mean"]}
        for name, value in result["auroc"].items():
            flat[f"auroc/{name}"] = value
        flat["auroc_classes"] = result["classes_averaged"]
        flat["auroc_undefined"] = [n for n, v in result["auroc"].items() if np.isnan(v)]
        flat["auroc_left_out"] = result["left_out"]
        if single.item() > 0:
            flat.update(accuracy)
        return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in flat.items()}


TASK = Task(
    name="classify",
    dataset=None,
    model_kind="classifier",
    default_augment="study",
    primary="auroc_mean",
    higher_is_better=True,
    forward=forward,
    metrics=lambda classes, config: ClassScores(classes),
    description="your own data set's classes (dicom, nifti packs): single- or multi-label, "
    "mean one-vs-rest AUROC",
)
