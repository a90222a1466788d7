"""Objectives: NT-Xent (per GPU or with gathered negatives), multi-label BCE, segmentation.

NT-Xent (Chen et al. 2020, eq. 1): for 2N projections of N samples, the loss of an anchor
is ``-log(exp(sim(i, j)/t) / sum_{k != i} exp(sim(i, k)/t))`` with ``j`` its other view and
``sim`` the cosine similarity, averaged over all 2N anchors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` whose backward sends each rank the summed gradient of its slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        size = grad.shape[0] // dist.get_world_size()
        rank = dist.get_rank()
        return grad[rank * size : (rank + 1) * size]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' ``tensor`` concatenated in rank order, with gradients to every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather: bool = False):
    """NT-Xent of two views' projections ``[N, D]``.

    ``gather=False`` uses the local batch only (the study's per-GPU loss: 2N - 2 negatives
    per anchor). ``gather=True`` contrasts the local anchors with the projections of every
    rank. Under DDP, which averages gradients over ranks, the gathered loss then trains
    exactly as the loss of one process over the whole global batch."""
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    n = z1.shape[0]
    offset = 0
    c1, c2 = z1, z2
    if gather:
        c1, c2 = gather_with_grad(z1), gather_with_grad(z2)
        if c1 is not z1:
            offset = dist.get_rank() * n
    total = c1.shape[0]
    anchors = torch.cat([z1, z2])  # [2n, D]
    candidates = torch.cat([c1, c2])  # [2T, D]
    logits = anchors @ candidates.T / temperature
    local = torch.arange(n, device=z1.device) + offset
    self_index = torch.cat([local, local + total])
    positive = torch.cat([local + total, local])
    logits[torch.arange(2 * n, device=z1.device), self_index] = float("-inf")
    return F.cross_entropy(logits, positive)


def multilabel_bce(
    logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary cross-entropy per output, weighted per class (``[C]``), averaged."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    if class_weights is not None:
        loss = loss * class_weights.to(loss.device)
    return loss.mean()


IGNORE = -1  # label of padding pixels in evaluation masks: no pixel, no loss, no score


def one_hot(mask: torch.Tensor, classes: int, dtype: torch.dtype) -> torch.Tensor:
    """``[N, H, W]`` labels as ``[N, classes, H, W]`` indicators (elementwise: deterministic)."""
    labels = torch.arange(classes, device=mask.device).view(1, classes, 1, 1)
    return (mask.unsqueeze(1) == labels).to(dtype)


def pixel_cross_entropy(
    logits: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.cross_entropy`` over ``[N, C, H, W]`` logits, computed from one-hot targets.

    CUDA's 2-D NLL kernel has no deterministic implementation, so ``train.deterministic``
    runs would fail on a GPU; this form uses only elementwise products and sums. With
    ``weight`` it is the weighted mean, as ``F.cross_entropy`` computes it. Pixels labelled
    :data:`IGNORE` (padding) count nowhere, as with ``ignore_index``."""
    logp = logits.float().log_softmax(dim=1)
    onehot = one_hot(mask, logits.shape[1], logp.dtype)  # all zero where ignored
    nll = -(logp * onehot).sum(dim=1)
    if weight is None:
        valid = (mask != IGNORE).sum()
        return nll.sum() / valid.clamp(min=1)
    pixel_weight = (onehot * weight.view(1, -1, 1, 1)).sum(dim=1)
    return (nll * pixel_weight).sum() / pixel_weight.sum()


def soft_dice_loss(logits: torch.Tensor, mask: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 − mean soft Dice over the foreground classes (class 0 is background); pixels
    labelled :data:`IGNORE` count nowhere."""
    probs = logits.float().softmax(dim=1) * (mask != IGNORE).unsqueeze(1)
    onehot = one_hot(mask, probs.shape[1], probs.dtype)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    return 1 - dice[1:].mean()


def segmentation_loss(
    logits: torch.Tensor,
    mask: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    dice_weight: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy with optional class weights, plus ``dice_weight`` × soft Dice loss.

    ``logits``: ``[N, C, H, W]``; ``mask``: ``int64 [N, H, W]`` labels, :data:`IGNORE`
    (-1) where a padded evaluation mask holds no pixel."""
    weight = class_weights.to(logits.device) if class_weights is not None else None
    loss = pixel_cross_entropy(logits, mask, weight)
    if dice_weight:
        loss = loss + dice_weight * soft_dice_loss(logits, mask)
    return loss
