"""The few torch.distributed helpers snclr needs; every one is a no-op on one process.

No other module calls ``torch.distributed`` directly or reads torchrun's environment
(``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``WORLD_SIZE``); the device a process runs
on is chosen here too.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

from snclr.errors import ConfigError

__all__ = ["DEVICES", "all_reduce_mean", "all_reduce_sum", "barrier", "destroy", "gather_no_grad",
           "init_from_env", "is_main", "launch_rank", "local_world_size", "rank",
           "resolve_device", "world_size"]

DEVICES = ("auto", "cpu", "cuda")


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_from_env() -> bool:
    """Join torchrun's process group (NCCL with CUDA, else gloo) when ``WORLD_SIZE`` > 1.

    Returns True when this call started the group (the caller then calls :func:`destroy`).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _active():
        return False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


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


def launch_rank() -> int:
    """The rank torchrun gave this process (``RANK``; 0 without torchrun).

    Unlike :func:`rank` it holds before the process group starts and after it is destroyed.
    """
    return int(os.environ.get("RANK", "0"))


def local_world_size() -> int:
    """Processes torchrun started on this machine (``LOCAL_WORLD_SIZE``; 1 without it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def resolve_device(name: str = "auto") -> torch.device:
    """The device this process runs on.

    ``"cuda"`` is this process's GPU (``cuda:LOCAL_RANK``), ``"cpu"`` the CPU, and ``"auto"``
    the GPU when CUDA is available, else the CPU.

    Raises:
        ConfigError: an unknown name, or ``"cuda"`` where CUDA is not available (never a
            silent fall-back to the CPU).
    """
    if name not in DEVICES:
        raise ConfigError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available")
    if name != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


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
