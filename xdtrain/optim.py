"""Optimisers and learning-rate schedules, stepped every iteration.

Weight decay and LARS's trust-ratio adaptation apply to weights of convolutions and linear
layers only; biases, the parameters of every normalisation layer (batch, layer, group,
instance or RMS norm, whatever its class) and what a timm model lists in
``no_weight_decay()`` (a ViT's position embedding and class token) are excluded, as in
SimCLR, the LARS paper and timm's ``param_groups_weight_decay`` (the study's LARS adapted
them too, and could divide by a zero norm).
"""

from __future__ import annotations

import math
from fnmatch import fnmatch

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017).

    For a parameter group with ``adapt=True`` the update of ``w`` uses
    ``g + wd·w`` scaled by ``eta·‖w‖ / ‖g + wd·w‖``; when either norm is zero the ratio is 1,
    so a zero gradient or a zero-initialised weight never gives inf or NaN."""

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, adapt=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["adapt"]:
                    if group["weight_decay"]:
                        grad = grad.add(p, alpha=group["weight_decay"])
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(grad)
                    ratio = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        group["eta"] * w_norm / g_norm.clamp_min(1e-12),
                        torch.ones_like(w_norm),
                    )
                    grad = grad * ratio
                state = self.state[p]
                buf = state.get("momentum")
                if buf is None:
                    buf = state["momentum"] = torch.clone(grad).detach()
                else:
                    buf.mul_(group["momentum"]).add_(grad)
                p.add_(buf, alpha=-group["lr"])
        return loss


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's batch/instance/layer/group/RMS norms and subclasses
    (timm's ``BatchNormAct2d``, ``LayerNorm2d``), or any class whose name ends in ``Norm``
    with a suffix of digits or ``d`` (timm's ``RmsNorm``, ``GroupNorm1``)."""
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
    if isinstance(module, norms):
        return True
    name = type(module).__name__.removesuffix("d").rstrip("0123456789")
    return name.endswith("Norm")


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get neither weight decay nor LARS adaptation: biases,
    every parameter of a normalisation layer (:func:`is_norm`), every other parameter with
    at most one dimension, and the names the model's or any submodule's
    ``no_weight_decay()`` returns (timm's convention, with its wildcards; a name there may
    also be a module whose parameters all count; XCiT's attention lists its temperature)."""
    names = set()
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        own = [name for name, _ in module.named_parameters(recurse=False)]
        if is_norm(module):
            names.update(dot + name for name in own)
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            patterns = list(listed())
            for name, _ in module.named_parameters():
                # timm's rule (fnmatch: "pos_embed.*"), and a module's name for all of it
                if any(fnmatch(name, p) or name.startswith(f"{p}.") for p in patterns):
                    names.add(dot + name)
    for name, param in model.named_parameters():
        if param.ndim <= 1 or name.endswith(".bias"):
            names.add(name)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed, adapted) and the parameters of
    :func:`no_decay_names` (neither)."""
    decay, plain = [], []
    excluded = no_decay_names(model)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (plain if name in excluded else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "adapt": True}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0, "adapt": False})
    return groups


def scaled_lr(lr: float, global_batch: int, scale: bool) -> float:
    """``lr × global batch / 256`` when ``scale`` (Goyal et al.; SimCLR's LARS rule)."""
    return lr * global_batch / 256 if scale else lr


FUSED_DEVICES = ("cpu", "cuda")  # where torch has fused AdamW and SGD kernels


def fused_kernels(groups: list[dict]) -> bool:
    """Whether torch's fused AdamW/SGD kernels take every parameter of ``groups``: floating
    tensors, all on the CPU or all on CUDA devices."""
    params = [p for group in groups for p in group["params"]]
    kinds = {p.device.type for p in params}
    return (
        bool(params)
        and len(kinds) == 1
        and kinds <= set(FUSED_DEVICES)
        and all(p.is_floating_point() for p in params)
    )


def build_optimizer(model: nn.Module, optim, global_batch: int) -> torch.optim.Optimizer:
    """The optimiser named by ``optim`` (an ``OptimConfig``) over ``model``'s trainable
    parameters (already on their device), with the decay/no-decay groups above.

    AdamW and SGD use torch's fused kernels (``fused=True``: one kernel over every tensor)
    where they apply (:func:`fused_kernels`), else torch's default for the device (on the
    CPU one tensor at a time); all compute the same update (Loshchilov & Hutter 2019 for
    AdamW), the fused one in a fraction of the time: on one CPU core AdamW's step over a
    ResNet-18 U-Net took 94 ms one tensor at a time, 91 ms multi-tensor (``foreach``) and
    18 ms fused, beside 131 ms of forward and backward at the demo's scale
    (``tools/bench_step.py``, docs/benchmarks.md). GradScaler unscales inside the fused
    kernel. A checkpoint resumes with the kernels it was saved with
    (:func:`load_optimizer_state`), so a run started before this choice continues exactly
    as it would have."""
    lr = scaled_lr(optim.lr, global_batch, optim.scale_lr)
    groups = param_groups(model, optim.weight_decay)
    if optim.name == "lars":
        return LARS(groups, lr=lr, momentum=optim.momentum, eta=optim.trust_coefficient)
    for group in groups:
        group.pop("adapt")
    fused = True if fused_kernels(groups) else None
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused)
    return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum, fused=fused)


def lr_factor(schedule, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Multiplier of the base learning rate at iteration ``step`` (``ScheduleConfig``).

    Linear warmup from 0 over ``warmup_epochs``, then ``cosine`` (to ``min_lr`` as a share of
    the base rate, over the remaining iterations), ``exponential`` (×``gamma`` at each epoch
    boundary after warmup, the study's per-epoch decay) or ``constant``."""
    warmup = int(round(schedule.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if schedule.name == "constant":
        return 1.0
    if schedule.name == "exponential":
        return schedule.gamma ** ((step - warmup) // steps_per_epoch)
    total = max(1, epochs * steps_per_epoch - warmup)
    progress = min(1.0, (step - warmup) / total)
    floor = schedule.min_lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, schedule, steps_per_epoch: int, epochs: int):
    """A ``LambdaLR`` to be stepped once per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(schedule, step, steps_per_epoch, epochs)
    )


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load ``state`` (an optimiser's ``state_dict``) into ``optimizer``, as saved: its
    groups' settings come back with it, the choice of kernels (``fused``, ``foreach``)
    among them, so a run resumes with the arithmetic it started with. Whether the optimiser
    unscales a GradScaler's gradients itself follows the loaded groups: torch decides it
    once, when the optimiser is built, and a fused optimiser given a non-fused run's state
    would otherwise be handed the scale and fail at its first step."""
    optimizer.load_state_dict(state)
    if hasattr(optimizer, "_step_supports_amp_scaling"):
        optimizer._step_supports_amp_scaling = all(
            group.get("fused") for group in optimizer.param_groups
        )
