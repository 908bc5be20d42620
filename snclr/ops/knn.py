"""Public similarity-search ops: ``knn_topk`` and ``soft_neighbors``."""

from __future__ import annotations

import torch
from torch import Tensor

from snclr import reference
from snclr.ops import knn_triton
from snclr.ops._checks import (
    check_exclude,
    check_features,
    check_k,
    check_positive,
    check_same_device,
    check_same_width,
    resolve_backend,
)
from snclr.reference import SoftNeighbors

__all__ = ["SoftNeighbors", "knn_topk", "soft_neighbors"]


def _check_knn_topk(query: Tensor, bank: Tensor, k: int, exclude: Tensor | None) -> None:
    check_features("query", query)
    check_features("bank", bank)
    check_same_width(query=query, bank=bank)
    device = check_same_device(query=query, bank=bank)
    check_k(k, bank.shape[0])
    check_exclude(exclude, query.shape[0], device)


def knn_topk(
    query: Tensor,
    bank: Tensor,
    k: int,
    *,
    exclude: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Inner-product top-k of each query row against the bank rows.

    ``indices[b]`` are the k bank rows with the largest ``<query_b, bank_n>``, most similar
    first; ties go to the smaller index. NaN scores never win, and neither do the rows in
    ``exclude``; if fewer than k rows are eligible the remaining slots hold ``-inf``.

    Args:
        query: ``(B, D)`` float tensor.
        bank: ``(N, D)`` float tensor on the same device.
        k: neighbours per query, ``1 <= k <= N``.
        exclude: optional ``(B, E)`` int64 rows to skip per query, ``-1`` for padding.
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.

    Returns:
        ``(values, indices)``: ``(B, K)`` scores in the inputs' promoted dtype, and
        ``(B, K)`` int64 indices. ``values`` is differentiable w.r.t. ``query`` and ``bank``
        through the K selected rows only.

    Raises:
        TypeError, ValueError: on a wrong rank, dtype, width, device, empty input or k.

    Example:
        >>> import torch
        >>> from snclr.ops import knn_topk
        >>> bank = torch.eye(4)
        >>> values, indices = knn_topk(torch.tensor([[0.1, 0.9, 0.0, 0.5]]), bank, 2)
        >>> indices.tolist()
        [[1, 3]]
    """
    _check_knn_topk(query, bank, k, exclude)
    if resolve_backend(backend, query, bank) == "torch":
        return reference.knn_topk(query, bank, k, exclude=exclude)
    return knn_triton.knn_topk(query, bank, k, exclude=exclude)


def _check_soft_neighbors(
    key: Tensor, online: Tensor, bank: Tensor, k: int, temperature: float, exclude: Tensor | None
) -> None:
    check_features("key", key)
    check_features("online", online)
    check_features("bank", bank)
    check_same_width(key=key, online=online, bank=bank)
    if key.shape[0] != online.shape[0]:
        raise ValueError(
            f"key and online must have the same batch size B: got key {tuple(key.shape)}, "
            f"online {tuple(online.shape)}"
        )
    device = check_same_device(key=key, online=online, bank=bank)
    check_k(k, bank.shape[0])
    check_positive("temperature", temperature)
    check_exclude(exclude, key.shape[0], device)


def soft_neighbors(
    key: Tensor,
    online: Tensor,
    bank: Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    threshold: bool = False,
    exclude: Tensor | None = None,
    backend: str = "auto",
) -> SoftNeighbors:
    """The k nearest bank rows of each key, with their positiveness for ``online``.

    ``indices = top-k_n <n(key), bank_n>`` (bank rows are stored L2-normalised, so this is
    cosine similarity), ``positiveness = softmax_k(<n(online), n(neighbor)> / temperature)``,
    and with ``threshold`` weights ``<= 1/k`` are set to zero without renormalising
    (DESIGN section 2).

    Args:
        key: ``(B, D)`` momentum features that choose the neighbours.
        online: ``(B, D)`` online projections that score them.
        bank: ``(N, D)`` L2-normalised rows.
        k: neighbours per key, ``1 <= k <= N``.
        temperature: positiveness softmax temperature (1 reproduces the reference code).
        threshold: zero the weights not above ``1/k``.
        exclude: optional ``(B, E)`` int64 rows to skip per key, ``-1`` for padding.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        :class:`SoftNeighbors` with ``indices`` ``(B, K)`` int64, ``similarity`` ``(B, K)``,
        ``neighbors`` ``(B, K, D)`` in the bank's dtype and ``positiveness`` ``(B, K)``,
        differentiable w.r.t. ``online``. A NaN ``online`` row gives NaN positiveness.

    Raises:
        TypeError, ValueError: on a wrong rank, dtype, width, device, empty input, k or
            temperature.

    Example:
        >>> import torch
        >>> from snclr.ops import soft_neighbors
        >>> bank = torch.nn.functional.normalize(torch.randn(64, 8), dim=1)
        >>> out = soft_neighbors(torch.randn(4, 8), torch.randn(4, 8), bank, 5)
        >>> out.neighbors.shape, round(out.positiveness.sum(1)[0].item(), 4)
        (torch.Size([4, 5, 8]), 1.0)
    """
    _check_soft_neighbors(key, online, bank, k, temperature, exclude)
    options = dict(temperature=float(temperature), threshold=bool(threshold), exclude=exclude)
    if resolve_backend(backend, key, online, bank) == "torch":
        return reference.soft_neighbors(key, online, bank, k, **options)
    return knn_triton.soft_neighbors(key, online, bank, k, **options)
