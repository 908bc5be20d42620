"""Gradient helpers shared by the ops' backward passes (plain torch, O(B*K*D) at most)."""

from __future__ import annotations

import torch
from torch import Tensor

from snclr.kernels._common import NORM_EPS

__all__ = ["acc_dtype", "normalize_backward", "scatter_rows", "similarity_grads"]


def acc_dtype(*tensors: Tensor) -> torch.dtype:
    """The gradients' working dtype: float32, or float64 where an input is float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def normalize_backward(x: Tensor, inv_norm: Tensor, grad_unit: Tensor) -> Tensor:
    """Chain rule of ``n(x) = x / max(||x||, eps)`` over the last dimension.

    ``(h - n <n, h>) / ||x||``, or ``h / eps`` where the norm was clamped. ``inv_norm`` is
    ``1 / max(||x||, eps)`` with a trailing dimension dropped; the result is in ``x.dtype``.
    """
    inv = inv_norm.unsqueeze(-1)
    unit = x.to(grad_unit.dtype) * inv
    along = (unit * grad_unit).sum(dim=-1, keepdim=True)
    clamped = inv >= 1.0 / NORM_EPS
    along = torch.where(clamped, torch.zeros_like(along), along)
    return ((grad_unit - unit * along) * inv).to(x.dtype)


def similarity_grads(
    grad: Tensor, values: Tensor, query: Tensor, rows: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of ``values[b, t] = <query_b, rows[b, t]>`` w.r.t. query and the rows.

    Slots reported as -inf (NaN scores, excluded rows) get no gradient, as in the
    reference's ``masked_fill``.
    """
    g = torch.where(values == float("-inf"), 0.0, grad.to(rows.dtype))  # (B, K)
    grad_query = torch.einsum("bk,bkd->bd", g, rows)
    grad_rows = g.unsqueeze(2) * query.to(rows.dtype).unsqueeze(1)  # (B, K, D)
    return grad_query, grad_rows


def scatter_rows(bank: Tensor, indices: Tensor, grad_rows: Tensor) -> Tensor:
    """``dbank[n] = sum of grad_rows[b, t] over indices[b, t] == n``."""
    flat = grad_rows.reshape(-1, bank.shape[1])
    grad = torch.zeros(bank.shape, dtype=flat.dtype, device=bank.device)
    return grad.index_add(0, indices.reshape(-1), flat).to(bank.dtype)
