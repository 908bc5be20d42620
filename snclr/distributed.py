"""The few torch.distributed collectives the library needs; every one is a no-op on one process.

No other library module calls ``torch.distributed`` directly. Joining a group and reading
torchrun's environment belong to the training program (:mod:`snclr.training.launch`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_mean", "all_reduce_sum", "barrier", "broadcast_object", "destroy",
           "gather_no_grad", "gather_objects", "is_main", "rank", "world_size"]

def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def destroy() -> None:
    """Leave the process group (no-op without one)."""
    if _active():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if world_size() > 1:
        dist.barrier()


def world_size() -> int:
    """Number of processes in the default group (1 without torch.distributed)."""
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    """This process's rank in the default group (0 without torch.distributed)."""
    return dist.get_rank() if _active() else 0


def is_main() -> bool:
    """True on the process that writes files and prints."""
    return rank() == 0


@torch.no_grad()
def gather_no_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, in rank order. No gradient flows.

    Every rank must pass the same shape. On one process this returns ``tensor`` detached.

    Shape:
        ``(n, ...)`` in, ``(W * n, ...)`` out.
    """
    tensor = tensor.detach()
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Mean of ``tensor`` over ranks (a copy; no gradient). For logging and statistics."""
    out = tensor.detach().clone()
    if world_size() > 1:
        dist.all_reduce(out)
        out /= world_size()
    return out


@torch.no_grad()
def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum of ``tensor`` over ranks (a copy; no gradient). For logging and statistics."""
    out = tensor.detach().clone()
    if world_size() > 1:
        dist.all_reduce(out)
    return out


def _object_device(device: torch.device | None) -> torch.device | None:
    # NCCL moves the pickled bytes through this rank's GPU; gloo through the CPU.
    return device if dist.get_backend() == "nccl" else None


def broadcast_object(obj: object, *, device: torch.device | None = None, src: int = 0) -> object:
    """``obj`` of rank ``src`` on every rank (pickled; ``obj`` itself on one process).

    ``device``: this rank's GPU under NCCL (ignored with gloo).
    """
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_object_device(device))
    return box[0]


def gather_objects(obj: object, *, device: torch.device | None = None) -> list:
    """Every rank's ``obj``, in rank order, on every rank (pickled; ``[obj]`` on one process)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    if _object_device(device) is not None:
        torch.cuda.set_device(device)  # all_gather_object stages through the current device
    dist.all_gather_object(out, obj)
    return out
