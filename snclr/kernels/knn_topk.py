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
        top = K sentinels per query row                       # (BLOCK_B, K_PAD) int64 keys
        for each BLOCK_N tile of this split's rows:
            s    = sum_d Q[:, d] @ bank_tile[:, d]^T             # fp32 accumulation
            key  = pack(s, n)                                  # one sortable int64 per score
            while some row's tile max beats its current worst: # gated argmax-replace
                replace that row's worst with the tile max; drop it from the tile
        candidates[b, split, :] = top                          # unsorted, K per split
    merge kernel, grid (cdiv(B, BLOCK_B),):
        K rounds of tl.max over the SPLITS*K candidates -> sorted winners
        gather each winning row once: value = <q, row> (fp32), attention = <on, row>/|row|
        softmax over K (+ threshold) -> positiveness

Packed key: the fp32 score maps monotonically to a signed int32 ``h`` (sign-magnitude to
two's complement; NaN -> the key of -inf) and ``key = (h + 1) * 2**32 - n - 1``, so
int64 order is score order and, within equal scores, the smaller index is larger. Keys
are unique per row, so ``==`` against a maximum picks exactly one element.

Cost: flops 2*B*N*D (split) + ~4*B*K*D (merge). Bytes: bank read cdiv(B, BLOCK_B) times
from L2 but ~once from HBM, query B*D per split, written B*SPLITS*K*8 candidate keys and
B*K*(8 + 4 [+ 4]) outputs; extra memory O(B*K*SPLITS), never B x N.

Interpreter limits respected: bf16/fp16 tiles are cast to fp32 before ``tl.dot`` (bf16 dot
is wrong there); no ``tl.sort``/``tl.topk`` (element-wise slow there), only ``tl.max``
rounds on packed keys; no block pointers; a single config, no autotuning; out-of-range
loads are masked explicitly since the interpreter does not detect them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["knn_topk_merge", "knn_topk_split", "num_splits_for", "split_configs"]

# Keys below every real key: LOWEST fills out-of-range tile columns, LOWEST + 1 + slot the
# initial (distinct, so still unique) running-list entries. HIGHEST pads slots >= K so they
# are never the row's worst and never get replaced.
_LOWEST = tl.constexpr(-(2**63))
_HIGHEST = tl.constexpr(2**63 - 1)
# The monotone int32 image of -inf: every NaN score and excluded row gets it.
_NEG_INF_KEY32 = tl.constexpr(-2139095041)
# Rows per split are a multiple of this (the largest BLOCK_N), whatever config runs.
_SPLIT_ALIGN = 256
# Cap on SPLITS * K_PAD so the merge holds all candidates of a query row in registers.
_MAX_CANDIDATES = 2048


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def split_configs() -> tuple[list[triton.Config], callable]:
    """Autotune list for the split kernel and its prune predicate (key: B, N, D, K_PAD)."""
    if _interpreted():
        return [triton.Config({"BLOCK_B": 32, "BLOCK_N": 64, "BLOCK_D": 64})], None
    configs = [
        triton.Config({"BLOCK_B": bb, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bb in (64, 128)
        for bn in (64, 128)
        for bd in (32, 64)
        for w in (4, 8)
        for s in (2, 3)
    ]

    def prune(configs, named_args, **kwargs):
        # The running list lives in registers: BLOCK_B * K_PAD int64 keys per program.
        k_pad = named_args.get("K_PAD", kwargs.get("K_PAD", 1))

        def fits(c):
            if c.kwargs["BLOCK_B"] * k_pad > 4096:
                return False
            # K > 1 also keeps the (BLOCK_B, BLOCK_N) int64 key tile live through the
            # replace loop: beyond 32 keys per thread ptxas spills (sm_90 compile, 255 regs).
            tile = c.kwargs["BLOCK_B"] * c.kwargs["BLOCK_N"]
            return k_pad == 1 or tile <= 32 * 32 * c.num_warps

        kept = [c for c in configs if fits(c)]
        return kept or configs[:1]

    return configs, prune


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
def _knn_topk_update(top, tile, K: tl.constexpr):
    """Merge a (BLOCK_B, BLOCK_N) key tile into the running (BLOCK_B, K_PAD) top list."""
    if K == 1:
        top = tl.maximum(top, tl.max(tile, axis=1)[:, None])
    else:
        best = tl.max(tile, axis=1)
        worst = tl.min(top, axis=1)
        # Gated argmax-replace: once the list is warm most tiles stop after one check.
        while tl.sum((best > worst).to(tl.int32), axis=0) > 0:
            replace = (top == worst[:, None]) & (best > worst)[:, None]
            top = tl.where(replace, best[:, None], top)
            tile = tl.where(tile == best[:, None], _LOWEST, tile)
            best = tl.max(tile, axis=1)
            worst = tl.min(top, axis=1)
    return top


@triton.jit
def _knn_topk_split_kernel(
    q_ptr, bank_ptr, exclude_ptr, cand_ptr,
    B, N, D, E, rows_per_split,
    stride_qb, stride_qd, stride_bn, stride_bd, stride_eb, stride_ee,
    stride_cb, stride_cs,
    K: tl.constexpr, K_PAD: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
    CAST_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tl.static_assert(K_PAD >= K)
    tl.static_assert(BLOCK_N >= 16 and BLOCK_B >= 16 and BLOCK_D >= 16)
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    slots = tl.arange(0, K_PAD)
    d_offs = tl.arange(0, BLOCK_D)
    q_base = q_ptr + rows.to(tl.int64)[:, None] * stride_qb

    # Phase 1: distinct sentinels in the K live slots, HIGHEST in the padding slots.
    top = tl.where(slots[None, :] < K, _LOWEST + 1 + slots[None, :].to(tl.int64), _HIGHEST)
    top = tl.broadcast_to(top, (BLOCK_B, K_PAD))

    # Phase 2: stream this split's bank rows tile by tile.
    start = pid_s * rows_per_split
    stop = tl.minimum(start + rows_per_split, N)
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < stop
        b_base = bank_ptr + cols.to(tl.int64)[:, None] * stride_bn
        scores = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + d_offs
            d_ok = d < D
            q = tl.load(q_base + d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :],
                        other=0.0)
            b = tl.load(b_base + d[None, :] * stride_bd, mask=col_ok[:, None] & d_ok[None, :],
                        other=0.0)
            if CAST_FP32:
                q = q.to(tl.float32)
                b = b.to(tl.float32)
            scores = tl.dot(q, tl.trans(b), scores, input_precision=INPUT_PRECISION)
        keys = _knn_pack(scores, cols[None, :])
        if HAS_EXCLUDE:
            # Excluded rows rank with NaN and -inf scores: key of -inf, ties by index.
            banned = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.int1)
            for e in range(0, E):
                ex = tl.load(exclude_ptr + rows.to(tl.int64) * stride_eb + e * stride_ee,
                             mask=row_ok, other=-1)
                banned = banned | (cols[None, :].to(tl.int64) == ex[:, None])
            neg_inf = ((_NEG_INF_KEY32 + 1) << 32) - cols[None, :].to(tl.int64) - 1
            keys = tl.where(banned, neg_inf, keys)
        keys = tl.where(col_ok[None, :], keys, _LOWEST)
        top = _knn_topk_update(top, keys, K)

    # Phase 3: this split's K candidates per row, unsorted.
    out = cand_ptr + rows.to(tl.int64)[:, None] * stride_cb + pid_s * stride_cs + slots[None, :]
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

    for t in range(0, K):
        # Phase 1: the t-th best candidate (keys are unique, so one element matches).
        win = tl.max(cands, axis=1)
        cands = tl.where(cands == win[:, None], _LOWEST, cands)
        col = _knn_unpack_col(win)
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
        # NaN scores and excluded rows were ranked as -inf; report them as -inf.
        ineligible = (win >> 32) == _NEG_INF_KEY32
        value = tl.where(ineligible, float("-inf"), value)
        tl.store(val_ptr + rows64 * stride_vb + t, value, mask=row_ok)
        if WITH_POSITIVENESS:
            # F.normalize semantics: divide by max(|row|, 1e-12).
            a = on_dot / tl.maximum(tl.sqrt(sq_norm), 1e-12) * inv_temperature
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


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul precision; "tf32" is Triton's default otherwise.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def num_splits_for(num_queries: int, num_rows: int, k: int) -> int:
    """Bank splits: enough programs to fill a GPU, few enough candidates to merge."""
    k_pad = triton.next_power_of_2(k)
    query_blocks = triton.cdiv(num_queries, 64)
    splits = triton.cdiv(512, query_blocks)
    splits = min(splits, triton.cdiv(num_rows, _SPLIT_ALIGN), _MAX_CANDIDATES // k_pad)
    return max(1, splits)


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
    num_stages: int | None = None,
) -> torch.Tensor:
    """Per-split top-k candidates as packed int64 keys, ``(B, SPLITS, K)``, unsorted.

    ``num_splits``, the block sizes and the launch options override the heuristic and the
    autotuned config (tests use them to cover split counts, tile edges and every config).
    """
    num_queries, dim = query.shape
    num_rows = bank.shape[0]
    k_pad = triton.next_power_of_2(k)
    splits = num_splits or num_splits_for(num_queries, num_rows, k)
    align = block_n or _SPLIT_ALIGN
    rows_per_split = triton.cdiv(triton.cdiv(num_rows, splits), align) * align
    candidates = torch.empty((num_queries, splits, k), dtype=torch.int64, device=query.device)
    has_exclude = exclude is not None
    ex = exclude if has_exclude else candidates  # never read when HAS_EXCLUDE is False
    cast = _interpreted() or query.dtype != bank.dtype or query.dtype == torch.float64
    args = dict(
        q_ptr=query, bank_ptr=bank, exclude_ptr=ex, cand_ptr=candidates,
        B=num_queries, N=num_rows, D=dim, E=ex.shape[1] if has_exclude else 0,
        rows_per_split=rows_per_split,
        stride_qb=query.stride(0), stride_qd=query.stride(1),
        stride_bn=bank.stride(0), stride_bd=bank.stride(1),
        stride_eb=ex.stride(0), stride_ee=ex.stride(1),
        stride_cb=candidates.stride(0), stride_cs=candidates.stride(1),
        K=k, K_PAD=k_pad, HAS_EXCLUDE=has_exclude, CAST_FP32=cast,
        INPUT_PRECISION=_input_precision(query.dtype if not cast else torch.float32),
    )
    overrides = (block_b, block_n, block_d, num_warps, num_stages)
    if _interpreted() or any(o is not None for o in overrides):
        default = split_configs()[0][0].kwargs if _interpreted() else {
            "BLOCK_B": 64, "BLOCK_N": 64, "BLOCK_D": 64}
        meta = {
            "BLOCK_B": block_b or default["BLOCK_B"],
            "BLOCK_N": block_n or default["BLOCK_N"],
            "BLOCK_D": block_d or default["BLOCK_D"],
        }
        if num_warps is not None:
            meta["num_warps"] = num_warps
        if num_stages is not None:
            meta["num_stages"] = num_stages
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
