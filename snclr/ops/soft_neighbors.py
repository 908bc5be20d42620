"""``soft_neighbors``: the nearest bank rows of each key and their positiveness.

``snclr::soft_neighbors`` searches with ``n(key)`` and scores the winners for ``n(online)``:
the reference on the CPU, the search kernels (positiveness in the same merge) on CUDA; its
``backend`` argument overrides the choice (``snclr.ops._backend``). The normalisations stay
in torch (O(B*D)) so autograd chains through them exactly as in the reference; the op
receives unit-norm query and online rows. The backward gathers the K winners once
(O(B*K*D)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from snclr import reference
from snclr.kernels._common import NORM_EPS
from snclr.ops._backend import DEVICE_TYPES, check_backend, resolve_backend
from snclr.ops._checks import (
    check_exclude,
    check_features,
    check_k,
    check_positive,
    check_same_device,
    check_same_rows,
    check_same_width,
)
from snclr.ops._grads import acc_dtype, normalize_backward, scatter_rows, similarity_grads
from snclr.reference import SoftNeighbors

__all__ = ["SoftNeighbors", "soft_neighbors"]


def _check_soft_neighbors(
    key: Tensor, online: Tensor, bank: Tensor, k: int, exclude: Tensor | None, *,
    attention_temperature: float, backend: str,
) -> None:
    check_features("key", key)
    check_features("online", online)
    check_features("bank", bank)
    check_same_width(key=key, online=online, bank=bank)
    check_same_rows(key=key, online=online)
    device = check_same_device(key=key, online=online, bank=bank)
    check_k(k, bank.shape[0])
    check_positive("attention_temperature", attention_temperature)
    check_exclude(exclude, key.shape[0], device)
    check_backend(backend, device)


def _soft_neighbors_reference(
    query: Tensor, online: Tensor, bank: Tensor, k: int, exclude: Tensor | None, *,
    attention_temperature: float, threshold: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    similarity, indices = reference.knn_topk(query, bank, k, exclude=exclude)
    weights = reference.positiveness(online, bank[indices],
                                     attention_temperature=attention_temperature,
                                     threshold=threshold)
    return similarity, weights.to(online.dtype), indices


def _soft_neighbors_triton(
    query: Tensor, online: Tensor, bank: Tensor, k: int, exclude: Tensor | None, *,
    attention_temperature: float, threshold: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from snclr.kernels.knn_topk import knn_topk_search  # triton only on this path

    indices, similarity, positiveness = knn_topk_search(
        query, bank, k, values_dtype=torch.promote_types(query.dtype, bank.dtype),
        exclude=exclude, online=online.contiguous(), attention_temperature=attention_temperature,
        threshold=reference.threshold_value(k) if threshold else None,
        positiveness_dtype=online.dtype,
    )
    return similarity, positiveness, indices


_IMPLEMENTATIONS = {"torch": _soft_neighbors_reference, "triton": _soft_neighbors_triton}


# Float outputs first: opcheck sums the outputs starting from the first one.
@torch.library.custom_op("snclr::soft_neighbors", mutates_args=(), device_types=DEVICE_TYPES)
def _soft_neighbors_op(
    query: Tensor,
    online: Tensor,
    bank: Tensor,
    k: int,
    exclude: Tensor | None = None,
    *,
    attention_temperature: float = 1.0,
    threshold: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """The CPU and CUDA kernels: the reference on CPU, Triton on CUDA, unless ``backend``."""
    run = _IMPLEMENTATIONS[resolve_backend(backend, query, online, bank)]
    return run(query, online, bank, k, exclude, attention_temperature=attention_temperature,
               threshold=threshold)


@_soft_neighbors_op.register_fake
def _soft_neighbors_fake(query, online, bank, k, exclude=None, **_options):
    num_queries = query.shape[0]
    return (
        query.new_empty((num_queries, k), dtype=torch.promote_types(query.dtype, bank.dtype)),
        online.new_empty((num_queries, k)),
        query.new_empty((num_queries, k), dtype=torch.int64),
    )


def _soft_neighbors_setup_context(ctx, inputs, keyword_only_inputs, output) -> None:
    query, online, bank, _, _ = inputs
    similarity, _, indices = output
    ctx.save_for_backward(query, online, bank, indices, similarity)
    ctx.attention_temperature = keyword_only_inputs["attention_temperature"]
    ctx.threshold = keyword_only_inputs["threshold"]


def _positiveness_grads(
    ctx, grad_pos: Tensor, online: Tensor, rows: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of ``softmax_t(<on, rows_t / max(|rows_t|, eps)> / tau_a)`` (+ threshold).

    The softmax is recomputed from the gathered rows (its pre-threshold weights are not
    saved): ``da = p * (dp - sum_t dp_t p_t)``, then the normalisation chain rule.
    """
    tau = ctx.attention_temperature
    inv_norm = 1.0 / rows.norm(dim=2).clamp_min(NORM_EPS)  # (B, K)
    unit = rows * inv_norm.unsqueeze(2)
    on = online.to(rows.dtype)
    p = torch.softmax(torch.einsum("bd,bkd->bk", on, unit) / tau, dim=1)
    dp = grad_pos.to(rows.dtype)
    if ctx.threshold:
        dp = dp * reference.threshold_mask(p)
    da = p * (dp - (dp * p).sum(dim=1, keepdim=True)) / tau  # (B, K)
    grad_online = torch.einsum("bk,bkd->bd", da, unit)
    grad_unit = da.unsqueeze(2) * on.unsqueeze(1)  # (B, K, D)
    return grad_online, normalize_backward(rows, inv_norm, grad_unit)


def _soft_neighbors_backward(ctx, grad_similarity, grad_positiveness, _grad_indices):
    query, online, bank, indices, similarity = ctx.saved_tensors
    rows = bank[indices].to(acc_dtype(query, online, bank))  # (B, K, D), transient
    grad_query = grad_online = None
    grad_rows = torch.zeros_like(rows)
    if grad_similarity is not None:
        grad_query, sim_rows = similarity_grads(grad_similarity, similarity, query, rows)
        grad_query = grad_query.to(query.dtype)
        grad_rows = grad_rows + sim_rows
    if grad_positiveness is not None:
        grad_online, pos_rows = _positiveness_grads(ctx, grad_positiveness, online, rows)
        grad_online = grad_online.to(online.dtype)
        grad_rows = grad_rows + pos_rows
    grad_bank = scatter_rows(bank, indices, grad_rows) if ctx.needs_input_grad[2] else None
    return grad_query, grad_online, grad_bank, None, None


_soft_neighbors_op.register_autograd(
    _soft_neighbors_backward, setup_context=_soft_neighbors_setup_context
)


def soft_neighbors(
    key: Tensor,
    online: Tensor,
    bank: Tensor,
    k: int,
    *,
    attention_temperature: float = 1.0,
    threshold: bool = False,
    exclude: Tensor | None = None,
    backend: str = "auto",
) -> SoftNeighbors:
    """The k nearest bank rows of each key, with their positiveness for ``online``.

    ``indices = top-k_n <n(key), bank_n>`` (bank rows are stored L2-normalised, so this is
    cosine similarity),
    ``positiveness = softmax_k(<n(online), n(neighbor)> / attention_temperature)``,
    and with ``threshold`` weights ``<= 1/k`` are set to zero without renormalising
    (DESIGN section 2).

    Args:
        key: ``(B, D)`` momentum features that choose the neighbours.
        online: ``(B, D)`` online projections that score them.
        bank: ``(N, D)`` L2-normalised rows.
        k: neighbours per key, ``1 <= k <= N``.
        attention_temperature: tau_a, the positiveness softmax temperature (1 reproduces
            the reference code).
        threshold: zero the weights not above ``1/k``.
        exclude: optional ``(B, E)`` int64 rows to skip per key; entries outside ``[0, N)``
            are ignored (``-1`` is the usual padding).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        :class:`SoftNeighbors` with ``indices`` ``(B, K)`` int64, ``similarity`` ``(B, K)``,
        ``neighbors`` ``(B, K, D)`` in the bank's dtype and ``positiveness`` ``(B, K)``,
        differentiable w.r.t. ``online``. A NaN ``online`` row gives NaN positiveness.

    Raises:
        TypeError, ValueError: on a wrong rank, dtype, width, device, empty input, k,
            attention_temperature or backend.
        ImportError: ``backend="triton"`` where triton is not installed.

    Example:
        >>> import torch
        >>> from snclr.ops import soft_neighbors
        >>> bank = torch.nn.functional.normalize(torch.randn(64, 8), dim=1)
        >>> out = soft_neighbors(torch.randn(4, 8), torch.randn(4, 8), bank, 5)
        >>> out.neighbors.shape, round(out.positiveness.sum(1)[0].item(), 4)
        (torch.Size([4, 5, 8]), 1.0)
    """
    _check_soft_neighbors(key, online, bank, k, exclude, backend=backend,
                          attention_temperature=attention_temperature)
    query = F.normalize(key, dim=-1)
    # The positiveness is computed in fp32 at least (float64 stays float64).
    online_unit = F.normalize(online.to(acc_dtype(online, bank)), dim=-1)
    similarity, positiveness, indices = _soft_neighbors_op(
        query, online_unit, bank, k, exclude, backend=backend,
        attention_temperature=float(attention_temperature), threshold=bool(threshold),
    )
    return SoftNeighbors(indices, similarity, bank[indices], positiveness)
