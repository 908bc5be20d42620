"""How a process of the program starts: torchrun's environment, its process group, its device.

No other module reads torchrun's variables (``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``WORLD_SIZE``). The collectives the library uses live in :mod:`snclr.distributed`.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from snclr.training.errors import ConfigError, short_repr

__all__ = ["DEVICES", "init_from_env", "launch_rank", "launch_world_size", "local_world_size",
           "resolve_device"]

DEVICES = ("auto", "cpu", "cuda")


def init_from_env() -> bool:
    """Join torchrun's process group (NCCL with CUDA, else gloo) when ``WORLD_SIZE`` > 1.

    Returns True when this call started the group (the caller then calls
    :func:`snclr.distributed.destroy`).
    """
    if launch_world_size() <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def launch_world_size() -> int:
    """The processes torchrun started in all (``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


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
        raise ConfigError(f"device must be one of {DEVICES}, got {short_repr(name)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available")
    if name != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
