"""Fused inner-product top-K against a bank, with optional positiveness of the winners.

Formula (DESIGN section 2, steps 1-2)::

    indices[b]    = top-K_n <q_b, bank_n>      descending, ties to the smaller n;
                                               NaN scores and excluded rows rank as -inf
    values[b, t]  = <q_b, bank[indices[b, t]]> recomputed in fp32 from the winners
    positiveness  = softmax_t(<on_b, n(bank[indices[b, t]])> / tau_a)   (on_b unit-norm)
                    optionally * [w > threshold], not renormalised (SNCLR: 1/K, given)

Algorithm (two kernels). The bank is cut into groups of G = BLOCK_N rows (one tile) and
subgroups of SUB rows (S = G / SUB per group), aligned to the bank's start::

    split kernel, grid (cdiv(B, BLOCK_B), SPLITS), query blocks vary fastest so the
    programs sharing a bank chunk run together and the bank is read from HBM ~once:
        Q = the (BLOCK_B, D) query block, loaded once         # D <= 256 (16-bit), else chunked
        top = K empty slots per row                           # (BLOCK_B, K_PAD) int64 keys
        for each full tile of this split (software-pipelined: no data-dependent loop;
                tile t's selection runs while tile t+1's dot is in flight, and tile t+2's
                bank rows are copied to shared memory meanwhile):
            s    = Q @ bank_tile^T                            # fp32 accumulation
            smax = max over each subgroup of s                # NaN and excluded rows ignored
            key  = pack(max(smax), first row of the group)
            if key > min(top): replace the row's minimum,     # a fixed cost per tile
                store smax at that slot                       # B x SPLITS x K x S floats
            (a split of at most K_PAD tiles, DIRECT: the tile's place in the split is
             its slot, every group enters, nothing is compared)
        the split's last, partial tile: the same, with masked loads and columns
        keys[b, split, :] = top, sorted                       # K group keys per split
    merge kernel, grid (B,), one query row per program:
        walk the splits' sorted lists from their heads, K rounds -> the K best groups
            (each split's next key loaded a round ahead)
        their K*S subgroup maxima, ranked or K rounds of tl.max -> the K best subgroups
        one gather of their K*SUB rows: exact fp32 scores; ranked or K rounds -> sorted winners
            (ranked: each candidate's rank is the count of keys above it, n^2 compares with
            no dependent round, while n = K*S and K*SUB are at most 256; merge_blocks)
        slots left empty (fewer than K eligible rows) take the smallest other rows
        one gather of the K winning rows: values, attention = <on, row>/|row|;
        softmax over K (+ threshold)

Why the K best subgroups of the K best groups hold every winner. Order elements by (score
desc, index asc), NaN and excluded rows ineligible, and any partition of the bank into
contiguous pieces by (max desc, first row asc), a piece's max taken over its eligible
elements. Let w be one of the K winners and p its piece, with max m_p >= s_w. If p were
not among the K best pieces, K other pieces would rank above it; the best element e of
each (its max, at its smallest index) has s_e >= m_p >= s_w, and where s_e == s_w that
piece ranks above p only by starting earlier, so e has a smaller index than w: K distinct
elements would rank above w, and w would be no winner. So the K best subgroups hold every
winner. Each of them lies in one of the K best groups: were its group g not among them, K
groups would rank above g, and the best subgroup of each (holding its max, the first such)
would rank above it by the same argument. Ties at the cut (tau, the K-th group or subgroup
max) are thus resolved by position, exactly as the stable sort resolves them by the row
index. A piece whose rows are all ineligible has max -inf and never outranks one holding
a winner; whatever it holds is ineligible, and the merge fills empty slots by the
contract. Groups and subgroups are ranked with the split's scores (the search precision:
tensor-core bf16 or tf32); the winners and their order among the K*SUB refined rows with
the merge's fp32 scores.

Packed key: the fp32 score maps monotonically to a signed int32 ``h`` (sign-magnitude to
two's complement; NaN -> the key of -inf) and ``key = (h + 1) * 2**32 - c - 1`` for a
column (a row; a group's first row plus its list slot) c, so int64 order is score order
and, within equal scores, the smaller column is larger. Keys are unique per row, so ``==``
against a maximum picks exactly one element. An empty slot holds the key of -inf at a
column past 2**31.

Cost: flops 2*B*N*D (split) + 2*B*K*(SUB+1)*D (merge). Bytes: the bank read cdiv(B,
BLOCK_B) times from L2 but ~once from HBM, the query B*D per split; written B*SPLITS*K*(8 +
4*S); the merge reads B*K*SUB bank rows (the refine) and B*K rows (the winners) and writes
B*K*(8 + 4 [+ 4]). Extra memory O(B*SPLITS*K*S), never B x N. Per score the split pays
the subgroup max and the copy out of the dot's registers (two fp32 ops, inside one
thread: ``_knn_topk_tile_rows``) and, per tile, one compare-and-replace over each row's K
slots, spread over the four threads that hold the row: G trades split bookkeeping
against the size of the groups, SUB the merge's refine against the subgroup maxima
(``search_plan``).

Interpreter limits respected: bf16/fp16 tiles are cast to fp32 before ``tl.dot`` (bf16 dot
is wrong there); no ``tl.sort``/``tl.topk`` (element-wise slow there), only ``tl.max``
rounds and ranks by broadcast compares; no block pointers; a single config, no
autotuning; every load is in range by construction or masked, since the interpreter does
not detect out-of-range loads. Static sm_90 figures: ``bench/RESULTS.md`` and
``bench/model_knn.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from snclr.kernels._common import NORM_EPS, input_precision, interpreted, one_pass_block_d

__all__ = ["SearchPlan", "SplitLayout", "knn_topk_merge", "knn_topk_search", "knn_topk_split",
           "num_splits_for", "search_plan", "split_configs", "split_layout"]

# LOWEST pads the merge's candidate rows and marks taken candidates. HIGHEST pads list
# slots >= K so they are never the row's minimum and never get replaced.
_LOWEST = tl.constexpr(-(2**63))
_HIGHEST = tl.constexpr(2**63 - 1)
# The monotone int32 image of -inf (and of NaN): the high word of an empty slot's key.
_NEG_INF_KEY32 = tl.constexpr(-2139095041)
# Columns of empty slots start here: past every row and group index.
_EMPTY_COL = tl.constexpr(2**31)
# Rows per split are a multiple of this (>= the largest BLOCK_N), whatever config runs.
_SPLIT_ALIGN = 256
# 32-bit registers per thread for what _fits_registers counts (sm_90: 255 in all).
_REGISTER_BUDGET = 200
# F.normalize's eps, for the positiveness of the winners.
_EPS = tl.constexpr(NORM_EPS)
# Cap on SPLITS * K_PAD: the group keys and subgroup maxima the split writes per query row.
_MAX_CANDIDATES = 4096
# Split programs (of 64 query rows) to aim for: about two per SM of an H200.
_SPLIT_PROGRAMS = 256
# Batches up to this many query rows are latency-bound (see search_plan, merge_blocks).
_SMALL_BATCH = 512
# The merge ranks its candidates (n^2 compares) instead of taking K rounds up to this many.
_RANKED_KEYS = 256


def split_configs() -> tuple[list[triton.Config], callable]:
    """Autotune list for the split kernel and its prune predicate (key: B, N, D, K_PAD,
    BLOCK_N, SUB).

    BLOCK_N (the group) and SUB come from ``search_plan``; BLOCK_D is not tuned: it is the
    padded width D (one dot per tile, the query block loaded once) while a row of it fits
    in MAX_ONE_PASS_BYTES, else CHUNK_D. The tile loop holds no data-dependent loop, so
    Triton software-pipelines its loads; the prune keeps the stages that fit shared memory.
    """
    if interpreted():
        return [triton.Config({"BLOCK_B": 32})], None
    configs = [
        triton.Config({"BLOCK_B": bb}, num_warps=w, num_stages=s)
        for bb in (64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ]

    def prune(configs, named_args, **kwargs):
        def arg(name, default):
            return named_args.get(name, kwargs.get(name, default))

        k_pad, block_n = arg("K_PAD", 8), arg("BLOCK_N", 128)
        row_bytes = arg("BLOCK_D", 256) * (4 if arg("CAST_FP32", False) else 2)
        return [c for c in configs
                if _fits_registers(c.kwargs["BLOCK_B"], block_n, k_pad, c.num_warps, row_bytes)
                and _fits_shared(c.kwargs["BLOCK_B"], block_n, row_bytes, c.num_stages)
                ] or configs[:1]

    return configs, prune


def _fits_shared(block_b: int, block_n: int, row_bytes: int, stages: int) -> bool:
    """The query block and ``stages`` bank tiles fit one CTA's shared memory on sm_90."""
    return (block_b + stages * block_n) * row_bytes + 2048 <= 227 * 1024


def _fits_registers(block_b: int, block_n: int, k_pad: int, num_warps: int,
                    row_bytes: int) -> bool:
    """Configs whose loops compile for sm_90 without local memory (tests/sm90.py checks
    every kept config at K = 1 and 64, in both plans).

    Per thread: two fp32 score tiles (the one selected from, the one in flight), a quarter
    of each of its rows' int64 lists, a 64-bit address per 16 bytes of the bank tile it
    copies, and about ten scalars per query row it holds. Measured at D = 256: up to 200
    such registers compile without spills in the loop, and a 64-slot list wants 8 warps.
    """
    threads = 32 * num_warps
    tile = 2 * block_b * block_n // threads
    top = 2 * block_b * k_pad // threads
    addresses = 2 * block_n * row_bytes // (16 * threads)
    rows = 4 * block_b // threads
    return (tile + top + addresses + 10 * rows <= _REGISTER_BUDGET
            and (k_pad < 64 or num_warps == 8))


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
def _knn_topk_tile_update(top, scores, base, lo, hi, exclude_row_ptr, E, stride_ee, row_ok,
                          sub_ptrs, slots,
                          MASK_COLS: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
                          E_PAD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                          SUB: tl.constexpr, DIRECT: tl.constexpr):
    """Offer one tile (bank rows base + [0, BLOCK_N), a group) to each row's list ``top``.

    ``top`` holds each row's K best group keys so far (and HIGHEST padding). A tile costs
    one compare-and-replace of the row's minimum key: no loop whose trip count depends on
    the data. When the group enters, its BLOCK_N / SUB subgroup maxima are stored at the
    slot it takes (``sub_ptrs`` + slot * S), for the merge. ``DIRECT`` (a split of at most
    K_PAD tiles): every group enters, at the slot of its tile's place in the split, so
    nothing is compared. ``MASK_COLS`` (the split's last tile) drops the columns outside
    [lo, hi); excluded rows drop to -inf before the maxima.
    """
    S: tl.constexpr = BLOCK_N // SUB
    H: tl.constexpr = BLOCK_N // 4 // SUB  # subgroups per lane (see _knn_topk_tile_rows)
    cols = base + _knn_topk_tile_rows(BLOCK_N)
    if MASK_COLS:
        scores = tl.where(((cols >= lo) & (cols < hi))[None, :], scores, float("-inf"))
    if HAS_EXCLUDE:
        for e in tl.static_range(E_PAD):
            excluded = tl.load(exclude_row_ptr + e * stride_ee, mask=row_ok & (e < E), other=-1)
            scores = tl.where(cols[None, :] == excluded[:, None], float("-inf"), scores)
    # maxnum: a NaN never wins a max; an all-NaN group packs as -inf.
    # Column 8c + 2l + r holds the bank row l * BLOCK_N / 4 + 2c + r; with c = h * SUB / 2
    # + c', subgroup l * H + h is the max over (c', r): inside one thread, no shuffle.
    # Kept 3-D for the store too: a (BLOCK_B, S) view would be re-laid out (shuffles) first.
    sub_max = tl.reshape(scores, (BLOCK_B, H, SUB // 2, 4, 2))
    sub_max = tl.max(tl.max(sub_max, axis=4), axis=2)  # (BLOCK_B, H, 4)
    sub_max = tl.permute(sub_max, (0, 2, 1))  # (BLOCK_B, 4, H): subgroup l * H + h
    first = tl.zeros((BLOCK_B,), dtype=tl.int32) + base  # a group is named by its first row
    key = _knn_pack(tl.max(tl.max(sub_max, axis=2), axis=1), first)
    # The list is (BLOCK_B, K_PAD // 4, 4): see _knn_topk_spread_list. Every key in it
    # names its slot in the low bits of its column (first row + slot, < BLOCK_N apart from
    # any other group's), so the row's minimum says where it sits: no search for the slot.
    if DIRECT:
        enter = row_ok
        slot = tl.zeros((BLOCK_B,), dtype=tl.int32) + (base - lo) // BLOCK_N
    else:
        worst = tl.min(tl.min(top, axis=2), axis=1)
        enter = (key > worst) & row_ok
        # The column's low bits: the key is 2**32 h - col - 1, so they are ~key's.
        slot = (~worst & (BLOCK_N - 1)).to(tl.int32)
    named = key - slot  # the column grows by the slot, below the next group's first row
    top = tl.where((slots == slot[:, None, None]) & enter[:, None, None], named[:, None, None],
                   top)
    j = tl.arange(0, 4)[None, :, None] * H + tl.arange(0, H)[None, None, :]
    tl.store(sub_ptrs[:, None, None] + slot[:, None, None] * S + j, sub_max,
             mask=enter[:, None, None])
    # Always 0.0 (a named key is below HIGHEST), but no compiler can tell: the next dot wait
    # takes it, so the selection is not scheduled after the wait (_knn_topk_wait_dots).
    done = tl.where(enter & (named == _HIGHEST), 1.0, 0.0)
    return top, done


@triton.jit
def _knn_topk_tile_rows(BLOCK_N: tl.constexpr):
    """The bank row (from the tile's first) whose score lands in each column of a tile.

    An MMA accumulator gives lane l of each quad the columns 8c + 2l + r of its rows (c the
    8-column core, r in {0, 1}). Loading bank row l * BLOCK_N / 4 + 2c + r into column 8c +
    2l + r hands each lane BLOCK_N / 4 consecutive bank rows, so a subgroup's maximum
    needs no shuffle between lanes. Only speed depends on this; any bijection is exact.
    """
    j = tl.arange(0, BLOCK_N)
    return (j % 8) // 2 * (BLOCK_N // 4) + j // 8 * 2 + j % 2


@triton.jit
def _knn_topk_spread_list(BLOCK_B: tl.constexpr, K_PAD: tl.constexpr):
    """A (BLOCK_B, K_PAD // 4, 4) zero tensor whose layout spreads each row's K_PAD list
    slots over the four threads that share that row of an MMA accumulator.

    Without it each of the four threads keeps the row's whole list (four times the
    integer work per tile). The layout comes from the accumulator of a zero dot, reduced
    so that the last axis is the accumulator's column bits held by those threads' lanes
    (wgmma: column 2*l + r within each 8-column core, l the lane in the quad).
    """
    R: tl.constexpr = K_PAD // 4
    acc = tl.dot(tl.zeros((BLOCK_B, 16), dtype=tl.float16), tl.zeros((16, 8 * R), dtype=tl.float16))
    acc = tl.max(tl.reshape(acc, (BLOCK_B, R, 4, 2)), axis=3)
    return acc


@triton.jit
def _knn_topk_wait_dots(scores, done, DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``scores`` (the tile dot issued a trip ago), once every dot in flight has finished.

    Triton keeps a loop's dot in flight across the trip (wgmma ``isAsync``, no wait after
    it) only when its result is yielded and read in the next trip after a wait for all
    dots. A tiny dot of zeros, read at once, is that wait. Adding its zero row maximum
    (exact: x + 0.0 == x for every x but -0.0, which the key packing maps to +0.0
    anyway) moves the scores out of the dot's registers before the next dot writes them,
    so ptxas sees no read of an accumulator in flight and does not serialize the dots.
    The tiny dot accumulates onto ``done`` (zeros that the selection computes last), so
    ptxas cannot hoist the wait above the selection it is meant to overlap.
    """
    BLOCK_B: tl.constexpr = scores.shape[0]
    zero_a = tl.zeros((BLOCK_B, 16), dtype=DTYPE)
    zero_b = tl.zeros((16, 16), dtype=DTYPE)
    acc = tl.zeros((BLOCK_B, 16), dtype=tl.float32) + done[:, None]
    fence = tl.max(tl.dot(zero_a, zero_b, acc, input_precision=INPUT_PRECISION), axis=1)
    return scores + fence[:, None]


@triton.jit
def _knn_topk_tile_scores(q, q_base, tile_ptr, tile_offs, d, row_ok, tile_ok,
                          stride_qd, stride_bd, D: tl.constexpr, CAST_FP32: tl.constexpr,
                          INPUT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          MASK_ROWS: tl.constexpr):
    """The (BLOCK_B, BLOCK_N) fp32 score tile of one bank tile; ``tile_ok`` masks its rows
    when ``MASK_ROWS`` (the partial last tile), so no load leaves the bank."""
    if BLOCK_D >= D:
        if MASK_ROWS:
            b = tl.load(tile_ptr + tile_offs, mask=tile_ok[:, None] & (d < D)[None, :],
                        other=0.0)
        elif BLOCK_D > D:
            b = tl.load(tile_ptr + tile_offs, mask=(d < D)[None, :], other=0.0)
        else:
            b = tl.load(tile_ptr + tile_offs)
        if CAST_FP32:
            b = b.to(tl.float32)
        scores = tl.dot(q, tl.trans(b), input_precision=INPUT_PRECISION)
    else:
        scores = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for d0 in tl.static_range(0, D, BLOCK_D):
            d_ok = (d0 + d < D)[None, :]
            qc = tl.load(q_base + (d0 + d)[None, :] * stride_qd,
                         mask=row_ok[:, None] & d_ok, other=0.0)
            if MASK_ROWS:
                b = tl.load(tile_ptr + d0 * stride_bd + tile_offs, mask=tile_ok[:, None] & d_ok,
                            other=0.0)
            else:
                b = tl.load(tile_ptr + d0 * stride_bd + tile_offs, mask=d_ok, other=0.0)
            if CAST_FP32:
                qc = qc.to(tl.float32)
                b = b.to(tl.float32)
            scores = tl.dot(qc, tl.trans(b), scores, input_precision=INPUT_PRECISION)
    return scores


@triton.jit
def _knn_topk_split_kernel(
    q_ptr, bank_ptr, exclude_ptr, cand_ptr, sub_ptr,
    B, N, D: tl.constexpr, E, rows_per_split,
    stride_qb, stride_qd, stride_bn, stride_bd, stride_eb, stride_ee,
    stride_cb, stride_cs, stride_sb, stride_ss,
    K: tl.constexpr, K_PAD: tl.constexpr, HAS_EXCLUDE: tl.constexpr, E_PAD: tl.constexpr,
    CAST_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SUB: tl.constexpr,
    DIRECT: tl.constexpr,
):
    tl.static_assert(K_PAD >= K and K_PAD >= 8 and K_PAD <= BLOCK_N)
    tl.static_assert(BLOCK_N >= 16 and BLOCK_B >= 16 and BLOCK_D >= 16)
    tl.static_assert(BLOCK_N % (4 * SUB) == 0)  # whole subgroups per lane
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    n = _knn_topk_tile_rows(BLOCK_N)  # the tile's bank rows, in its columns' order
    q_base = q_ptr + rows64[:, None] * stride_qb
    exclude_row_ptr = exclude_ptr + rows64 * stride_eb
    sub_ptrs = sub_ptr + rows64 * stride_sb + pid_s * stride_ss
    # Loop-invariant int32 offsets of a bank tile: each tile adds one scalar base.
    tile_offs = n[:, None] * stride_bn + d[None, :] * stride_bd

    # Phase 1: the query block, loaded once when D fits in one block.
    q = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    if BLOCK_D >= D:
        q = tl.load(q_base + d[None, :] * stride_qd, mask=row_ok[:, None] & (d < D)[None, :],
                    other=0.0)
        if CAST_FP32:
            q = q.to(tl.float32)
    # Empty slots: the keys of -inf at columns 2**31 + slot (distinct, below every key).
    # Padding slots >= K hold HIGHEST so they are never a row's minimum; a DIRECT list
    # uses all K_PAD slots (one per tile).
    LIST: tl.constexpr = K_PAD if DIRECT else K
    spread = _knn_topk_spread_list(BLOCK_B, K_PAD)
    slots = tl.arange(0, K_PAD // 4)[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    empty = ((_NEG_INF_KEY32 + 1) << 32) - (_EMPTY_COL + 1) - slots.to(tl.int64)
    top = tl.where((slots < LIST) & (spread == 0.0), empty, _HIGHEST)

    # Phase 2: the split's full tiles, unmasked (splits start on a BLOCK_N boundary).
    start = pid_s * rows_per_split
    stop = tl.minimum(start + rows_per_split, N)
    full_stop = start + tl.maximum(stop - start, 0) // BLOCK_N * BLOCK_N
    start64 = start.to(tl.int64)  # tile offsets can pass 2**31 elements
    # Two tiles in flight: a trip selects from tile t - 2 (``ready``) while the dot of
    # tile t - 1 (``scores``) runs, then waits for that dot and issues tile t's. See
    # _knn_topk_wait_dots for how the dot stays in flight across the selection.
    ready = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    scores = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for base in range(start, full_stop, BLOCK_N):
        tile_ptr = bank_ptr + (start64 + (base - start)) * stride_bn
        top, done = _knn_topk_tile_update(top, ready, base - 2 * BLOCK_N, start, stop,
                                          exclude_row_ptr, E, stride_ee,
                                          row_ok & (base >= start + 2 * BLOCK_N), sub_ptrs, slots,
                                          False, HAS_EXCLUDE, E_PAD, BLOCK_B, BLOCK_N, SUB, DIRECT)
        ready = _knn_topk_wait_dots(scores, done, q.dtype, INPUT_PRECISION)
        scores = _knn_topk_tile_scores(q, q_base, tile_ptr, tile_offs, d, row_ok, n < BLOCK_N,
                                       stride_qd, stride_bd, D, CAST_FP32, INPUT_PRECISION,
                                       BLOCK_B, BLOCK_N, BLOCK_D, False)
    if full_stop >= start + 2 * BLOCK_N:
        top, _ = _knn_topk_tile_update(top, ready, full_stop - 2 * BLOCK_N, start, stop,
                                       exclude_row_ptr, E, stride_ee, row_ok, sub_ptrs, slots,
                                       False, HAS_EXCLUDE, E_PAD, BLOCK_B, BLOCK_N, SUB, DIRECT)
    if full_stop > start:
        top, _ = _knn_topk_tile_update(top, scores, full_stop - BLOCK_N, start, stop,
                                       exclude_row_ptr, E, stride_ee, row_ok, sub_ptrs, slots,
                                       False, HAS_EXCLUDE, E_PAD, BLOCK_B, BLOCK_N, SUB, DIRECT)

    # Phase 3: the partial last tile (the bank's end), rows and columns masked.
    if full_stop < stop:
        tile_ptr = bank_ptr + (start64 + (full_stop - start)) * stride_bn
        tile_ok = full_stop + n < stop
        scores = _knn_topk_tile_scores(q, q_base, tile_ptr, tile_offs, d, row_ok, tile_ok,
                                       stride_qd, stride_bd, D, CAST_FP32, INPUT_PRECISION,
                                       BLOCK_B, BLOCK_N, BLOCK_D, True)
        top, _ = _knn_topk_tile_update(top, scores, full_stop, start, stop,
                                       exclude_row_ptr, E, stride_ee, row_ok, sub_ptrs, slots,
                                       True, HAS_EXCLUDE, E_PAD, BLOCK_B, BLOCK_N, SUB, DIRECT)

    # Phase 4: this split's K group keys per row, sorted (the merge walks the splits' lists
    # from their heads). Each names its group's first row plus its list slot, which
    # locates its subgroup maxima.
    named = tl.where(slots < LIST, top, _LOWEST)
    out = cand_ptr + rows64 * stride_cb + pid_s * stride_cs
    for t in range(0, K):
        win = tl.max(tl.max(named, axis=2), axis=1)
        named = tl.where(named == win[:, None, None], _LOWEST, named)
        tl.store(out + t, win, mask=row_ok)


@triton.jit
def _knn_topk_select(keys, K: tl.constexpr, K_PAD: tl.constexpr):
    """The K largest of each row's unique int64 ``keys``, descending, as a (BLOCK_B, K_PAD)
    tensor (LOWEST past K). Keys are unique per row, so ``==`` removes exactly one."""
    slots = tl.arange(0, K_PAD)
    best = tl.full((keys.shape[0], K_PAD), _LOWEST, dtype=tl.int64)
    for t in range(0, K):
        win = tl.max(keys, axis=1)
        keys = tl.where(keys == win[:, None], _LOWEST, keys)
        best = tl.where(slots[None, :] == t, win[:, None], best)
    return best


@triton.jit
def _knn_topk_select_ranked(keys, K: tl.constexpr, K_PAD: tl.constexpr):
    """:func:`_knn_topk_select` without rounds: the same (BLOCK_B, K_PAD) result.

    A key's rank is the number of keys above it (keys are unique, so ranks are distinct
    below the LOWEST padding, which ties at the count of real keys and fills the slots
    past it, as the rounds do); slot t takes the key of rank t. n^2 compares for n keys,
    but no chain of K dependent cross-warp reductions: the latency-bound merge of a small
    batch prefers it."""
    # Both reductions run over axis 1, the slower one: mostly inside each thread.
    above = tl.sum((keys[:, :, None] > keys[:, None, :]).to(tl.int32), axis=1)
    slots = tl.arange(0, K_PAD)
    hit = (above[:, :, None] == slots[None, None, :]) & (slots < K)[None, None, :]
    return tl.max(tl.where(hit, keys[:, :, None], _LOWEST), axis=1)


@triton.jit
def _knn_topk_merge_kernel(
    cand_ptr, sub_ptr, q_ptr, bank_ptr, online_ptr, exclude_ptr,
    idx_ptr, val_ptr, pos_ptr,
    B, N, D, E, num_splits, rows_per_split, list_slots, inv_attention_temperature,
    threshold_value,
    stride_cb, stride_cs, stride_sb, stride_qb, stride_qd, stride_bn, stride_bd,
    stride_ob, stride_od,
    stride_eb, stride_ee, stride_ib, stride_vb, stride_pb,
    K: tl.constexpr, K_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, S: tl.constexpr,
    SUB: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
    WITH_POSITIVENESS: tl.constexpr, THRESHOLD: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DW: tl.constexpr,
    GATHER_STAGES: tl.constexpr, RANKED: tl.constexpr,
):
    # Each phase selects first and then gathers what it selected in one batch, so a query
    # row waits for three gathers, not for 3K dependent ones.
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    sp = tl.arange(0, SPLITS_PAD)
    slots = tl.arange(0, K_PAD)
    j = tl.arange(0, S)
    r_offs = tl.arange(0, SUB)
    d_offs = tl.arange(0, BLOCK_D)
    dw_offs = tl.arange(0, BLOCK_DW)
    live_slot = row_ok[:, None] & (slots[None, :] < K)
    # Phase 1: the K best groups, walking the splits' sorted lists from their heads (one
    # load per round, of the winning split's next key); their S subgroup maxima become
    # subgroup keys (a group and a subgroup are named by their first row, so key order is
    # row order).
    split_ok = row_ok[:, None] & (sp[None, :] < num_splits)
    list_ptr = cand_ptr + rows64[:, None] * stride_cb + sp[None, :] * stride_cs
    # Each split's key after its head is loaded a round ahead, so a round waits for the
    # load of the round before it, not for its own.
    walked = tl.zeros((BLOCK_B, SPLITS_PAD), dtype=tl.int32)
    heads = tl.load(list_ptr, mask=split_ok, other=_LOWEST)
    following = tl.load(list_ptr + 1, mask=split_ok & (walked + 1 < K), other=_LOWEST)
    groups = tl.full((BLOCK_B, K_PAD), _LOWEST, dtype=tl.int64)
    for t in range(0, K):
        win = tl.max(heads, axis=1)
        is_win = heads == win[:, None]  # keys are unique: one split per row
        walked += is_win.to(tl.int32)
        heads = tl.where(is_win, following, heads)
        following = tl.load(list_ptr + walked + 1, mask=is_win & split_ok & (walked + 1 < K),
                            other=tl.where(is_win, _LOWEST, following))
        groups = tl.where(slots[None, :] == t, win[:, None], groups)
    named = _knn_unpack_col(groups)
    live = live_slot & (named < _EMPTY_COL)  # an empty slot names no group
    # The split names a group by its first row plus the list slot it ended in (< BLOCK_N):
    # key order is row order, and the slot and split locate its subgroup maxima.
    slot = named % (S * SUB)
    first = named - slot
    at = (first // rows_per_split) * list_slots + slot
    sub_max = tl.load(sub_ptr + rows64[:, None, None] * stride_sb + at[:, :, None] * S
                      + j[None, None, :], mask=live[:, :, None], other=float("-inf"))
    sub_keys = tl.where(live[:, :, None],
                        _knn_pack(sub_max, first[:, :, None] + j[None, None, :] * SUB), _LOWEST)

    # Phase 2: the K best subgroups, refined: exact fp32 scores of their K*SUB rows.
    if RANKED:
        subgroups = _knn_topk_select_ranked(tl.reshape(sub_keys, (BLOCK_B, K_PAD * S)), K,
                                            K_PAD)
    else:
        subgroups = _knn_topk_select(tl.reshape(sub_keys, (BLOCK_B, K_PAD * S)), K, K_PAD)
    first = _knn_unpack_col(subgroups)
    live = live_slot & (first < _EMPTY_COL)
    row = tl.where(live, first, 0)[:, :, None] + r_offs[None, None, :]  # (BLOCK_B, K_PAD, SUB)
    row_live = live[:, :, None] & (row < N)
    row_ptr = bank_ptr + row.to(tl.int64)[:, :, :, None] * stride_bn
    q_row_ptr = q_ptr + rows64[:, None, None, None] * stride_qb
    # Products accumulate element-wise and are summed once after the loop: a sum per
    # trip would cost a cross-lane reduction per trip.
    products = tl.zeros((BLOCK_B, K_PAD, SUB, BLOCK_D), dtype=tl.float32)
    for d0 in tl.range(0, D, BLOCK_D, num_stages=GATHER_STAGES):
        d = (d0 + d_offs)[None, None, None, :]
        r = tl.load(row_ptr + d * stride_bd, mask=row_live[:, :, :, None] & (d < D),
                    other=0.0).to(tl.float32)
        qd = tl.load(q_row_ptr + d * stride_qd, mask=row_ok[:, None, None, None] & (d < D),
                     other=0.0).to(tl.float32)
        products += qd * r
    score = tl.sum(products, axis=3)
    if HAS_EXCLUDE:
        for e in range(0, E):
            excluded = tl.load(exclude_ptr + rows64 * stride_eb + e * stride_ee, mask=row_ok,
                               other=-1)
            score = tl.where(row == excluded[:, None, None], float("-inf"), score)
    elements = tl.where(row_live, _knn_pack(score, row), _LOWEST)

    # Phase 3: the K winners. NaN scores, excluded rows and -inf rank below every eligible
    # row, so the eligible winners fill the first slots.
    if RANKED:
        winners = _knn_topk_select_ranked(tl.reshape(elements, (BLOCK_B, K_PAD * SUB)), K,
                                          K_PAD)
    else:
        winners = _knn_topk_select(tl.reshape(elements, (BLOCK_B, K_PAD * SUB)), K, K_PAD)
    col = _knn_unpack_col(winners)
    eligible = live_slot & ((winners >> 32) != _NEG_INF_KEY32) & (winners != _LOWEST)
    # Fewer than K eligible rows: as the reference's stable sort does, the empty slots take
    # the smallest rows that are not eligible winners (every eligible row is one by then).
    if tl.max(tl.max((live_slot & ~eligible).to(tl.int32), axis=1), axis=0) > 0:
        taken_cols = tl.where(eligible, col, -1)
        filled = tl.full((BLOCK_B,), -1, dtype=tl.int64)
        for t in range(0, K):
            empty_t = tl.max(((slots[None, :] == t) & live_slot & ~eligible).to(tl.int32),
                             axis=1) > 0
            fill = filled + 1
            taken = tl.max((taken_cols == fill[:, None]).to(tl.int32), axis=1) > 0
            while tl.max((taken & empty_t).to(tl.int32), axis=0) > 0:
                fill = tl.where(taken & empty_t, fill + 1, fill)
                taken = tl.max((taken_cols == fill[:, None]).to(tl.int32), axis=1) > 0
            filled = tl.where(empty_t, fill, filled)
            col = tl.where((slots[None, :] == t) & empty_t[:, None], fill[:, None], col)
    col = tl.minimum(tl.maximum(col, 0), N - 1)  # guards the gather, never changes a winner
    tl.store(idx_ptr + rows64[:, None] * stride_ib + slots[None, :], col, mask=live_slot)

    # Phase 4: the K winning rows in one gather: their values, and their attention.
    win_ptr = bank_ptr + col[:, :, None] * stride_bn
    value = tl.zeros((BLOCK_B, K_PAD, BLOCK_DW), dtype=tl.float32)
    on_dot = tl.zeros((BLOCK_B, K_PAD, BLOCK_DW), dtype=tl.float32)
    sq_norm = tl.zeros((BLOCK_B, K_PAD, BLOCK_DW), dtype=tl.float32)
    for d0 in tl.range(0, D, BLOCK_DW, num_stages=GATHER_STAGES):
        d = (d0 + dw_offs)[None, None, :]
        r = tl.load(win_ptr + d * stride_bd, mask=live_slot[:, :, None] & (d < D),
                    other=0.0).to(tl.float32)
        qd = tl.load(q_ptr + rows64[:, None, None] * stride_qb + d * stride_qd,
                     mask=row_ok[:, None, None] & (d < D), other=0.0).to(tl.float32)
        value += qd * r
        if WITH_POSITIVENESS:
            o = tl.load(online_ptr + rows64[:, None, None] * stride_ob + d * stride_od,
                        mask=row_ok[:, None, None] & (d < D), other=0.0).to(tl.float32)
            on_dot += o * r
            sq_norm += r * r
    value = tl.sum(value, axis=2)
    on_dot = tl.sum(on_dot, axis=2)
    sq_norm = tl.sum(sq_norm, axis=2)
    # NaN scores and excluded rows rank as -inf; report them as -inf.
    value = tl.where(eligible, value, float("-inf"))
    tl.store(val_ptr + rows64[:, None] * stride_vb + slots[None, :], value, mask=live_slot)

    # Phase 5: positiveness = softmax over the K neighbours (+ threshold, not renormalised).
    if WITH_POSITIVENESS:
        # F.normalize semantics: divide by max(|row|, eps).
        attention = on_dot / tl.maximum(tl.sqrt(sq_norm), _EPS) * inv_attention_temperature
        attention = tl.where(slots[None, :] < K, attention, float("-inf"))
        shifted = attention - tl.max(attention, axis=1)[:, None]
        p = tl.where(slots[None, :] < K, tl.exp(shifted), 0.0)
        p = p / tl.sum(p, axis=1)[:, None]
        if THRESHOLD:
            p = tl.where(p > threshold_value, p, 0.0)
        tl.store(pos_ptr + rows64[:, None] * stride_pb + slots[None, :], p, mask=live_slot)


_split_tuned = None


def _tuned_split_kernel():
    """The autotuned split kernel, built on first use (nothing at import time)."""
    global _split_tuned
    if _split_tuned is None:
        configs, prune = split_configs()
        _split_tuned = triton.autotune(
            # INPUT_PRECISION too: an "ieee" fp32 dot has other winning tiles than "tf32".
            configs, key=["B", "N", "D", "K_PAD", "BLOCK_N", "SUB", "DIRECT",
                          "INPUT_PRECISION"],
            prune_configs_by={"early_config_prune": prune} if prune else None,
        )(_knn_topk_split_kernel)
    return _split_tuned


def num_splits_for(num_queries: int, num_rows: int, k: int) -> int:
    """Bank splits: enough programs to fill a GPU, few enough candidates to merge.

    About two programs per SM: more make each program's run of tiles shorter but the
    merge's lists longer, fewer leave SMs idle (``bench/model_knn.py``: 256 programs model
    no slower than 128 or 384 at any of the six shapes, and faster than 512 at B <= 1024).
    """
    k_pad = triton.next_power_of_2(k)
    query_blocks = triton.cdiv(num_queries, 64)
    splits = triton.cdiv(_SPLIT_PROGRAMS, query_blocks)
    splits = min(splits, triton.cdiv(num_rows, _SPLIT_ALIGN), _MAX_CANDIDATES // k_pad)
    return max(1, splits)


class SearchPlan(NamedTuple):
    """Group and subgroup rows of a search: the split's BLOCK_N and SUB."""

    group_rows: int
    sub_rows: int


def search_plan(num_queries: int, num_rows: int, dim: int, k: int) -> SearchPlan:
    """The group (one tile, BLOCK_N rows) and subgroup sizes for a search.

    Larger groups cost the split less per score (one compare-and-replace per tile);
    smaller subgroups cost the merge less (it refines K * SUB rows per query row; with
    8-row subgroups instead of 16 the merge models 180 against 266 us at B = 4096 and 42
    against 63 us at B = 1024, where it weighs more). Small batches (at most _SMALL_BATCH
    rows) are latency-bound: shorter tiles let two split programs share an SM. Modelled in
    bench/RESULTS.md (``bench/model_knn.py``).
    """
    if interpreted():
        return SearchPlan(64, 16)
    if num_queries <= _SMALL_BATCH:
        return SearchPlan(64, 8)
    return SearchPlan(128, 8)


def _rows_per_split(num_rows: int, splits: int, group_rows: int) -> int:
    """A multiple of the group rows (and of _SPLIT_ALIGN): every split starts a group."""
    align = max(group_rows, _SPLIT_ALIGN)
    return triton.cdiv(triton.cdiv(num_rows, splits), align) * align


class SplitLayout(NamedTuple):
    """How the split kernel cuts the bank, and the list each query row keeps per split."""

    splits: int
    rows_per_split: int
    list_pad: int  # K_PAD: the list's slots in registers
    direct: bool  # a split of at most list_pad groups keeps every group, uncompared
    stored_slots: int  # subgroup-maxima slots per split in memory: list_pad if direct, else K


def split_layout(num_queries: int, num_rows: int, k: int, group_rows: int,
                 num_splits: int | None = None) -> SplitLayout:
    """The splits of a search (``num_splits_for`` unless given) and each split's list.

    A split holding no more groups than the list has slots needs no selection at all: its
    groups take the slots in order (most small-batch searches, whose many short splits
    fill the GPU). The merge reads the same K sorted keys per split either way."""
    list_pad = max(8, triton.next_power_of_2(k))
    splits = num_splits or num_splits_for(num_queries, num_rows, k)
    rows = _rows_per_split(num_rows, splits, group_rows)
    direct = triton.cdiv(min(rows, num_rows), group_rows) <= list_pad
    return SplitLayout(splits, rows, list_pad, direct, list_pad if direct else k)


def knn_topk_split(
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    *,
    group_rows: int,
    sub_rows: int,
    exclude: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_b: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per split, the K best groups of ``group_rows`` rows and their subgroup maxima.

    Returns ``(keys, sub_maxima)``: ``(B, SPLITS, K)`` int64 group keys, sorted descending,
    and ``(B, SPLITS, SLOTS, group_rows // sub_rows)`` fp32 maxima of each kept group's
    subgroups, SLOTS = ``split_layout(...).stored_slots`` (slots that no group entered are
    left unwritten; their keys say so). ``num_splits``,
    ``block_b``, ``block_d`` and ``num_warps`` override the heuristic and the autotuned
    config (tests use them to cover split counts, tile edges and every config).
    """
    num_queries, dim = query.shape
    num_rows = bank.shape[0]
    layout = split_layout(num_queries, num_rows, k, group_rows, num_splits)
    splits = layout.splits
    keys = torch.empty((num_queries, splits, k), dtype=torch.int64, device=query.device)
    sub_maxima = torch.empty((num_queries, splits, layout.stored_slots, group_rows // sub_rows),
                             dtype=torch.float32, device=query.device)
    has_exclude = exclude is not None
    ex = exclude if has_exclude else keys  # never read when HAS_EXCLUDE is False
    num_excluded = ex.shape[1] if has_exclude else 0
    cast = interpreted() or query.dtype != bank.dtype or query.dtype == torch.float64
    args = dict(
        q_ptr=query, bank_ptr=bank, exclude_ptr=ex, cand_ptr=keys, sub_ptr=sub_maxima,
        B=num_queries, N=num_rows, D=dim, E=num_excluded, rows_per_split=layout.rows_per_split,
        stride_qb=query.stride(0), stride_qd=query.stride(1),
        stride_bn=bank.stride(0), stride_bd=bank.stride(1),
        stride_eb=ex.stride(0), stride_ee=ex.stride(1),
        stride_cb=keys.stride(0), stride_cs=keys.stride(1),
        stride_sb=sub_maxima.stride(0), stride_ss=sub_maxima.stride(1),
        K=k, K_PAD=layout.list_pad, HAS_EXCLUDE=has_exclude,
        E_PAD=triton.next_power_of_2(max(1, num_excluded)), CAST_FP32=cast,
        INPUT_PRECISION=input_precision(query.dtype if not cast else torch.float32),
        BLOCK_N=group_rows, SUB=sub_rows, DIRECT=layout.direct,
        BLOCK_D=block_d or one_pass_block_d(dim, 4 if cast else bank.element_size()),
    )
    if interpreted() or any(o is not None for o in (block_b, num_warps)):
        default = split_configs()[0][0].kwargs if interpreted() else {"BLOCK_B": 64}
        meta = {"BLOCK_B": block_b or default["BLOCK_B"]}
        if num_warps is not None:
            meta["num_warps"] = num_warps
        grid = (triton.cdiv(num_queries, meta["BLOCK_B"]), splits)
        _knn_topk_split_kernel[grid](**args, **meta)
    else:
        def grid(meta):
            return (triton.cdiv(num_queries, meta["BLOCK_B"]), splits)

        _tuned_split_kernel()[grid](**args)
    return keys, sub_maxima


class MergeBlocks(NamedTuple):
    """Launch shape of the merge: query rows and warps per program, gather widths."""

    block_b: int
    block_d: int
    block_dw: int
    num_warps: int
    ranked: bool


def merge_blocks(num_queries: int, k: int, subgroups: int, sub_rows: int,
                 dim: int) -> MergeBlocks:
    """One query row per program. A large batch takes single-warp programs: every
    reduction stays inside a warp (no barriers) and many programs share an SM to hide each
    other's latency. A small batch (at most _SMALL_BATCH rows, one or two per SM) takes four
    warps a row, for four times the gather bandwidth. The refine gathers the K * SUB rows
    BLOCK_D columns at a time, the winners' gather K rows BLOCK_DW columns at a time: 2048
    and 1024 elements per warp and gather, so that the element-wise accumulators fit in
    registers (64 and 3 x 32 a thread).

    ``ranked``: in four-warp programs, the two selections over K * S subgroups and K * SUB
    rows rank all their candidates at once (n^2 int64 compares, no dependent round) while
    n is at most _RANKED_KEYS; past that (K > 32, or K > 16 with 16-row subgroups) the n^2
    work costs more than K rounds of max (``bench/model_knn.py``: 62 against 66 us at (128,
    128000, 256, 64), 31 against 22 us at K = 30). A one-warp program would hold 2,048
    compares a thread and spill registers (40 local stores on sm_90), so it keeps the
    rounds."""
    num_warps = 4 if num_queries <= _SMALL_BATCH else 1
    k_pad = triton.next_power_of_2(k)
    width = triton.next_power_of_2(dim)
    block_d = min(width, max(8, 2048 * num_warps // (k_pad * sub_rows)))
    block_dw = min(width, max(8, 1024 * num_warps // k_pad))
    ranked = num_warps == 4 and k_pad * max(subgroups, sub_rows) <= _RANKED_KEYS
    return MergeBlocks(1, block_d, block_dw, num_warps, ranked)


def knn_topk_merge(
    keys: torch.Tensor,
    sub_maxima: torch.Tensor,
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    *,
    sub_rows: int,
    values_dtype: torch.dtype,
    exclude: torch.Tensor | None = None,
    online: torch.Tensor | None = None,
    attention_temperature: float = 1.0,
    threshold: float | None = None,
    positiveness_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sorted winners of the split's groups: ``(indices, values, positiveness)``.

    ``online`` (unit-norm rows, ``(B, D)``) turns on the positiveness output; otherwise the
    third result is None. ``threshold``, when given, zeroes the weights not above it (the
    caller owns its value). ``exclude`` and ``sub_rows`` must be the split's.
    """
    num_queries, dim = query.shape
    num_rows = bank.shape[0]
    k_pad = triton.next_power_of_2(k)
    num_splits = keys.shape[1]
    subgroups = sub_maxima.shape[3]
    blocks = merge_blocks(num_queries, k, subgroups, sub_rows, dim)
    indices = torch.empty((num_queries, k), dtype=torch.int64, device=query.device)
    values = torch.empty((num_queries, k), dtype=values_dtype, device=query.device)
    with_pos = online is not None
    positiveness = (
        torch.empty((num_queries, k), dtype=positiveness_dtype, device=query.device)
        if with_pos else None
    )
    on = online if with_pos else query
    pos = positiveness if with_pos else values
    has_exclude = exclude is not None
    ex = exclude if has_exclude else indices  # never read when HAS_EXCLUDE is False
    num_excluded = ex.shape[1] if has_exclude else 0
    grid = (triton.cdiv(num_queries, blocks.block_b),)
    _knn_topk_merge_kernel[grid](
        cand_ptr=keys, sub_ptr=sub_maxima, q_ptr=query, bank_ptr=bank, online_ptr=on,
        exclude_ptr=ex, idx_ptr=indices, val_ptr=values, pos_ptr=pos,
        B=num_queries, N=num_rows, D=dim, E=num_excluded, num_splits=num_splits,
        rows_per_split=_rows_per_split(num_rows, num_splits, subgroups * sub_rows),
        list_slots=sub_maxima.shape[2],
        inv_attention_temperature=1.0 / attention_temperature,
        threshold_value=0.0 if threshold is None else float(threshold),
        stride_cb=keys.stride(0), stride_cs=keys.stride(1), stride_sb=sub_maxima.stride(0),
        stride_qb=query.stride(0), stride_qd=query.stride(1),
        stride_bn=bank.stride(0), stride_bd=bank.stride(1),
        stride_ob=on.stride(0), stride_od=on.stride(1),
        stride_eb=ex.stride(0), stride_ee=ex.stride(1),
        stride_ib=indices.stride(0), stride_vb=values.stride(0), stride_pb=pos.stride(0),
        K=k, K_PAD=k_pad, SPLITS_PAD=triton.next_power_of_2(num_splits), S=subgroups,
        SUB=sub_rows, HAS_EXCLUDE=has_exclude, WITH_POSITIVENESS=with_pos,
        THRESHOLD=threshold is not None,
        BLOCK_B=blocks.block_b, BLOCK_D=blocks.block_d, BLOCK_DW=blocks.block_dw,
        GATHER_STAGES=1 if interpreted() else 3, RANKED=blocks.ranked,
        num_warps=blocks.num_warps,
    )
    return indices, values, positiveness


def knn_topk_search(
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    *,
    values_dtype: torch.dtype,
    exclude: torch.Tensor | None = None,
    online: torch.Tensor | None = None,
    attention_temperature: float = 1.0,
    threshold: float | None = None,
    positiveness_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Split then merge: ``(indices, values, positiveness)`` as :func:`knn_topk_merge`.

    A 16-bit bank is searched with the query rounded to the bank's dtype, so the tile dot
    runs on the 16-bit tensor cores; the merge refines and reports in fp32 from the query
    as given. The storage dtype of the bank is the search precision.
    """
    num_queries, dim = query.shape
    plan = search_plan(num_queries, bank.shape[0], dim, k)
    search_query = query
    if bank.dtype in (torch.bfloat16, torch.float16) and query.dtype != bank.dtype:
        search_query = query.to(bank.dtype)
    keys, sub_maxima = knn_topk_split(search_query, bank, k, group_rows=plan.group_rows,
                                      sub_rows=plan.sub_rows, exclude=exclude)
    return knn_topk_merge(
        keys, sub_maxima, query, bank, k, sub_rows=plan.sub_rows, values_dtype=values_dtype,
        exclude=exclude, online=online, attention_temperature=attention_temperature,
        threshold=threshold,
        positiveness_dtype=positiveness_dtype,
    )
