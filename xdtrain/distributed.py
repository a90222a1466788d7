"""Process group set-up from ``torchrun``'s environment, and the few collectives we need.

Without ``torchrun`` (no ``WORLD_SIZE``) everything runs in one process and the helpers are
no-ops. NCCL on GPUs, Gloo on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from xdtrain.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes files and prints."""
        return self.rank == 0


def init(device: str = "auto") -> World:
    """Join the process group ``torchrun`` describes (if any) and pick this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(rank, local_rank, size, dev)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """Whether this process is rank 0 (or the only one): the one that prints."""
    return not active() or dist.get_rank() == 0


def mean(value: float, device: torch.device) -> float:
    """``value`` averaged over ranks."""
    if not active():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def any_true(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag, true on every rank when it is true on any rank (one collective for all)."""
    if not active():
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def total(value: float, device: torch.device) -> float:
    """``value`` summed over ranks."""
    if not active():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def sum_tensor(values: torch.Tensor) -> torch.Tensor:
    """A copy of ``values`` summed over ranks (on ``values``' device: NCCL reduces only CUDA
    tensors, so CPU tensors travel through the current GPU and back)."""
    if active():
        device = values.device
        if dist.get_backend() == "nccl" and device.type != "cuda":
            values = values.to(torch.device("cuda", torch.cuda.current_device()))
        else:
            values = values.clone()
        dist.all_reduce(values)
        values = values.to(device)
    return values


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (any picklable value)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj) -> list | None:
    """``obj`` of every rank, in rank order, on rank 0; None on the other ranks (which then
    hold nothing of the others')."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def agree(step: Callable[[], T]) -> T:
    """Run ``step`` on every rank; when it fails on any rank, fail on every rank.

    A failure on one rank alone would leave the others waiting in their next collective
    until the process group times out, or dying on a closed connection. Here every rank
    learns of it at once: the lowest failing rank raises its own exception (one line for a
    :class:`UserError`, a traceback for a bug) and every other rank raises a
    :class:`UserError` marked ``quiet``, which :func:`xdtrain.errors.run_cli` does not print,
    so the user reads the problem once. ``step`` must not itself run collectives.
    """
    error: BaseException | None = None
    try:
        result = step()
    except Exception as exc:  # noqa: BLE001 - every kind must reach the other ranks
        error = exc
    failed = gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    first = next((rank for rank, text in enumerate(failed) if text is not None), None)
    if first is None:
        return result
    if error is not None and (not active() or dist.get_rank() == first):
        raise error
    quiet = UserError(f"rank {first} failed: {failed[first]}")
    quiet.quiet = True
    raise quiet


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every rank.

    DDP sends rank 0's buffers to the others at the start of each training forward, and each
    rank then updates its own from its local batch: after the last step they differ. The
    model that is saved (``final.pt``, rank 0's) is the one every rank must score with.
    """
    if active():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
