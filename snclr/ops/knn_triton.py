"""Triton path of the similarity-search ops: custom ops, fake kernels and autograd.

``snclr.ops.knn`` validates inputs and calls :func:`knn_topk` / :func:`soft_neighbors`
here for ``backend="triton"``. The forward runs the split and merge kernels of
``snclr.kernels.knn_topk``; the backward never goes dense: it gathers the K winning bank
rows (O(B*K*D)) and scatters into the bank gradient only when the bank requires grad.

Registered with ``torch.library.custom_op`` + ``register_fake`` + ``register_autograd`` so
the ops work eagerly, under ``torch.compile`` and ``torch.library.opcheck``, also under the
Triton interpreter on CPU tensors (DESIGN section 4). Scores and values are computed in
fp32; float64 inputs never get here (``snclr.ops`` sends them to the reference).
"""

# No `from __future__ import annotations`: custom_op infers the schema from real types.
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from snclr.kernels.knn_topk import knn_topk_merge, knn_topk_split
from snclr.reference import SoftNeighbors

__all__ = ["knn_topk", "soft_neighbors"]

# F.normalize's eps: the backward must divide by the same clamped norm as the forward.
_NORM_EPS = 1e-12


def _similarity_grads(
    grad: Tensor, values: Tensor, query: Tensor, rows: Tensor
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``values[b, t] = <query_b, rows[b, t]>`` w.r.t. query and the rows.

    Slots reported as -inf (NaN scores, excluded rows) get no gradient, as in the
    reference's ``masked_fill``.
    """
    g = torch.where(values == float("-inf"), 0.0, grad.to(rows.dtype))  # (B, K)
    grad_query = torch.einsum("bk,bkd->bd", g, rows)
    grad_rows = g.unsqueeze(2) * query.to(rows.dtype).unsqueeze(1)  # (B, K, D)
    return grad_query, grad_rows


def _search_candidates(query: Tensor, bank: Tensor, k: int, exclude: Optional[Tensor]) -> Tensor:
    """The split kernel, run in the bank's precision.

    A 16-bit bank is searched with the query rounded to the bank's dtype, so the tile dot
    runs on the 16-bit tensor cores; the merge then recomputes the winners' values in fp32
    from the query as given. The storage dtype of the bank is the search precision.
    """
    if bank.dtype in (torch.bfloat16, torch.float16) and query.dtype != bank.dtype:
        query = query.to(bank.dtype)
    return knn_topk_split(query, bank, k, exclude=exclude)


def _scatter_rows(bank: Tensor, indices: Tensor, grad_rows: Tensor) -> Tensor:
    """``dbank[n] = sum of grad_rows[b, t] over indices[b, t] == n``."""
    flat = grad_rows.reshape(-1, bank.shape[1])
    grad = torch.zeros(bank.shape, dtype=flat.dtype, device=bank.device)
    return grad.index_add(0, indices.reshape(-1), flat).to(bank.dtype)


# ---------------------------------------------------------------------------------------
# knn_topk
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("snclr::knn_topk", mutates_args=())
def _knn_topk_op(
    query: Tensor, bank: Tensor, k: int, exclude: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    out_dtype = torch.promote_types(query.dtype, bank.dtype)
    candidates = _search_candidates(query, bank, k, exclude)
    indices, values, _ = knn_topk_merge(
        candidates, query, bank, k, values_dtype=out_dtype
    )
    return values, indices


@_knn_topk_op.register_fake
def _knn_topk_fake(
    query: Tensor, bank: Tensor, k: int, exclude: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    out_dtype = torch.promote_types(query.dtype, bank.dtype)
    num_queries = query.shape[0]
    return (
        query.new_empty((num_queries, k), dtype=out_dtype),
        query.new_empty((num_queries, k), dtype=torch.int64),
    )


def _knn_topk_setup_context(ctx, inputs, output) -> None:
    query, bank, _, _ = inputs
    values, indices = output
    ctx.save_for_backward(query, bank, values, indices)


def _knn_topk_backward(ctx, grad_values: Tensor, _grad_indices: Optional[Tensor]):
    query, bank, values, indices = ctx.saved_tensors
    acc = torch.float32  # float64 inputs take the reference (snclr.ops)
    rows = bank[indices].to(acc)  # (B, K, D), transient
    grad_query, grad_rows = _similarity_grads(grad_values, values, query, rows)
    grad_bank = _scatter_rows(bank, indices, grad_rows) if ctx.needs_input_grad[1] else None
    return grad_query.to(query.dtype), grad_bank, None, None


_knn_topk_op.register_autograd(_knn_topk_backward, setup_context=_knn_topk_setup_context)


def knn_topk(
    query: Tensor, bank: Tensor, k: int, *, exclude: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """Triton ``knn_topk``; same contract as :func:`snclr.reference.knn_topk`."""
    return torch.ops.snclr.knn_topk(query, bank, k, exclude)


# ---------------------------------------------------------------------------------------
# soft_neighbors: the search on n(key) plus positiveness of the winners for n(online).
# The normalisations stay in torch (O(B*D)) so autograd chains through them exactly as in
# the reference; the op receives unit-norm query and online rows.
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("snclr::soft_neighbors", mutates_args=())
def _soft_neighbors_op(
    query: Tensor,
    online: Tensor,
    bank: Tensor,
    k: int,
    temperature: float,
    threshold: bool,
    exclude: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    # Float outputs first: opcheck sums the outputs starting from the first one.
    candidates = _search_candidates(query, bank, k, exclude)
    indices, similarity, positiveness = knn_topk_merge(
        candidates, query, bank, k,
        values_dtype=torch.promote_types(query.dtype, bank.dtype),
        online=online.contiguous(), temperature=temperature, threshold=threshold,
        positiveness_dtype=online.dtype,
    )
    return similarity, positiveness, indices


@_soft_neighbors_op.register_fake
def _soft_neighbors_fake(
    query: Tensor,
    online: Tensor,
    bank: Tensor,
    k: int,
    temperature: float,
    threshold: bool,
    exclude: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    num_queries = query.shape[0]
    return (
        query.new_empty((num_queries, k), dtype=torch.promote_types(query.dtype, bank.dtype)),
        online.new_empty((num_queries, k)),
        query.new_empty((num_queries, k), dtype=torch.int64),
    )


def _soft_neighbors_setup_context(ctx, inputs, output) -> None:
    query, online, bank, k, temperature, threshold, _ = inputs
    similarity, _, indices = output
    ctx.save_for_backward(query, online, bank, indices, similarity)
    ctx.k, ctx.temperature, ctx.threshold = k, temperature, threshold


def _positiveness_grads(
    ctx, grad_pos: Tensor, online: Tensor, rows: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of ``softmax_t(<on, rows_t / max(|rows_t|, eps)> / tau)`` (+ threshold).

    The softmax is recomputed from the gathered rows (its pre-threshold weights are not
    saved): ``da = p * (dp - sum_t dp_t p_t)``, then the normalisation chain rule
    ``d row = (d rn - rn <d rn, rn>) / |row|`` while ``|row| > eps`` (else ``d rn / eps``).
    """
    norm = rows.norm(dim=2, keepdim=True)  # (B, K, 1)
    unit = rows / norm.clamp_min(_NORM_EPS)
    on = online.to(rows.dtype)
    p = torch.softmax(torch.einsum("bd,bkd->bk", on, unit) / ctx.temperature, dim=1)
    dp = grad_pos.to(rows.dtype)
    if ctx.threshold:
        dp = dp * (p > 1.0 / ctx.k)
    da = p * (dp - (dp * p).sum(dim=1, keepdim=True)) / ctx.temperature  # (B, K)
    grad_online = torch.einsum("bk,bkd->bd", da, unit)
    grad_unit = da.unsqueeze(2) * on.unsqueeze(1)  # (B, K, D)
    radial = (grad_unit * unit).sum(dim=2, keepdim=True)
    grad_rows = torch.where(
        norm > _NORM_EPS, (grad_unit - unit * radial) / norm, grad_unit / _NORM_EPS
    )
    return grad_online, grad_rows


def _soft_neighbors_backward(ctx, grad_similarity, grad_positiveness, _grad_indices):
    query, online, bank, indices, similarity = ctx.saved_tensors
    acc = torch.float32
    rows = bank[indices].to(acc)  # (B, K, D), transient
    grad_query = grad_online = None
    grad_rows = torch.zeros_like(rows)
    if grad_similarity is not None:
        grad_query, sim_rows = _similarity_grads(grad_similarity, similarity, query, rows)
        grad_query = grad_query.to(query.dtype)
        grad_rows = grad_rows + sim_rows
    if grad_positiveness is not None:
        grad_online, pos_rows = _positiveness_grads(ctx, grad_positiveness, online, rows)
        grad_online = grad_online.to(online.dtype)
        grad_rows = grad_rows + pos_rows
    grad_bank = _scatter_rows(bank, indices, grad_rows) if ctx.needs_input_grad[2] else None
    return grad_query, grad_online, grad_bank, None, None, None, None


_soft_neighbors_op.register_autograd(
    _soft_neighbors_backward, setup_context=_soft_neighbors_setup_context
)


def soft_neighbors(
    key: Tensor,
    online: Tensor,
    bank: Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    threshold: bool = False,
    exclude: Optional[Tensor] = None,
) -> SoftNeighbors:
    """Triton ``soft_neighbors``; same contract as :func:`snclr.reference.soft_neighbors`.

    ``key`` and ``online`` are normalised here, so autograd differentiates the normalisation
    exactly as the reference does; ``neighbors = bank[indices]`` is a plain gather.
    """
    query = F.normalize(key, dim=-1)
    online_unit = F.normalize(online.float(), dim=-1)
    similarity, positiveness, indices = torch.ops.snclr.soft_neighbors(
        query, online_unit, bank, k, float(temperature), bool(threshold), exclude
    )
    return SoftNeighbors(indices, similarity, bank[indices], positiveness)
