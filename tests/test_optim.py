"""xdtrain.optim: LARS exclusions and zero gradients, learning-rate scaling, schedules."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from xdtrain.config import OptimConfig, ScheduleConfig
from xdtrain.models import get_model
from xdtrain.optim import (
    LARS,
    build_optimizer,
    build_scheduler,
    load_optimizer_state,
    lr_factor,
    param_groups,
)


def test_biases_and_norm_parameters_get_no_decay_or_adaptation():
    model = get_model("resnet18", num_classes=4)
    optimiser = build_optimizer(model, OptimConfig(name="lars", lr=0.1, weight_decay=1e-4), 256)
    decayed, plain = optimiser.param_groups
    assert decayed["adapt"] and decayed["weight_decay"] == 1e-4
    assert not plain["adapt"] and plain["weight_decay"] == 0.0
    plain_ids = {id(p) for p in plain["params"]}
    for name, param in model.named_parameters():
        is_plain = name.endswith(".bias") or ".bn" in name or "downsample.1" in name
        assert (id(param) in plain_ids) == is_plain, name


def test_lars_updates_excluded_parameters_like_plain_sgd():
    bias = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    weight = torch.nn.Parameter(torch.ones(2, 2))
    groups = [
        {"params": [weight], "weight_decay": 0.1, "adapt": True},
        {"params": [bias], "weight_decay": 0.0, "adapt": False},
    ]
    optimiser = LARS(groups, lr=0.5, momentum=0.0, eta=0.001)
    bias.grad = torch.tensor([0.2, 0.4])
    weight.grad = torch.full((2, 2), 0.3)
    optimiser.step()
    assert torch.allclose(bias, torch.tensor([1.0 - 0.1, -2.0 - 0.2]))  # lr × grad, unscaled
    grad = torch.full((2, 2), 0.3) + 0.1 * torch.ones(2, 2)
    ratio = 0.001 * torch.ones(2, 2).norm() / grad.norm()
    assert torch.allclose(weight, torch.ones(2, 2) - 0.5 * ratio * grad)


def test_lars_stays_finite_at_zero_gradient_and_zero_weights():
    zero_w = torch.nn.Parameter(torch.zeros(3, 3))
    some_w = torch.nn.Parameter(torch.ones(3, 3))
    optimiser = LARS([{"params": [zero_w, some_w], "weight_decay": 0.0, "adapt": True}], lr=1.0)
    zero_w.grad = torch.ones(3, 3)
    some_w.grad = torch.zeros(3, 3)
    for _ in range(3):
        optimiser.step()
    assert torch.isfinite(zero_w).all() and torch.isfinite(some_w).all()
    assert torch.equal(some_w, torch.ones(3, 3))


def test_frozen_parameters_are_left_out():
    model = get_model("resnet18", num_classes=3, frozen_encoder=True)
    groups = param_groups(model, 1e-4)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == 2  # the head's weight and bias


@pytest.mark.parametrize("name,cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_adamw_and_sgd_with_scaled_lr(name, cls):
    model = get_model("resnet18", num_classes=2)
    config = OptimConfig(name=name, lr=0.1, weight_decay=0.05, scale_lr=True)
    optimiser = build_optimizer(model, config, global_batch=512)
    assert isinstance(optimiser, cls)
    assert optimiser.param_groups[0]["lr"] == pytest.approx(0.2)
    assert [g["weight_decay"] for g in optimiser.param_groups] == [0.05, 0.0]


def _steps(optimiser, params, grads):
    for grad in grads:
        for p, g in zip(params, grad, strict=True):
            p.grad = g.clone()
        optimiser.step()


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_kernels_give_the_reference_update_and_resume_across_paths(name):
    """build_optimizer takes torch's fused kernels on the CPU; five steps of random gradients
    give the parameters of torch's single-tensor (for-loop) implementation, and a state saved
    by that implementation resumes as it would have gone on."""
    torch.manual_seed(0)
    model = get_model("resnet18", num_classes=3)
    config = OptimConfig(name=name, lr=0.01, weight_decay=0.05, momentum=0.9)
    fused = build_optimizer(model, config, global_batch=256)
    assert fused.defaults["fused"] is True
    reference_model = get_model("resnet18", num_classes=3)
    reference_model.load_state_dict(model.state_dict())
    groups = param_groups(reference_model, 0.05)
    for group in groups:
        group.pop("adapt")
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.SGD
    extra = {} if name == "adamw" else {"momentum": 0.9}
    reference = cls(groups, lr=0.01, foreach=False, **extra)
    params = [p for g in fused.param_groups for p in g["params"]]
    reference_params = [p for g in reference.param_groups for p in g["params"]]
    grads = [[torch.randn_like(p) for p in params] for _ in range(8)]
    _steps(fused, params, grads[:5])
    _steps(reference, reference_params, grads[:5])
    for mine, theirs in zip(params, reference_params, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    # a checkpoint of the single-tensor path (an older run's) resumes as it would have gone
    # on: its settings are part of its state, the kernels too
    resumed = build_optimizer(model, config, global_batch=256)
    resumed.load_state_dict(copy.deepcopy(reference.state_dict()))  # as through a file
    assert resumed.param_groups[0]["fused"] is None
    with torch.no_grad():
        for mine, theirs in zip(params, reference_params, strict=True):
            mine.copy_(theirs)
    _steps(resumed, params, grads[5:])
    _steps(reference, reference_params, grads[5:])
    for mine, theirs in zip(params, reference_params, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
@pytest.mark.parametrize("unscale", [False, True])
def test_a_run_saved_before_the_fused_kernels_resumes_under_a_grad_scaler(name, unscale):
    """A checkpoint of a non-fused optimiser (every run before the fused kernels) loaded into
    build_optimizer's: it keeps its kernels, and GradScaler's step (fp16 AMP; the clip path
    unscales first) works and gives the update the old optimiser gives."""
    torch.manual_seed(0)
    config = OptimConfig(name=name, lr=0.01, weight_decay=0.05, momentum=0.9)
    old_model, new_model = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    new_model.load_state_dict(old_model.state_dict())
    old = build_optimizer(old_model, config, 256)
    for group in old.param_groups:  # as built before: torch's default kernels
        group["fused"] = None
    old._step_supports_amp_scaling = False

    def step(model, optimiser, scaler):
        loss = model(torch.ones(2, 6)).square().sum()
        optimiser.zero_grad()
        scaler.scale(loss).backward()
        if unscale:
            scaler.unscale_(optimiser)
        scaler.step(optimiser)
        scaler.update()

    old_scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    step(old_model, old, old_scaler)
    new = build_optimizer(new_model, config, 256)
    new_model.load_state_dict(old_model.state_dict())
    load_optimizer_state(new, copy.deepcopy(old.state_dict()))
    new_scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    new_scaler.load_state_dict(old_scaler.state_dict())
    step(new_model, new, new_scaler)  # raised in torch's single-tensor step before
    step(old_model, old, old_scaler)
    torch.testing.assert_close(new_model.weight, old_model.weight)
    # a fused run's own checkpoint resumes fused, the scaler handled by the kernel
    again = build_optimizer(new_model, config, 256)
    load_optimizer_state(again, build_optimizer(new_model, config, 256).state_dict())
    assert again._step_supports_amp_scaling and again.param_groups[0]["fused"] is True
    step(new_model, again, new_scaler)


def test_first_adamw_step_is_the_papers_formula():
    """Loshchilov & Hutter (2019), Algorithm 2, first step: with bias correction m̂ = g and
    v̂ = g², so w ← w − lr·wd·w − lr·g / (|g| + eps)."""
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 3)
    before = model.weight.detach().clone()
    optimiser = build_optimizer(model, OptimConfig(name="adamw", lr=0.1, weight_decay=0.5), 256)
    assert optimiser.defaults["fused"] is True
    grad = torch.randn_like(model.weight)
    model.weight.grad, model.bias.grad = grad, torch.zeros_like(model.bias)
    optimiser.step()
    expected = before - 0.1 * 0.5 * before - 0.1 * grad / (grad.abs() + 1e-8)
    torch.testing.assert_close(model.weight.detach(), expected, rtol=1e-6, atol=1e-7)


def test_cosine_with_warmup():
    schedule = ScheduleConfig(name="cosine", warmup_epochs=1, min_lr=0.1)
    factors = [lr_factor(schedule, s, steps_per_epoch=10, epochs=5) for s in range(50)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert factors[30] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert min(factors[10:]) > 0.1 and factors[10:] == sorted(factors[10:], reverse=True)


def test_exponential_decays_once_per_epoch_and_constant_stays():
    schedule = ScheduleConfig(name="exponential", gamma=0.9)
    factors = [lr_factor(schedule, s, steps_per_epoch=4, epochs=3) for s in range(12)]
    assert factors == pytest.approx([1.0] * 4 + [0.9] * 4 + [0.81] * 4)
    constant = ScheduleConfig(name="constant", warmup_epochs=0.5)
    assert [lr_factor(constant, s, 4, 3) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_scheduler_steps_per_iteration():
    model = torch.nn.Linear(2, 2)
    optimiser = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = build_scheduler(optimiser, ScheduleConfig(name="exponential", gamma=0.5), 2, 3)
    lrs = []
    for _ in range(6):
        lrs.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        scheduler.step()
    assert lrs == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_any_norm_class_is_left_out_whatever_its_parameters_shape():
    """A normalisation layer known only by its class name (LayerNorm2d, GroupNorm1, a 2-D
    scale) gets neither decay nor adaptation; a plain layer's 2-D weight does."""
    from xdtrain.optim import is_norm, no_decay_names

    class ScaleNorm2d(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(4, 4))

    class GroupNorm1(ScaleNorm2d):
        pass

    class Mixer(ScaleNorm2d):
        pass

    model = torch.nn.Sequential(ScaleNorm2d(), GroupNorm1(), Mixer(), torch.nn.Linear(4, 4))
    assert [is_norm(m) for m in model] == [True, True, False, False]
    assert no_decay_names(model) == {"0.scale", "1.scale", "3.bias"}
