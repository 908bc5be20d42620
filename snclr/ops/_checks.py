"""Input validation shared by the public ops.

Every check raises before any computation, with a message naming the argument, what was
expected and what was given. None of them reads tensor values (no host sync).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_features(name: str, tensor: object, ndim: int = 2) -> Tensor:
    """A non-empty floating-point tensor of rank ``ndim``."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}"
        )
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if tensor.numel() == 0 and ndim == 2:
        raise ValueError(f"{name} must not be empty, got shape {tuple(tensor.shape)}")
    return tensor


def check_same_width(**tensors: Tensor) -> int:
    """All tensors share their last (feature) dimension D; returns it."""
    widths = {name: t.shape[-1] for name, t in tensors.items()}
    if len(set(widths.values())) > 1:
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors.items())
        raise ValueError(f"feature dimension D must match: got {shapes}")
    return next(iter(widths.values()))


def check_same_rows(**tensors: Tensor) -> int:
    """All tensors share their first (batch) dimension; returns it."""
    rows = {name: t.shape[0] for name, t in tensors.items()}
    if len(set(rows.values())) > 1:
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors.items())
        raise ValueError(f"batch dimension B must match: got {shapes}")
    return next(iter(rows.values()))


def check_same_device(**tensors: Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device: got {listing}")
    return next(iter(devices.values()))


def check_k(k: object, num_rows: int, *, bank_name: str = "bank") -> int:
    """``1 <= k <= num_rows`` searchable rows."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > num_rows:
        raise ValueError(f"k={k} exceeds the {num_rows} searchable rows of {bank_name}")
    return k


def check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_exclude(exclude: object, num_queries: int, device: torch.device) -> Tensor | None:
    """Optional ``(B, E)`` int64 bank rows to skip per query, ``-1`` for padding."""
    if exclude is None:
        return None
    if not isinstance(exclude, Tensor):
        raise TypeError(f"exclude must be a torch.Tensor or None, got {type(exclude).__name__}")
    if exclude.dtype != torch.int64:
        raise TypeError(f"exclude must be int64, got dtype {exclude.dtype}")
    if exclude.dim() != 2 or exclude.shape[0] != num_queries:
        raise ValueError(
            f"exclude must have shape (B={num_queries}, E), got {tuple(exclude.shape)}"
        )
    if exclude.device != device:
        raise ValueError(f"exclude must be on {device}, got {exclude.device}")
    return exclude
