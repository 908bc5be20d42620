"""Fused inner-product top-K against a bank, with optional positiveness of the winners.

Formula (DESIGN section 2, steps 1-2)::

    indices[b]    = top-K_n <q_b, bank_n>      descending, ties to the smaller n;
                                               NaN scores and excluded rows rank as -inf
    values[b, t]  = <q_b, bank[indices[b, t]]> recomputed in fp32 from the K winners
    positiveness  = softmax_t(<on_b, n(bank[indices[b, t]])> / tau)   (on_b unit-norm)
                    optionally * [w > 1/K], not renormalised

Algorithm::

    split kernel, grid (cdiv(B, BLOCK_B), SPLITS), query blocks vary fastest so the
    programs sharing a bank chunk run together and the bank is read from HBM ~once:
        Q = the (BLOCK_B, D) query block, loaded once         # D <= 256 (16-bit), else chunked
        top = K empty slots per row, threshold = -inf         # (BLOCK_B, K_PAD) int64 keys
        for each BLOCK_N tile of this split's rows (the last one slid back to end in range):
            s    = Q @ bank_tile^T                            # fp32 accumulation
            best = max_n s                                    # fp32, NaN ignored
            while some row's best > its threshold:            # rare once the lists are warm
                col = first column holding best; unless stale or excluded,
                replace the row's worst key with pack(best, col); threshold = new worst
                s[:, col] = -inf; best = max_n s
        candidates[b, split, :] = top                          # unsorted, K per split
    merge kernel, grid (cdiv(B, BLOCK_B),):
        K rounds of tl.max over the SPLITS*K candidates -> sorted winners
        slots left empty (fewer than K eligible rows) take the smallest other rows
        gather each winning row once: value = <q, row> (fp32), attention = <on, row>/|row|
        softmax over K (+ threshold) -> positiveness

The strict ``>`` is the tie rule: tiles arrive in column order, so a score equal to the
threshold has a larger index than every listed one and loses, as in a stable sort; NaN
compares false and -inf never passes, so neither enters. Only entering elements are packed.

Packed key: the fp32 score maps monotonically to a signed int32 ``h`` (sign-magnitude to
two's complement; NaN -> the key of -inf) and ``key = (h + 1) * 2**32 - n - 1``, so
int64 order is score order and, within equal scores, the smaller index is larger. Keys
are unique per row, so ``==`` against a maximum picks exactly one element. An empty slot
holds the key of -inf at a column past 2**31.

Cost: flops 2*B*N*D (split) + ~4*B*K*D (merge). Bytes: bank read cdiv(B, BLOCK_B) times
from L2 but ~once from HBM, query B*D per split, written B*SPLITS*K*8 candidate keys and
B*K*(8 + 4 [+ 4]) outputs; extra memory O(B*K*SPLITS), never B x N.

Interpreter limits respected: bf16/fp16 tiles are cast to fp32 before ``tl.dot`` (bf16 dot
is wrong there); no ``tl.sort``/``tl.topk`` (element-wise slow there), only ``tl.max``
rounds; no block pointers; a single config, no autotuning; tile loads stay in range by
construction (banks shorter than a tile are padded by the launcher) since the interpreter
does not detect out-of-range loads. Static sm_90 bounds: ``bench/RESULTS.md``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from snclr.kernels._common import NORM_EPS, input_precision, interpreted

__all__ = ["knn_topk_merge", "knn_topk_split", "num_splits_for", "split_configs"]

# LOWEST pads the merge's candidate rows and marks taken candidates. HIGHEST pads list
# slots >= K so they are never the row's worst and never get replaced.
_LOWEST = tl.constexpr(-(2**63))
_HIGHEST = tl.constexpr(2**63 - 1)
# The monotone int32 image of -inf (and of NaN): the high word of an empty slot's key.
_NEG_INF_KEY32 = tl.constexpr(-2139095041)
# Larger than any column: the argmax of a tile is the min column holding the max.
_NO_COL = tl.constexpr(2**31 - 1)
# Rows per split are a multiple of this (>= the largest BLOCK_N), whatever config runs.
_SPLIT_ALIGN = 256
# Rows up to this many bytes (D = 256 in 16 bits, 128 in fp32) are scored with the query
# block loaded once and one dot per tile; wider ones in _CHUNK_D slices.
_MAX_ONE_PASS_BYTES = 512
_CHUNK_D = 64
# 32-bit registers per thread for the score tile and the running list (sm_90: 255 in all).
_REGISTER_BUDGET = 128
# F.normalize's eps, for the positiveness of the winners.
_EPS = tl.constexpr(NORM_EPS)
# Cap on SPLITS * K_PAD so the merge holds all candidates of a query row in registers.
_MAX_CANDIDATES = 2048


def split_configs() -> tuple[list[triton.Config], callable]:
    """Autotune list for the split kernel and its prune predicate (key: B, N, D, K_PAD).

    BLOCK_D is not tuned: it is the padded width D (one dot per tile, the query block
    loaded once) while a row of it fits in _MAX_ONE_PASS_BYTES, else _CHUNK_D. For K > 1
    the tile loop holds the insertion loop, which Triton does not software-pipeline, so
    num_stages only matters for K = 1 (two stages fit shared memory for every config); a
    second program per SM hides the loads of the others.
    """
    if interpreted():
        return [triton.Config({"BLOCK_B": 32, "BLOCK_N": 64})], None
    configs = [
        triton.Config({"BLOCK_B": bb, "BLOCK_N": bn}, num_warps=w, num_stages=2)
        for bb in (64, 128)
        for bn in (64, 128)
        for w in (4, 8)
    ]

    def prune(configs, named_args, **kwargs):
        k_pad = named_args.get("K_PAD", kwargs.get("K_PAD", 1))
        return [c for c in configs if _fits_registers(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_N"],
                                                      k_pad, c.num_warps)] or configs[:1]

    return configs, prune


def _fits_registers(block_b: int, block_n: int, k_pad: int, num_warps: int) -> bool:
    """Configs that compile for sm_90 without local memory (tests/sm90.py checks them).

    Per thread: the fp32 score tile and the (BLOCK_B, K_PAD) int64 list. 128 x 128 tiles
    leave less room (measured: 128 x 128, 8 warps, K = 64 spills at D = 256).
    """
    threads = 32 * num_warps
    tile = block_b * block_n // threads
    top = 2 * block_b * k_pad // threads
    budget = _REGISTER_BUDGET if block_b * block_n <= 8192 else _REGISTER_BUDGET - 16
    return tile + top <= budget


@triton.jit
def _knn_pack(score, col):
    """fp32 scores and int columns -> unique int64 keys ordered by (score, -col)."""
    score = score + 0.0  # -0.0 + 0.0 == +0.0: equal scores must get equal high words
    bits = score.to(tl.int32, bitcast=True)
    high = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    high = tl.where(score != score, _NEG_INF_KEY32, high)
    return ((high.to(tl.int64) + 1) << 32) - col.to(tl.int64) - 1


@triton.jit
def _knn_unpack_col(key):
    high = key >> 32
    return ((high + 1) << 32) - key - 1


@triton.jit
def _knn_unpack_score(key):
    """The fp32 score of a key (-inf for the empty-slot sentinels)."""
    high = (key >> 32).to(tl.int32)
    return tl.where(high < 0, high ^ 0x7FFFFFFF, high).to(tl.float32, bitcast=True)


@triton.jit
def _knn_topk_update(top, threshold, scores, base, lo, hi, excluded_cols,
                     K: tl.constexpr, HAS_EXCLUDE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Merge the fp32 scores of bank rows base + [0, BLOCK_N) into each row's top list.

    ``threshold`` is the score of each row's worst key (-inf while a slot is empty). An
    element enters only if its score is strictly above it: columns grow tile by tile, so an
    equal score has the larger index and loses the tie, and NaN, -inf and excluded rows
    never enter (the merge fills what they leave empty). Every tile costs one fp32 max per
    element; only a tile where some row's best beats its threshold pays insertion rounds
    (an argmax, a removal and a new max per element), one per element that enters. Columns
    outside [lo, hi) are not masked up front (that would cost every tile a select per
    element): when one comes up as a row's best it is removed without entering.
    """
    cols = base + tl.arange(0, BLOCK_N)
    fresh_tile = (base >= lo) & (base + BLOCK_N <= hi)
    best = tl.max(scores, axis=1)  # maxnum: a NaN never wins a max
    hit = best > threshold
    if K == 1 and not HAS_EXCLUDE:
        # A running argmax: one round at most (the rare stale tile is masked first).
        if not fresh_tile:
            stale = (cols < lo) | (cols >= hi)
            scores = tl.where(stale[None, :], float("-inf"), scores)
            best = tl.max(scores, axis=1)
            hit = best > threshold
        if tl.max(hit.to(tl.int32), axis=0) > 0:
            col = tl.min(tl.where(scores == best[:, None], cols[None, :], _NO_COL), axis=1)
            top = tl.where(hit[:, None], _knn_pack(best, col)[:, None], top)
            threshold = tl.where(hit, best, threshold)
    else:
        while tl.max(hit.to(tl.int32), axis=0) > 0:
            # The first column holding each row's best; it enters unless stale or excluded.
            col = tl.min(tl.where(scores == best[:, None], cols[None, :], _NO_COL), axis=1)
            hit = hit & (col >= lo) & (col < hi)
            if HAS_EXCLUDE:
                hit = hit & (tl.max((excluded_cols == col[:, None]).to(tl.int32), axis=1) == 0)
            worst = tl.min(top, axis=1)
            top = tl.where((top == worst[:, None]) & hit[:, None],
                           _knn_pack(best, col)[:, None], top)
            threshold = _knn_unpack_score(tl.min(top, axis=1))
            scores = tl.where(cols[None, :] == col[:, None], float("-inf"), scores)
            best = tl.max(scores, axis=1)
            hit = best > threshold
    return top, threshold


@triton.jit
def _knn_topk_split_kernel(
    q_ptr, bank_ptr, exclude_ptr, cand_ptr,
    B, N, D: tl.constexpr, E, rows_per_split,
    stride_qb, stride_qd, stride_bn, stride_bd, stride_eb, stride_ee,
    stride_cb, stride_cs,
    K: tl.constexpr, K_PAD: tl.constexpr, HAS_EXCLUDE: tl.constexpr, E_PAD: tl.constexpr,
    CAST_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tl.static_assert(K_PAD >= K)
    tl.static_assert(BLOCK_N >= 16 and BLOCK_B >= 16 and BLOCK_D >= 16)
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    slots = tl.arange(0, K_PAD)
    d = tl.arange(0, BLOCK_D)
    q_base = q_ptr + rows64[:, None] * stride_qb
    # Loop-invariant int32 offsets of a bank tile: each tile adds one scalar base.
    tile_offs = tl.arange(0, BLOCK_N)[:, None] * stride_bn + d[None, :] * stride_bd

    # Phase 1: the query block, loaded once when D fits in one block; the exclusion lists.
    if BLOCK_D >= D:
        q = tl.load(q_base + d[None, :] * stride_qd, mask=row_ok[:, None] & (d < D)[None, :],
                    other=0.0)
        if CAST_FP32:
            q = q.to(tl.float32)
    if HAS_EXCLUDE:
        e = tl.arange(0, E_PAD)
        excluded_cols = tl.load(exclude_ptr + rows64[:, None] * stride_eb + e[None, :] * stride_ee,
                                mask=row_ok[:, None] & (e < E)[None, :], other=-1)
    else:
        excluded_cols = tl.full((BLOCK_B, 1), -1, dtype=tl.int64)
    # Empty slots: the keys of -inf at columns 2**31 + slot (distinct, below every score).
    # Padding slots >= K hold HIGHEST so they are never a row's worst.
    empty = ((_NEG_INF_KEY32 + 1) << 32) - (2**31 + 1) - slots[None, :].to(tl.int64)
    top = tl.broadcast_to(tl.where(slots[None, :] < K, empty, _HIGHEST), (BLOCK_B, K_PAD))
    threshold = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)

    # Phase 2: stream this split's rows. The last tile slides back to end at ``stop`` so
    # no load is masked (the launcher pads banks shorter than a tile); the columns it
    # repeats, or that lie outside the split, never enter (see _knn_topk_update).
    start = pid_s * rows_per_split
    stop = tl.minimum(start + rows_per_split, N)
    for n0 in range(start, stop, BLOCK_N):
        base = tl.maximum(tl.minimum(n0, stop - BLOCK_N), 0)
        tile_ptr = bank_ptr + base.to(tl.int64) * stride_bn
        if BLOCK_D >= D:
            b = tl.load(tile_ptr + tile_offs, mask=(d < D)[None, :], other=0.0)
            if CAST_FP32:
                b = b.to(tl.float32)
            scores = tl.dot(q, tl.trans(b), input_precision=INPUT_PRECISION)
        else:
            scores = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d_ok = (d0 + d < D)[None, :]
                qc = tl.load(q_base + (d0 + d)[None, :] * stride_qd,
                             mask=row_ok[:, None] & d_ok, other=0.0)
                b = tl.load(tile_ptr + d0 * stride_bd + tile_offs, mask=d_ok, other=0.0)
                if CAST_FP32:
                    qc = qc.to(tl.float32)
                    b = b.to(tl.float32)
                scores = tl.dot(qc, tl.trans(b), scores, input_precision=INPUT_PRECISION)
        top, threshold = _knn_topk_update(top, threshold, scores, base, n0, stop,
                                          excluded_cols, K, HAS_EXCLUDE, BLOCK_N)

    # Phase 3: this split's K candidates per row, unsorted.
    out = cand_ptr + rows64[:, None] * stride_cb + pid_s * stride_cs + slots[None, :]
    tl.store(out, top, mask=row_ok[:, None] & (slots[None, :] < K))


@triton.jit
def _knn_topk_merge_kernel(
    cand_ptr, q_ptr, bank_ptr, online_ptr,
    idx_ptr, val_ptr, pos_ptr,
    B, N, D, num_candidates, inv_temperature, threshold_value,
    stride_cb, stride_qb, stride_qd, stride_bn, stride_bd, stride_ob, stride_od,
    stride_ib, stride_vb, stride_pb,
    K: tl.constexpr, K_PAD: tl.constexpr, C_PAD: tl.constexpr,
    WITH_POSITIVENESS: tl.constexpr, THRESHOLD: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    c = tl.arange(0, C_PAD)
    slots = tl.arange(0, K_PAD)
    d_offs = tl.arange(0, BLOCK_D)
    cands = tl.load(cand_ptr + rows64[:, None] * stride_cb + c[None, :],
                    mask=row_ok[:, None] & (c[None, :] < num_candidates), other=_LOWEST)
    attention = tl.full((BLOCK_B, K_PAD), float("-inf"), dtype=tl.float32)
    chosen = tl.full((BLOCK_B, K_PAD), -1, dtype=tl.int64)
    filled = tl.full((BLOCK_B,), -1, dtype=tl.int64)

    for t in range(0, K):
        # Phase 1: the t-th best candidate (keys are unique, so one element matches).
        win = tl.max(cands, axis=1)
        cands = tl.where(cands == win[:, None], _LOWEST, cands)
        col = _knn_unpack_col(win)
        eligible = (win >> 32) != _NEG_INF_KEY32
        chosen = tl.where((slots[None, :] == t) & eligible[:, None], col[:, None], chosen)
        # Fewer than K eligible rows (NaN scores, exclusions): as the reference's stable
        # sort does, the empty slots take the smallest rows that are not eligible winners
        # (every eligible row is one by then). They lie below 2K, so within the bank.
        if tl.max((~eligible & row_ok).to(tl.int32), axis=0) > 0:
            fill = filled + 1
            taken = (tl.max((chosen == fill[:, None]).to(tl.int32), axis=1) > 0) & ~eligible
            while tl.max(taken.to(tl.int32), axis=0) > 0:
                fill = tl.where(taken, fill + 1, fill)
                taken = (tl.max((chosen == fill[:, None]).to(tl.int32), axis=1) > 0) & ~eligible
            filled = tl.where(eligible, filled, fill)
            col = tl.where(eligible, col, fill)
        col = tl.minimum(tl.maximum(col, 0), N - 1)  # guards the gather, never changes a winner
        tl.store(idx_ptr + rows64 * stride_ib + t, col, mask=row_ok)

        # Phase 2: gather the winning row once; exact fp32 value and attention.
        value = tl.zeros((BLOCK_B,), dtype=tl.float32)
        on_dot = tl.zeros((BLOCK_B,), dtype=tl.float32)
        sq_norm = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + d_offs
            m = row_ok[:, None] & (d[None, :] < D)
            r = tl.load(bank_ptr + col[:, None] * stride_bn + d[None, :] * stride_bd, mask=m,
                        other=0.0).to(tl.float32)
            q = tl.load(q_ptr + rows64[:, None] * stride_qb + d[None, :] * stride_qd, mask=m,
                        other=0.0).to(tl.float32)
            value += tl.sum(q * r, axis=1)
            if WITH_POSITIVENESS:
                o = tl.load(online_ptr + rows64[:, None] * stride_ob + d[None, :] * stride_od,
                            mask=m, other=0.0).to(tl.float32)
                on_dot += tl.sum(o * r, axis=1)
                sq_norm += tl.sum(r * r, axis=1)
        # NaN scores and excluded rows rank as -inf; report them as -inf.
        value = tl.where(eligible, value, float("-inf"))
        tl.store(val_ptr + rows64 * stride_vb + t, value, mask=row_ok)
        if WITH_POSITIVENESS:
            # F.normalize semantics: divide by max(|row|, eps).
            a = on_dot / tl.maximum(tl.sqrt(sq_norm), _EPS) * inv_temperature
            attention = tl.where(slots[None, :] == t, a[:, None], attention)

    # Phase 3: positiveness = softmax over the K neighbours (+ threshold, not renormalised).
    if WITH_POSITIVENESS:
        live = slots[None, :] < K
        shifted = attention - tl.max(attention, axis=1)[:, None]
        p = tl.where(live, tl.exp(shifted), 0.0)
        p = p / tl.sum(p, axis=1)[:, None]
        if THRESHOLD:
            p = tl.where(p > threshold_value, p, 0.0)
        tl.store(pos_ptr + rows64[:, None] * stride_pb + slots[None, :], p,
                 mask=row_ok[:, None] & live)


_split_tuned = None


def _tuned_split_kernel():
    """The autotuned split kernel, built on first use (nothing at import time)."""
    global _split_tuned
    if _split_tuned is None:
        configs, prune = split_configs()
        _split_tuned = triton.autotune(
            # INPUT_PRECISION too: an "ieee" fp32 dot has other winning tiles than "tf32".
            configs, key=["B", "N", "D", "K_PAD", "INPUT_PRECISION"],
            prune_configs_by={"early_config_prune": prune} if prune else None,
        )(_knn_topk_split_kernel)
    return _split_tuned


def num_splits_for(num_queries: int, num_rows: int, k: int) -> int:
    """Bank splits: enough programs to fill a GPU, few enough candidates to merge."""
    k_pad = triton.next_power_of_2(k)
    query_blocks = triton.cdiv(num_queries, 64)
    splits = triton.cdiv(512, query_blocks)
    splits = min(splits, triton.cdiv(num_rows, _SPLIT_ALIGN), _MAX_CANDIDATES // k_pad)
    return max(1, splits)


def _block_d(dim: int, itemsize: int) -> int:
    width = max(16, triton.next_power_of_2(dim))
    return width if width * itemsize <= _MAX_ONE_PASS_BYTES else _CHUNK_D


def knn_topk_split(
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    *,
    exclude: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_b: int | None = None,
    block_n: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Per-split top-k candidates as packed int64 keys, ``(B, SPLITS, K)``, unsorted.

    ``num_splits``, the block sizes and ``num_warps`` override the heuristic and the
    autotuned config (tests use them to cover split counts, tile edges and every config).
    """
    num_queries, dim = query.shape
    num_rows = bank.shape[0]
    k_pad = triton.next_power_of_2(k)
    splits = num_splits or num_splits_for(num_queries, num_rows, k)
    align = block_n or _SPLIT_ALIGN
    rows_per_split = triton.cdiv(triton.cdiv(num_rows, splits), align) * align
    if num_rows < _SPLIT_ALIGN:
        # No load is masked: the last tile of a split slides back to end at N, so the bank
        # must hold at least one tile. The padding rows are never scored.
        bank = torch.cat([bank, bank.new_zeros(_SPLIT_ALIGN - num_rows, dim)])
    candidates = torch.empty((num_queries, splits, k), dtype=torch.int64, device=query.device)
    has_exclude = exclude is not None
    ex = exclude if has_exclude else candidates  # never read when HAS_EXCLUDE is False
    num_excluded = ex.shape[1] if has_exclude else 0
    cast = interpreted() or query.dtype != bank.dtype or query.dtype == torch.float64
    args = dict(
        q_ptr=query, bank_ptr=bank, exclude_ptr=ex, cand_ptr=candidates,
        B=num_queries, N=num_rows, D=dim, E=num_excluded, rows_per_split=rows_per_split,
        stride_qb=query.stride(0), stride_qd=query.stride(1),
        stride_bn=bank.stride(0), stride_bd=bank.stride(1),
        stride_eb=ex.stride(0), stride_ee=ex.stride(1),
        stride_cb=candidates.stride(0), stride_cs=candidates.stride(1),
        K=k, K_PAD=k_pad, HAS_EXCLUDE=has_exclude,
        E_PAD=triton.next_power_of_2(max(1, num_excluded)), CAST_FP32=cast,
        INPUT_PRECISION=input_precision(query.dtype if not cast else torch.float32),
        BLOCK_D=block_d or _block_d(dim, 4 if cast else bank.element_size()),
    )
    if interpreted() or any(o is not None for o in (block_b, block_n, num_warps)):
        default = split_configs()[0][0].kwargs if interpreted() else {
            "BLOCK_B": 64, "BLOCK_N": 128}
        meta = {"BLOCK_B": block_b or default["BLOCK_B"], "BLOCK_N": block_n or default["BLOCK_N"]}
        if num_warps is not None:
            meta["num_warps"] = num_warps
        grid = (triton.cdiv(num_queries, meta["BLOCK_B"]), splits)
        _knn_topk_split_kernel[grid](**args, **meta)
    else:
        def grid(meta):
            return (triton.cdiv(num_queries, meta["BLOCK_B"]), splits)

        _tuned_split_kernel()[grid](**args)
    return candidates


def knn_topk_merge(
    candidates: torch.Tensor,
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    *,
    values_dtype: torch.dtype,
    online: torch.Tensor | None = None,
    temperature: float = 1.0,
    threshold: bool = False,
    positiveness_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sorted winners of the split candidates: ``(indices, values, positiveness)``.

    ``online`` (unit-norm rows, ``(B, D)``) turns on the positiveness output; otherwise the
    third result is None.
    """
    num_queries, dim = query.shape
    num_rows = bank.shape[0]
    k_pad = triton.next_power_of_2(k)
    num_candidates = candidates.shape[1] * candidates.shape[2]
    c_pad = triton.next_power_of_2(num_candidates)
    block_b = max(1, min(16, 4096 // c_pad))
    block_d = min(128, triton.next_power_of_2(dim))
    indices = torch.empty((num_queries, k), dtype=torch.int64, device=query.device)
    values = torch.empty((num_queries, k), dtype=values_dtype, device=query.device)
    with_pos = online is not None
    positiveness = (
        torch.empty((num_queries, k), dtype=positiveness_dtype, device=query.device)
        if with_pos else None
    )
    on = online if with_pos else query
    pos = positiveness if with_pos else values
    grid = (triton.cdiv(num_queries, block_b),)
    _knn_topk_merge_kernel[grid](
        cand_ptr=candidates, q_ptr=query, bank_ptr=bank, online_ptr=on,
        idx_ptr=indices, val_ptr=values, pos_ptr=pos,
        B=num_queries, N=num_rows, D=dim, num_candidates=num_candidates,
        inv_temperature=1.0 / temperature, threshold_value=1.0 / k,
        stride_cb=candidates.stride(0), stride_qb=query.stride(0), stride_qd=query.stride(1),
        stride_bn=bank.stride(0), stride_bd=bank.stride(1),
        stride_ob=on.stride(0), stride_od=on.stride(1),
        stride_ib=indices.stride(0), stride_vb=values.stride(0), stride_pb=pos.stride(0),
        K=k, K_PAD=k_pad, C_PAD=c_pad, WITH_POSITIVENESS=with_pos, THRESHOLD=bool(threshold),
        BLOCK_B=block_b, BLOCK_D=block_d,
    )
    return indices, values, positiveness
