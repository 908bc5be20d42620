"""Public loss op: ``soft_target_contrastive_loss``."""

from __future__ import annotations

import torch
from torch import Tensor

from snclr import reference
from snclr.ops import contrastive_triton  # registers the snclr:: custom ops on import
from snclr.ops._checks import (
    check_features,
    check_positive,
    check_same_device,
    check_same_width,
    resolve_backend,
)

__all__ = ["soft_target_contrastive_loss"]


def _check_soft_target_contrastive_loss(
    queries: Tensor, candidates: Tensor, targets: Tensor, temperature: float, target_offset: int
) -> None:
    check_features("queries", queries)
    check_features("candidates", candidates)
    check_features("targets", targets)
    check_same_width(queries=queries, candidates=candidates)
    check_same_device(queries=queries, candidates=candidates, targets=targets)
    if targets.shape[0] != queries.shape[0]:
        raise ValueError(
            f"targets must have shape (B={queries.shape[0]}, S), got {tuple(targets.shape)}"
        )
    check_positive("temperature", temperature)
    if isinstance(target_offset, bool) or not isinstance(target_offset, int):
        raise TypeError(f"target_offset must be an int, got {type(target_offset).__name__}")
    num_rows, num_slots = targets.shape
    last = target_offset + num_rows * num_slots
    if target_offset < 0 or last > candidates.shape[0]:
        raise ValueError(
            f"target columns [{target_offset}, {last}) of B={num_rows} rows x S={num_slots} "
            f"slots must lie within the M={candidates.shape[0]} candidates"
        )


def soft_target_contrastive_loss(
    queries: Tensor,
    candidates: Tensor,
    targets: Tensor,
    *,
    temperature: float,
    target_offset: int = 0,
    backend: str = "auto",
) -> Tensor:
    """Per-row soft-target contrastive cross-entropy over all candidate columns.

    Queries and candidates are L2-normalised inside. Row j owns the S columns
    ``target_offset + j*S + s`` and::

        loss_j = -sum_s targets[j, s] * log_softmax(n(q_j) . n(C)^T / T)[target_offset + j*S + s]

    The targets are not normalised (SNCLR's target mass is ``1 + sum(w)``).

    Args:
        queries: ``(B, D)`` float tensor.
        candidates: ``(M, D)`` float tensor, ``M >= target_offset + B*S``.
        targets: ``(B, S)`` float weights of each row's owned columns.
        temperature: logit temperature T > 0.
        target_offset: index of the first column owned by row 0 (``rank * B * S`` when the
            candidates are gathered from all ranks).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``(B,)`` per-row losses, float32 (float64 for float64 inputs). Differentiable w.r.t.
        ``queries``, ``targets`` and ``candidates``. NaN inputs give NaN rows (not checked:
        that would need a host sync).

    Raises:
        TypeError, ValueError: on a wrong rank, dtype, width, device, empty input,
            temperature or owned columns outside the candidates.

    Example:
        >>> import torch
        >>> from snclr.ops import soft_target_contrastive_loss
        >>> q, c = torch.randn(4, 8), torch.randn(8, 8)
        >>> soft_target_contrastive_loss(q, c, torch.ones(4, 2), temperature=0.2).shape
        torch.Size([4])
    """
    _check_soft_target_contrastive_loss(queries, candidates, targets, temperature, target_offset)
    options = dict(temperature=float(temperature), target_offset=int(target_offset))
    if resolve_backend(backend, queries, candidates, targets) == "torch":
        return reference.soft_target_contrastive_loss(queries, candidates, targets, **options)
    return contrastive_triton.soft_target_contrastive_loss(queries, candidates, targets, **options)
