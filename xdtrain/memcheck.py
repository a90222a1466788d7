"""On a machine without a GPU, say at the start when a config is a GPU config: when one
training step needs more memory than the machine has free.

The estimate is measured, not guessed: one forward pass of the run's own model on a single
sample at the config's image size, counting the bytes of every tensor autograd saves for the
backward pass (``torch.autograd.graph.saved_tensors_hooks``), times the samples of a step
(``data.batch_size`` × views). Activations dominate a step's memory on a CPU; weights,
gradients and optimiser state are added from the parameter count. It is an estimate to the
right order, not a bound: the allocator's caching and the loader's buffers come on top.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("xdtrain.memcheck")
GIB = 2**30
SHARE = 0.8  # warn when a step needs more than this share of the free memory


def available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (Linux), None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def step_bytes(model: torch.nn.Module, channels: int, size: int, samples: int, extra: int) -> int:
    """Estimated bytes of one training step on the CPU: activations saved by one forward
    pass of one ``[1, channels, size, size]`` float32 sample, times ``samples``, plus
    ``extra`` copies of the parameters (weights, gradients, optimiser state). The model's
    mode and gradients are left as they were."""
    storages: dict[int, int] = {}  # a tensor saved twice (a ReLU's output, the next
    # convolution's input) is held once: count each storage once

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    was_training = model.training
    device = next(model.parameters()).device
    sample = torch.zeros(1, channels, size, size, device=device)
    # evaluation mode: batch norm neither updates its statistics nor refuses one sample;
    # what autograd saves is the same up to the normalisation's own statistics
    model.eval()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(sample)
        del out
    finally:
        model.train(was_training)
    # weights and buffers (batch norm's running statistics) are held once, not per sample
    held = [*model.parameters(), *model.buffers()]
    kept = {t.untyped_storage().data_ptr() for t in held}
    saved = sum(n for ptr, n in storages.items() if ptr not in kept)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return saved * samples + weights * extra


def check_step_memory(model: torch.nn.Module, config, source: str) -> float | None:
    """Warn (one line naming ``source``) when a step of ``config`` on this CPU machine needs
    more than :data:`SHARE` of its free memory; return the estimate in GiB (None when the
    free memory is unknown)."""
    free = available_bytes()
    if free is None:
        return None
    data = config.data
    samples = data.batch_size * (data.views if config.task == "simclr" else 1)
    copies = 4 if config.optim.name == "adamw" else 3  # AdamW keeps two moments, LARS one
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # CPU ranks of this machine
    estimate = ranks * step_bytes(model, data.channels, data.image_size, samples, copies)
    if estimate > SHARE * free:
        machine = "runs on the CPU" if torch.cuda.is_available() else "has no GPU"
        log.warning(
            "%s is a GPU config: one step (%d samples at %d px%s) needs about %.1f GiB on "
            "this machine, which %s and %.1f GiB free; it will swap or be killed. Run it on "
            "a GPU machine, or lower data.batch_size / data.image_size (configs/demo/ holds "
            "CPU-sized configs)",
            source,
            samples,
            data.image_size,
            f", {ranks} ranks" if ranks > 1 else "",
            estimate / GIB,
            machine,
            free / GIB,
        )
    return estimate / GIB
