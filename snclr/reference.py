"""Pure-PyTorch reference implementations of the snclr ops.

These functions define the semantics that the Triton kernels in ``snclr.kernels`` must
reproduce (DESIGN section 2). They are plain PyTorch, exact in float64, and row-chunked so
that the similarity search holds at most ``SEARCH_CHUNK_SCORES`` scores (or one row) at
once. They do no input validation and no device logic: ``snclr.ops`` does both before
calling them. They are also the CPU path, so the search is O(N) per query: ``topk`` plus
exact tie resolution, the full stable sort only for rows tied across the K-th slot.

Alphabet: B queries, N bank rows, D features, K neighbours, S = K + 1 target slots,
M candidate columns.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SoftNeighbors", "knn_topk", "positiveness", "soft_neighbors",
           "soft_target_contrastive_loss", "soft_target_logits", "soft_target_loss_of",
           "threshold_mask", "threshold_value", "thresholded"]

# Rows of queries scored against all candidates per step of the loss: bounds the transient
# logits to CHUNK_ROWS x M instead of B x M.
CHUNK_ROWS = 1024
# Scores the similarity search holds at once (64 MiB in float32): its chunk of query rows
# shrinks as the bank grows, so memory stays bounded while each chunk keeps the matmul busy.
SEARCH_CHUNK_SCORES = 1 << 24


class SoftNeighbors(NamedTuple):
    """Result of :func:`soft_neighbors`.

    Attributes:
        indices: ``(B, K)`` int64 bank rows, most similar first.
        similarity: ``(B, K)`` cosine similarity ``<n(key), bank[indices]>``.
        neighbors: ``(B, K, D)`` the selected bank rows as stored.
        positiveness: ``(B, K)`` softmax over the K neighbours of
            ``<n(online), n(neighbor)> / attention_temperature``, optionally thresholded.
    """

    indices: Tensor
    similarity: Tensor
    neighbors: Tensor
    positiveness: Tensor


def _accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 stays float64; everything else is scored in float32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _stable_top_k(scores: Tensor, k: int) -> Tensor:
    """The tie rule itself: a stable descending sort puts equal scores in index order."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def _top_k_of_chunk(scores: Tensor, k: int) -> Tensor:
    """``_stable_top_k(scores, k)`` in O(N) per row; ``scores`` ``(R, N)`` may be overwritten.

    ``topk`` with one extra slot finds the winners. Where its K+1 scores strictly decrease,
    the winners and their order are unique and it is done; the other rows (a NaN, equal
    scores) are resolved exactly by :func:`_resolve_top_k`. Under ``torch.compile`` the same
    result comes from :func:`_top_k_fixed_shapes`.
    """
    if k >= scores.shape[1]:
        return _stable_top_k(scores.masked_fill_(scores.isnan(), float("-inf")), k)
    if torch.compiler.is_compiling():
        # Selecting rows by value (nonzero below) has a value-dependent shape.
        return _top_k_fixed_shapes(scores, k)
    values, indices = scores.topk(k + 1, dim=1)  # (R, K+1), values descending, NaN first
    # False for equal neighbours and for NaN. Selecting rows by value is a host sync on a
    # GPU; this path serves the CPU (and float64).
    strict = (values[:, :-1] > values[:, 1:]).all(dim=1)
    winners = indices[:, :k].contiguous()
    rows = (~strict).nonzero().squeeze(1)
    if rows.numel():
        winners[rows] = _resolve_top_k(scores[rows], k)
    return winners


def _resolve_top_k(scores: Tensor, k: int) -> Tensor:
    """``_stable_top_k(scores, k)`` for rows with NaN or equal scores; ``k < N``.

    NaN scores rank with the excluded rows, at -inf. When the K-th score beats the (K+1)-th
    the winning set is unique and only its K entries need ordering by (value descending,
    index ascending); rows where the two are equal (ties across the cut, -inf slots
    included) take the stable sort.
    """
    scores.masked_fill_(scores.isnan(), float("-inf"))
    values, indices = scores.topk(k + 1, dim=1)
    # Winners in index order first, so the stable sort by value breaks ties by index.
    winners, by_index = indices[:, :k].sort(dim=1)
    by_value = values[:, :k].gather(1, by_index).sort(dim=1, descending=True, stable=True)
    winners = winners.gather(1, by_value.indices)
    tied_rows = (values[:, k - 1] == values[:, k]).nonzero().squeeze(1)
    if tied_rows.numel():
        winners[tied_rows] = _stable_top_k(scores[tied_rows], k)
    return winners


def _top_k_fixed_shapes(scores: Tensor, k: int) -> Tensor:
    """``_stable_top_k(scores, k)`` with no value-dependent shape (``torch.compile``); k < N.

    NaN scores rank with the excluded rows, at -inf. ``topk`` finds every score above the
    K-th (the cut) but picks among the scores equal to it in no set order; the exact set
    takes, of those, the smallest indices, found by a second ``topk`` over their column
    numbers. No ``nonzero`` and no host sync, so it traces with ``fullgraph=True``; eagerly it
    costs three more passes over every row than :func:`_top_k_of_chunk`'s fast path.
    """
    num_cols = scores.shape[1]
    scores.masked_fill_(scores.isnan(), float("-inf"))
    values, indices = scores.topk(k, dim=1)  # (R, K) descending; the cut's slots last
    cut = values[:, -1:]  # (R, 1)
    above = (values > cut).sum(dim=1, keepdim=True)  # slots won outright, (R, 1)
    # Columns scoring the cut in index order; the others sort past the end (int32: N < 2**31).
    columns = torch.arange(num_cols, device=scores.device, dtype=torch.int32)
    tied = torch.where(scores == cut, columns, num_cols).topk(k, dim=1, largest=False).values
    slots = torch.arange(k, device=scores.device)
    from_cut = tied.long().gather(1, (slots - above).clamp_min(0))  # (R, K)
    winners = torch.where(slots >= above, from_cut, indices)
    # Order the winners by (value descending, index ascending): index order first, then a
    # stable sort by value.
    winners = winners.sort(dim=1).values
    by_value = scores.gather(1, winners).sort(dim=1, descending=True, stable=True).indices
    return winners.gather(1, by_value)


def _search_indices(query: Tensor, bank: Tensor, k: int, exclude: Tensor | None) -> Tensor:
    """Indices of the k best bank rows per query; no gradient, ties to the smaller index."""
    acc = _accumulation_dtype(query, bank)
    query, bank_t = query.detach().to(acc), bank.detach().to(acc).t()
    num_queries, num_rows = query.shape[0], bank.shape[0]
    chunk = max(1, min(num_queries, SEARCH_CHUNK_SCORES // num_rows))
    # One score buffer reused by every chunk: fresh large allocations cost page faults.
    buffer = query.new_empty(chunk, num_rows)
    chunks = []
    for start in range(0, num_queries, chunk):
        rows = query[start : start + chunk]
        scores = torch.mm(rows, bank_t, out=buffer[: rows.shape[0]])  # (chunk, N)
        if exclude is not None:
            # Excluded rows drop to -inf in place; entries outside [0, N) (padding -1
            # included) take min(score, +inf), a no-op: they are ignored, as in the kernels.
            ex = exclude[start : start + chunk]
            fill = torch.where((ex >= 0) & (ex < num_rows), float("-inf"), float("inf")).to(acc)
            scores.scatter_reduce_(1, ex.clamp(0, num_rows - 1), fill, reduce="amin")
        chunks.append(_top_k_of_chunk(scores, k))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=0)


def knn_topk(
    query: Tensor, bank: Tensor, k: int, *, exclude: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Inner-product top-k of each query against the bank.

    ``indices[b] = top-k_n <query_b, bank_n>`` in descending order, ties broken towards the
    smaller index; NaN scores and the rows listed in ``exclude`` never win (when fewer than k
    rows remain, the extra slots hold the value ``-inf``). ``values[b, i] =
    <query_b, bank[indices[b, i]]>`` is recomputed from the K selected rows, so its gradient
    with respect to ``query`` (and ``bank``) is a gather-and-sum, never a dense B x N matrix.

    Args:
        query: ``(B, D)`` floating point.
        bank: ``(N, D)`` floating point.
        k: number of neighbours, ``1 <= k <= N``.
        exclude: optional ``(B, E)`` int64 bank rows to skip per query; entries outside
            ``[0, N)`` are ignored (``-1`` is the usual padding).

    Returns:
        ``(values, indices)``, ``(B, K)`` each; values in the promoted dtype of the inputs,
        indices int64.
    """
    indices = _search_indices(query, bank, k, exclude)
    acc = _accumulation_dtype(query, bank)
    # (B, K, D); index_select is the cheap gather on a CPU; only these rows are converted.
    rows = bank.index_select(0, indices.flatten()).unflatten(0, indices.shape).to(acc)
    values = torch.einsum("bd,bkd->bk", query.to(acc), rows)
    # Slots that ran out of eligible rows (NaN scores, excluded rows) report -inf.
    ineligible = values.detach().isnan()
    if exclude is not None:
        ineligible |= (indices.unsqueeze(2) == exclude.unsqueeze(1)).any(dim=2)
    values = values.masked_fill(ineligible, float("-inf"))
    out_dtype = torch.promote_types(query.dtype, bank.dtype)
    return values.to(out_dtype), indices


def threshold_value(k: int) -> float:
    """The positiveness threshold of K neighbours, ``1/K``: the one definition of the value."""
    return 1.0 / k


def threshold_mask(weights: Tensor) -> Tensor:
    """The weights the threshold keeps: ``w > 1/K``, with K = ``weights.shape[-1]``."""
    return weights > threshold_value(weights.shape[-1])


def thresholded(weights: Tensor) -> Tensor:
    """The optional threshold of DESIGN section 2: ``w * [w > 1/K]``, not renormalised.

    Args:
        weights: ``(..., K)`` positiveness weights of K >= 1 neighbours.

    Returns:
        ``weights`` with the entries ``<= 1/K`` set to zero (same shape and dtype).
    """
    return weights * threshold_mask(weights)


def positiveness(
    online: Tensor, neighbors: Tensor, *, attention_temperature: float, threshold: bool
) -> Tensor:
    """``softmax_k(<n(online), n(neighbors_k)> / attention_temperature)``, optionally thresholded.

    Args:
        online: ``(B, D)`` online projections.
        neighbors: ``(B, K, D)`` their neighbours' rows.
        attention_temperature: tau_a of the softmax.
        threshold: zero the weights ``<= 1/K`` (:func:`thresholded`).

    Returns:
        ``(B, K)`` weights in the promoted dtype of the inputs (at least float32).
    """
    acc = _accumulation_dtype(online, neighbors)
    attention = torch.einsum(
        "bd,bkd->bk",
        F.normalize(online.to(acc), dim=-1),
        F.normalize(neighbors.to(acc), dim=-1),
    )
    weights = torch.softmax(attention / attention_temperature, dim=-1)
    return thresholded(weights) if threshold else weights


def soft_neighbors(
    key: Tensor,
    online: Tensor,
    bank: Tensor,
    k: int,
    *,
    attention_temperature: float = 1.0,
    threshold: bool = False,
    exclude: Tensor | None = None,
) -> SoftNeighbors:
    """Nearest bank rows of each key and their positiveness for the online feature.

    ``indices = top-k_n <n(key), bank_n>`` (bank rows are stored L2-normalised),
    ``positiveness = softmax_k(<n(online), n(bank[indices])> / attention_temperature)``, and with
    ``threshold`` the weights not above ``1/k`` are zeroed (not renormalised).

    Args:
        key: ``(B, D)`` momentum features that choose the neighbours.
        online: ``(B, D)`` online projections that score them.
        bank: ``(N, D)`` stored rows.
        k: number of neighbours, ``1 <= k <= N``.
        attention_temperature: tau_a, the softmax temperature of the positiveness.
        threshold: zero the weights ``<= 1/k``.
        exclude: optional ``(B, E)`` int64 rows to skip; entries outside ``[0, N)`` are
            ignored (``-1`` is the usual padding).

    Returns:
        :class:`SoftNeighbors`; ``positiveness`` is differentiable w.r.t. ``online`` (and
        ``bank`` when it requires grad).
    """
    similarity, indices = knn_topk(F.normalize(key, dim=-1), bank, k, exclude=exclude)
    neighbors = bank[indices]  # (B, K, D)
    weights = positiveness(online, neighbors, attention_temperature=attention_temperature,
                           threshold=threshold)
    return SoftNeighbors(indices, similarity, neighbors, weights)


def soft_target_contrastive_loss(
    queries: Tensor,
    candidates: Tensor,
    targets: Tensor,
    *,
    temperature: float,
    target_offset: int = 0,
) -> Tensor:
    """Per-row soft-target cross-entropy of normalised queries against all candidates.

    With ``s_jc = <n(q_j), n(C_c)> / temperature`` and the S columns owned by row j at
    ``own(j, s) = target_offset + j*S + s``::

        loss_j = -sum_s targets[j, s] * log_softmax_c(s_j)[own(j, s)]
               = sum(targets_j) * logsumexp_c(s_j) - sum_s targets[j, s] * s_j,own(j,s)

    The target is not normalised (DESIGN section 2).

    Args:
        queries: ``(B, D)``.
        candidates: ``(M, D)``, with ``target_offset + B*S <= M``.
        targets: ``(B, S)`` weights of the owned columns.
        temperature: logit temperature T.
        target_offset: first column owned by row 0.

    Returns:
        ``(B,)`` losses in the promoted dtype of the inputs (at least float32).
    """
    lse, owned = soft_target_logits(queries, candidates, targets, temperature=temperature,
                                    target_offset=target_offset)
    return soft_target_loss_of(targets, lse, owned)


def soft_target_logits(
    queries: Tensor,
    candidates: Tensor,
    targets: Tensor,
    *,
    temperature: float,
    target_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """What the loss reads of the logits: ``(lse, owned)``, ``(B,)`` and ``(B, S)``.

    ``lse_j = logsumexp_c s_jc`` and ``owned[j, s] = s_j,own(j,s)``, with the logits and the
    owned columns of :func:`soft_target_contrastive_loss`, row-chunked; in the promoted
    dtype of the inputs (at least float32).
    """
    acc = _accumulation_dtype(queries, candidates, targets)
    q = F.normalize(queries.to(acc), dim=-1)
    c = F.normalize(candidates.to(acc), dim=-1)
    num_rows, num_slots = targets.shape
    own = (
        target_offset
        + torch.arange(num_rows, device=q.device).unsqueeze(1) * num_slots
        + torch.arange(num_slots, device=q.device)
    )  # (B, S)
    lse, owned = [], []
    for start in range(0, num_rows, CHUNK_ROWS):
        stop = start + CHUNK_ROWS
        logits = q[start:stop] @ c.t() / temperature  # (chunk, M)
        lse.append(torch.logsumexp(logits, dim=1))
        owned.append(logits.gather(1, own[start:stop]))
    return torch.cat(lse), torch.cat(owned)


def soft_target_loss_of(targets: Tensor, lse: Tensor, owned: Tensor) -> Tensor:
    """``loss_j = sum(t_j) * lse_j - sum_s t_js * owned_js`` (DESIGN section 2), ``(B,)``."""
    weights = targets.to(lse.dtype)
    return weights.sum(dim=1) * lse - (weights * owned).sum(dim=1)
