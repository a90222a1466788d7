"""xdtrain.losses: NT-Xent against the SimCLR paper's formula, local and gathered over
Gloo processes; BCE and segmentation losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from xdtrain.losses import (
    multilabel_bce,
    nt_xent,
    one_hot,
    pixel_cross_entropy,
    segmentation_loss,
    soft_dice_loss,
)


def paper_nt_xent(z1, z2, temperature):
    """SimCLR (Chen et al. 2020), Algorithm 1, written out with loops."""
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2])]
    n = z1.shape[0]

    def sim(i, j):
        return torch.dot(z[i], z[j]) / temperature

    def loss(i, j):
        denominator = sum(torch.exp(sim(i, k)) for k in range(2 * n) if k != i)
        return -torch.log(torch.exp(sim(i, j)) / denominator)

    return sum(loss(k, k + n) + loss(k + n, k) for k in range(n)) / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_equals_the_papers_formula(temperature):
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 16, dtype=torch.float64), torch.randn(6, 16, dtype=torch.float64)
    ours = nt_xent(z1, z2, temperature)
    assert abs(ours.item() - paper_nt_xent(z1.float(), z2.float(), temperature).item()) < 1e-5


def test_nt_xent_is_low_for_matching_views_and_chance_for_noise():
    torch.manual_seed(1)
    z = torch.randn(32, 64)
    assert nt_xent(z, z + 0.01 * torch.randn_like(z), 0.1) < 0.1
    noise = nt_xent(torch.randn(256, 128), torch.randn(256, 128), 100.0)
    assert abs(noise.item() - math.log(511)) < 0.01  # uniform over 2N - 1 candidates


def _gathered_worker(rank, world, init_file, z1, z2, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    n = z1.shape[0] // world
    a = z1[rank * n : (rank + 1) * n].clone().requires_grad_()
    b = z2[rank * n : (rank + 1) * n].clone().requires_grad_()
    loss = nt_xent(a, b, 0.5, gather=True)
    loss.backward()
    out[rank] = (loss.detach(), a.grad, b.grad)
    dist.barrier()
    dist.destroy_process_group()


def test_gathered_loss_over_two_gloo_processes_equals_one_process_on_the_whole_batch(tmp_path):
    torch.manual_seed(2)
    z1, z2 = torch.randn(8, 12), torch.randn(8, 12)
    world = 2
    out = mp.Manager().dict()
    mp.spawn(
        _gathered_worker,
        args=(world, str(tmp_path / "init"), z1, z2, out),
        nprocs=world,
        join=True,
    )
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    whole = nt_xent(a, b, 0.5)
    whole.backward()
    losses = [out[r][0] for r in range(world)]
    assert abs(sum(losses).item() / world - whole.item()) < 1e-5
    # each rank's gradient holds every rank's loss; DDP averages over ranks (the 1/world)
    grad_a = torch.cat([out[r][1] for r in range(world)]) / world
    grad_b = torch.cat([out[r][2] for r in range(world)]) / world
    assert torch.allclose(grad_a, a.grad, atol=1e-6)
    assert torch.allclose(grad_b, b.grad, atol=1e-6)
    # the local (per-GPU) loss is a different objective: fewer negatives
    local = nt_xent(z1[:4], z2[:4], 0.5) + nt_xent(z1[4:], z2[4:], 0.5)
    assert abs(local.item() / 2 - whole.item()) > 1e-3


def test_multilabel_bce_weights_classes():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    plain = F.binary_cross_entropy_with_logits(logits, targets)
    assert torch.allclose(multilabel_bce(logits, targets), plain)
    weights = torch.tensor([2.0, 0.0])
    expected = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")[:, 0].mean()
    assert torch.allclose(multilabel_bce(logits, targets, weights), expected)


def test_segmentation_loss_adds_dice_and_weights():
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 8, 8)
    mask = torch.randint(0, 3, (2, 8, 8))
    ce = F.cross_entropy(logits, mask)
    assert torch.allclose(segmentation_loss(logits, mask), ce)
    with_dice = segmentation_loss(logits, mask, dice_weight=0.5)
    assert torch.allclose(with_dice, ce + 0.5 * soft_dice_loss(logits, mask))
    weights = torch.tensor([0.0, 1.0, 1.0])
    assert torch.allclose(
        segmentation_loss(logits, mask, weights), F.cross_entropy(logits, mask, weight=weights)
    )
    perfect = F.one_hot(mask, 3).permute(0, 3, 1, 2).float() * 50
    assert soft_dice_loss(perfect, mask) < 1e-3


def test_pixel_cross_entropy_matches_torch_in_value_and_gradient():
    torch.manual_seed(4)
    logits = torch.randn(3, 4, 5, 6, requires_grad=True)
    mask = torch.randint(0, 4, (3, 5, 6))
    assert torch.equal(one_hot(mask, 4, torch.float32), F.one_hot(mask, 4).permute(0, 3, 1, 2))
    for weight in (None, torch.tensor([0.1, 2.0, 0.0, 1.0])):
        ours = pixel_cross_entropy(logits, mask, weight)
        (grad,) = torch.autograd.grad(ours, logits)
        theirs = F.cross_entropy(logits, mask, weight=weight)
        (expected,) = torch.autograd.grad(theirs, logits)
        assert torch.allclose(ours, theirs, atol=1e-6)
        assert torch.allclose(grad, expected, atol=1e-7)


def test_padding_pixels_count_in_no_loss():
    """Pixels labelled -1 (padding of evaluation masks) count nowhere: the cross-entropy is
    ``F.cross_entropy(ignore_index=-1)``, and both terms equal those of the unpadded part."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 12, 12)
    mask = torch.randint(0, 3, (2, 12, 12))
    padded = mask.clone()
    padded[1, 8:, :] = -1
    padded[1, :, 9:] = -1
    weight = torch.tensor([0.2, 1.0, 3.0])
    for w in (None, weight):
        expected = F.cross_entropy(logits, padded, weight=w, ignore_index=-1)
        assert segmentation_loss(logits, padded, w) == pytest.approx(expected.item(), rel=1e-6)
    # the padded pixels' logits do not matter at all, Dice term included
    changed = logits.clone()
    changed[1, :, 8:, :] = 50.0
    changed[1, :, :, 9:] = -50.0
    a = segmentation_loss(logits, padded, None, dice_weight=1.0)
    b = segmentation_loss(changed, padded, None, dice_weight=1.0)
    assert a == pytest.approx(b.item(), rel=1e-6)
