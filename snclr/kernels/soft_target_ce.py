"""Fused soft-target contrastive cross-entropy: forward and backward without B x M logits.

Formula (DESIGN section 2), with ``n(x) = x / max(||x||, 1e-12)`` and the S columns owned by
row j at ``own(j, s) = target_offset + j*S + s``::

    s_jc    = <n(q_j), n(C_c)> / T
    lse_j   = logsumexp_c s_jc
    loss_j  = sum_s t_js * lse_j - sum_s t_js * s_j,own(j,s)
    ds_jc   = g_j * (sum(t_j) * exp(s_jc - lse_j) - target_jc)      (target_jc = t_js at own)
    dq_j    = chain_n(q_j, sum_c ds_jc * n(C_c) / T)
    dC_c    = chain_n(C_c, sum_j ds_jc * n(q_j) / T)
    dt_js   = g_j * (lse_j - s_j,own(j,s))
    chain_n(x, h) = (h - n(x) <n(x), h>) / ||x||   (h / 1e-12 when ||x|| <= 1e-12)

Algorithm::

    inverse norms of q and C, one launch          (_soft_target_ce_inverse_norm_kernel, O(B + M))
    forward grid (row blocks fastest, column splits):
        Q = the (BLOCK_B, D) query block, loaded once     # 16-bit D <= 256; else D chunks
        for each full column tile of the split (no masks, no nested loop: pipelined loads),
        then the split's partial last tile (masked):
            s2 = (Q @ C_tile^T) * (iq * log2(e) / T) * ic     # base-2 logits
            online max / sum of exp2 per row
        store per-split (max, sum)
    forward finish grid (row blocks): combine the splits' (max, sum) in split order into lse
        (deterministic); the owned logits s_j,own(j,s) in fp32 from the B*S owned rows (one
        contiguous run of C), so the tile loops hold no owned-column work; the loss
    backward prep grid (row blocks): row_weight = g sum(t) and dt = g (lse - s_own)
    backward dq grid (row blocks, column splits, D / BLOCK_DO): recompute s2 tiles the same
        way, ds = g sum(t) exp2(s2 - lse2), acc += (ds * ic / T) @ C_tile (the tile the logits
        read when BLOCK_DO = D, else its output chunk); per-split partials (no atomics)
    dq finish grid (row blocks, whole rows): sum the partials in split order, subtract the
        target term g_j sum_s t_js n(C_own(j,s)) / T, apply chain_n, store in q's dtype
    backward dC grid (column blocks, D chunks): stream all row tiles, acc += (ds * iq / T)^T @ q;
        the launcher subtracts g_j t_js n(q_j) / T on the owned rows

Launches: 3 forward (norms, logits, finish), 3 for dt and dq (prep, dq, finish) and no torch
op between them; dC adds its kernel and a few torch ops (it is off SNCLR's path).

Cost (elements read, flops): the forward reads q once and C once per row block (B/BLOCK_B
passes over M*D, mostly from L2 since the row blocks of one split run together) and writes
O(B*splits) floats for 2*B*M*D flops; per score it pays two multiplies, a max, an exp2 and
two adds. The dq pass recomputes the logits (2*B*M*D) and accumulates 2*B*M*D, recomputing
the logits once per output D chunk (one chunk for 16-bit D <= 256); the dC pass (only when C
needs a gradient) costs the same again and stages an fp32 (M, D) gradient before the
normalisation chain rule. The target terms are O(B*S*D). No B x M tensor exists; extra
memory is O(B + B*S + M + splits*B*D). Static sm_90 figures: ``bench/RESULTS.md`` and
``bench/model_soft_target_ce.py``.

Interpreter limits respected: tiles are cast to fp32 before ``tl.dot`` (bf16 dot is wrong
there), a single configuration (no benchmarking), no block pointers, every load masked with
bounds computed here (the interpreter does not catch out-of-bounds accesses).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from snclr.kernels._common import (
    CHUNK_D,
    NORM_EPS,
    input_precision,
    interpreted,
    one_pass_block_d,
)

__all__ = [
    "BackwardInputs",
    "inverse_norms",
    "soft_target_ce_backward_candidates",
    "soft_target_ce_backward_prep",
    "soft_target_ce_backward_queries",
    "soft_target_ce_configs",
    "soft_target_ce_forward",
]

# Grid size the split heuristic aims for: enough waves for a large GPU without a device query.
_TARGET_PROGRAMS = 1024
# Fewest column tiles worth one split: below that the (max, sum) partials cost more than they give.
_MIN_TILES_PER_SPLIT = 4
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------- configs


def soft_target_ce_configs(phase: str) -> list[triton.Config]:
    """Autotune list for ``phase`` in ("forward", "dq", "dc"); one config under the interpreter.

    BLOCK_D, the reduction chunk of the logits, is the launcher's (:func:`_block_d`): the
    whole padded D for 16-bit D <= 256, so the query block stays resident and every tile is
    one dot. BLOCK_DO is the output feature chunk of the backward accumulators (a grid
    dimension, so any D fits in registers); a dq with BLOCK_DO >= D reuses each candidate
    tile of the logits for its gradient.
    """
    if interpreted():
        return [triton.Config(dict(BLOCK_B=32, BLOCK_N=64, BLOCK_DO=64))]
    if phase == "forward":
        shapes = [(128, 32, 64, 8, 3), (128, 32, 64, 8, 4), (64, 32, 64, 4, 4),
                  (128, 64, 64, 8, 3), (64, 128, 64, 4, 3)]
    elif phase == "dq":
        shapes = [(128, 64, 256, 8, 2), (128, 32, 256, 8, 3), (64, 64, 256, 8, 3),
                  (128, 64, 128, 8, 3), (64, 64, 128, 4, 3), (64, 128, 64, 4, 3)]
    else:
        shapes = [(b, n, o, w, st) for (b, n, w, st) in
                  [(64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4)]
                  for o in (64, 128, 256)]
    # fp32 accumulators per thread: a dq's BLOCK_B x BLOCK_DO lives in wgmma registers (128
    # per thread compile without spills at D = 256); a dC's BLOCK_N x BLOCK_DO beyond 64
    # per thread spills heavily.
    per_thread = {"forward": None, "dq": 128, "dc": 64}[phase]
    return [
        triton.Config(dict(BLOCK_B=b, BLOCK_N=n, BLOCK_DO=o), num_warps=w, num_stages=st)
        for (b, n, o, w, st) in shapes
        if per_thread is None or (b if phase == "dq" else n) * o <= per_thread * 32 * w
    ]


def _block_d(width: int, itemsize: int, precision: str) -> int:
    """The logits' reduction chunk (:func:`one_pass_block_d`): an "ieee" fp32 dot runs on FMA
    units with its operands in registers, so it always streams."""
    if precision == "ieee":
        return min(max(16, triton.next_power_of_2(width)), CHUNK_D)
    return one_pass_block_d(width, itemsize)


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop output chunks wider than the padded D (they only load masked zeros), and for
    "ieee" fp32 the logit tiles above 32 per thread: that dot runs on FMA units with its
    operands in registers, and larger tiles spill tens of KB (minutes of ptxas per config)."""
    width = max(16, triton.next_power_of_2(named_args["D"]))
    ieee = kwargs.get("INPUT_PRECISION", named_args.get("INPUT_PRECISION")) == "ieee"
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_DO"] <= width
        and not (ieee and c.kwargs["BLOCK_B"] * c.kwargs["BLOCK_N"] > 32 * 32 * c.num_warps)
    ]  # fmt: skip
    return kept or configs[:1]


# ----------------------------------------------------------------------------------- helpers


@triton.jit
def _soft_target_ce_mma(a, b, acc, INPUT_PRECISION: tl.constexpr, CAST_FP32: tl.constexpr):
    """acc += a @ b in fp32; 16-bit tiles meet at b's dtype, fp32 honours INPUT_PRECISION."""
    if CAST_FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(b.dtype), b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _soft_target_ce_query_block(q_rows, row_mask, D: tl.constexpr, stride_qd,
                                BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                                CAST_FP32: tl.constexpr):
    """The (BLOCK_B, BLOCK_D) query block, loaded once when D fits in one chunk (else a
    placeholder: the chunked logits load their slices)."""
    feats = tl.arange(0, BLOCK_D)
    q = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    if BLOCK_D >= D:
        q = tl.load(q_rows[:, None] + feats[None, :] * stride_qd,
                    mask=row_mask[:, None] & (feats < D)[None, :], other=0.0)
        if CAST_FP32:
            q = q.to(tl.float32)
    return q


@triton.jit
def _soft_target_ce_tile(c_cols, col_mask, D: tl.constexpr, stride_cd, BLOCK_D: tl.constexpr,
                         MASK_COLS: tl.constexpr, CAST_FP32: tl.constexpr):
    """The (BLOCK_N, BLOCK_D) candidate tile at ``c_cols`` (the one-chunk path); columns
    masked only in a split's partial last tile, features only when D is padded."""
    feats = tl.arange(0, BLOCK_D)
    offs = c_cols[:, None] + feats[None, :] * stride_cd
    if MASK_COLS:
        c = tl.load(offs, mask=col_mask[:, None] & (feats < D)[None, :], other=0.0)
    elif BLOCK_D > D:
        c = tl.load(offs, mask=(feats < D)[None, :], other=0.0)
    else:
        c = tl.load(offs)
    if CAST_FP32:
        c = c.to(tl.float32)
    return c


@triton.jit
def _soft_target_ce_chunked_dot(
    q_rows, c_cols, row_mask, col_mask, D: tl.constexpr, stride_qd, stride_cd,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, CAST_FP32: tl.constexpr,
):  # fmt: skip
    """(BLOCK_B, BLOCK_N) raw dot <q, C> with the feature axis in BLOCK_D chunks."""
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        feats = d0 + tl.arange(0, BLOCK_D)
        feat_mask = feats < D
        q = tl.load(q_rows[:, None] + feats[None, :] * stride_qd,
                    mask=row_mask[:, None] & feat_mask[None, :], other=0.0)
        # Loaded transposed (BLOCK_D, BLOCK_N) so the dot needs no register transpose.
        c_t = tl.load(c_cols[None, :] + feats[:, None] * stride_cd,
                      mask=feat_mask[:, None] & col_mask[None, :], other=0.0)
        acc = _soft_target_ce_mma(q, c_t, acc, INPUT_PRECISION, CAST_FP32)
    return acc


@triton.jit
def _soft_target_ce_logits2(
    q, q_rows, c_cols, row_scale2, inv_c, row_mask, col_mask, D: tl.constexpr,
    stride_qd, stride_cd,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_COLS: tl.constexpr, INPUT_PRECISION: tl.constexpr, CAST_FP32: tl.constexpr,
):  # fmt: skip
    """Base-2 logits ``s * log2(e)`` of one tile and the candidate tile (one-chunk path; a
    placeholder when chunked). ``row_scale2 = inv_q * log2(e) / T``."""
    if BLOCK_D >= D:
        c = _soft_target_ce_tile(c_cols, col_mask, D, stride_cd, BLOCK_D, MASK_COLS, CAST_FP32)
        raw = _soft_target_ce_mma(q, tl.trans(c), tl.zeros((BLOCK_B, BLOCK_N), tl.float32),
                                  INPUT_PRECISION, CAST_FP32)
    else:
        c = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        raw = _soft_target_ce_chunked_dot(q_rows, c_cols, row_mask, col_mask, D, stride_qd,
                                          stride_cd, BLOCK_B, BLOCK_N, BLOCK_D,
                                          INPUT_PRECISION, CAST_FP32)
    return raw * row_scale2[:, None] * inv_c[None, :], c


@triton.jit
def _soft_target_ce_softmax_grad(s2, col_mask, lse2, row_weight, MASK_COLS: tl.constexpr):
    """``sum(t) * g * p`` on a tile of base-2 logits: the logit gradient less the target term,
    which the launchers add from the owned columns alone."""
    p = tl.exp2(s2 - lse2[:, None])
    if MASK_COLS:
        p = tl.where(col_mask[None, :], p, 0.0)
    return row_weight[:, None] * p


# ----------------------------------------------------------------------------------- kernels


@triton.jit
def _soft_target_ce_inverse_norm_rows(x_ptr, out_ptr, block, R, D, stride_xr, stride_xd, eps,
                                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """``1 / max(||x_r||, eps)`` of the ``block``-th BLOCK_R rows of x, stored in fp32."""
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    x_rows = x_ptr + rows.to(tl.int64) * stride_xr
    squares = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        feats = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(
            x_rows[:, None] + feats[None, :] * stride_xd,
            mask=row_mask[:, None] & (feats < D)[None, :],
            other=0.0,
        ).to(tl.float32)
        squares += tl.sum(x * x, axis=1)
    tl.store(out_ptr + rows, 1.0 / tl.maximum(tl.sqrt(squares), eps), mask=row_mask)


@triton.jit
def _soft_target_ce_inverse_norm_kernel(
    x_ptr, y_ptr, out_x_ptr, out_y_ptr, RX, RY, D, stride_xr, stride_xd, stride_yr, stride_yd,
    eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One launch for both operands: the first row blocks are x's, the rest y's.
    x_blocks = tl.cdiv(RX, BLOCK_R)
    block = tl.program_id(0)
    if block < x_blocks:
        _soft_target_ce_inverse_norm_rows(x_ptr, out_x_ptr, block, RX, D, stride_xr, stride_xd,
                                          eps, BLOCK_R, BLOCK_D)
    else:
        _soft_target_ce_inverse_norm_rows(y_ptr, out_y_ptr, block - x_blocks, RY, D, stride_yr,
                                          stride_yd, eps, BLOCK_R, BLOCK_D)


@triton.jit
def _soft_target_ce_columns(c_ptr, inv_c_ptr, col0, stop, stride_cm, BLOCK_N: tl.constexpr,
                            MASK_COLS: tl.constexpr):
    """A column tile's mask, candidate row pointers and inverse norms (masked only in a
    split's partial last tile)."""
    cols = col0 + tl.arange(0, BLOCK_N)
    col_mask = cols < stop
    if MASK_COLS:
        inv_c = tl.load(inv_c_ptr + cols, mask=col_mask, other=0.0)
    else:
        inv_c = tl.load(inv_c_ptr + cols)
    # Candidate offsets in int64: M * D passes 2**31 for large queues.
    return col_mask, c_ptr + cols.to(tl.int64) * stride_cm, inv_c


@triton.jit
def _soft_target_ce_fwd_tile(
    q, q_rows, c_ptr, inv_c_ptr, m_i, l_i, col0, stop, row_mask, row_scale2,
    D: tl.constexpr, stride_qd, stride_cm, stride_cd,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_COLS: tl.constexpr, INPUT_PRECISION: tl.constexpr, CAST_FP32: tl.constexpr,
):  # fmt: skip
    """One column tile of the online softmax: the updated base-2 (max, sum) per row."""
    col_mask, c_cols, inv_c = _soft_target_ce_columns(c_ptr, inv_c_ptr, col0, stop, stride_cm,
                                                      BLOCK_N, MASK_COLS)
    s2, _ = _soft_target_ce_logits2(
        q, q_rows, c_cols, row_scale2, inv_c, row_mask,
        col_mask, D, stride_qd, stride_cd, BLOCK_B, BLOCK_N, BLOCK_D, MASK_COLS,
        INPUT_PRECISION, CAST_FP32,
    )  # fmt: skip
    if MASK_COLS:
        s2 = tl.where(col_mask[None, :], s2, float("-inf"))
    # Every tile has a valid column, so m_new is finite and exp2(-inf) = 0 rescales cleanly.
    m_new = tl.maximum(m_i, tl.max(s2, axis=1))
    l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s2 - m_new[:, None]), axis=1)
    return m_new, l_i


@triton.jit
def _soft_target_ce_fwd_kernel(
    q_ptr, c_ptr, inv_q_ptr, inv_c_ptr, max_ptr, sum_ptr,
    B, M, D: tl.constexpr, cols_per_split, inv_temperature,
    stride_qb, stride_qd, stride_cm, stride_cd, stride_pb, stride_ps,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, CAST_FP32: tl.constexpr,
):  # fmt: skip
    tl.static_assert(BLOCK_B >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    q_rows = q_ptr + rows.to(tl.int64) * stride_qb
    q = _soft_target_ce_query_block(q_rows, row_mask, D, stride_qd, BLOCK_B, BLOCK_D, CAST_FP32)
    # Online softmax in base 2: log2(e) is folded into the row scale.
    row_scale2 = tl.load(inv_q_ptr + rows, mask=row_mask, other=0.0) * (inv_temperature * _LOG2E)
    m_i = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_B,), dtype=tl.float32)
    start = split * cols_per_split
    stop = tl.minimum(start + cols_per_split, M)
    # Full tiles unmasked (splits start on a BLOCK_N boundary), then the partial last one.
    full_stop = start + tl.maximum(stop - start, 0) // BLOCK_N * BLOCK_N
    for col0 in range(start, full_stop, BLOCK_N):
        m_i, l_i = _soft_target_ce_fwd_tile(
            q, q_rows, c_ptr, inv_c_ptr, m_i, l_i, col0, stop, row_mask, row_scale2, D,
            stride_qd, stride_cm, stride_cd, BLOCK_B, BLOCK_N, BLOCK_D, False,
            INPUT_PRECISION, CAST_FP32,
        )  # fmt: skip
    if full_stop < stop:
        m_i, l_i = _soft_target_ce_fwd_tile(
            q, q_rows, c_ptr, inv_c_ptr, m_i, l_i, full_stop, stop, row_mask, row_scale2, D,
            stride_qd, stride_cm, stride_cd, BLOCK_B, BLOCK_N, BLOCK_D, True,
            INPUT_PRECISION, CAST_FP32,
        )  # fmt: skip
    partial = rows.to(tl.int64) * stride_pb + split * stride_ps
    tl.store(max_ptr + partial, m_i, mask=row_mask)
    tl.store(sum_ptr + partial, l_i, mask=row_mask)


@triton.jit
def _soft_target_ce_dq_tile(
    q, q_rows, c_ptr, inv_c_ptr, acc, col0, stop, row_mask, out_feats, out_mask, row_scale2,
    lse2, row_weight, inv_temperature, D: tl.constexpr, stride_qd, stride_cm, stride_cd,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    MASK_COLS: tl.constexpr, INPUT_PRECISION: tl.constexpr, CAST_FP32: tl.constexpr,
):  # fmt: skip
    """acc += (sum(t) g p) @ (C * ic / T)[:, out chunk] for one column tile."""
    col_mask, c_cols, inv_c = _soft_target_ce_columns(c_ptr, inv_c_ptr, col0, stop, stride_cm,
                                                      BLOCK_N, MASK_COLS)
    s2, c = _soft_target_ce_logits2(
        q, q_rows, c_cols, row_scale2, inv_c, row_mask, col_mask, D, stride_qd, stride_cd,
        BLOCK_B, BLOCK_N, BLOCK_D, MASK_COLS, INPUT_PRECISION, CAST_FP32,
    )  # fmt: skip
    ds = _soft_target_ce_softmax_grad(s2, col_mask, lse2, row_weight, MASK_COLS)
    # d s / d n(q) = n(C) / T = C * ic / T: the column scale goes on ds, C stays raw.
    ds = ds * (inv_c * inv_temperature)[None, :]
    if BLOCK_D >= D and BLOCK_DO == BLOCK_D:
        # One output chunk: the tile already loaded for the logits is the gradient's operand.
        acc = _soft_target_ce_mma(ds, c, acc, INPUT_PRECISION, CAST_FP32)
    else:
        c_out = tl.load(
            c_cols[:, None] + out_feats[None, :] * stride_cd,
            mask=col_mask[:, None] & out_mask[None, :],
            other=0.0,
        )
        acc = _soft_target_ce_mma(ds, c_out, acc, INPUT_PRECISION, CAST_FP32)
    return acc


@triton.jit
def _soft_target_ce_bwd_dq_kernel(
    q_ptr, c_ptr, inv_q_ptr, inv_c_ptr, lse_ptr, row_weight_ptr, dq_ptr,
    B, M, D: tl.constexpr, cols_per_split, inv_temperature,
    stride_qb, stride_qd, stride_cm, stride_cd, stride_ps, stride_pb, stride_pd,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, CAST_FP32: tl.constexpr,
):  # fmt: skip
    tl.static_assert(BLOCK_B >= 16 and BLOCK_N >= 16 and BLOCK_DO >= 16)
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    out_feats = tl.program_id(2) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_mask = out_feats < D
    q_rows = q_ptr + rows.to(tl.int64) * stride_qb
    q = _soft_target_ce_query_block(q_rows, row_mask, D, stride_qd, BLOCK_B, BLOCK_D, CAST_FP32)
    row_scale2 = tl.load(inv_q_ptr + rows, mask=row_mask, other=0.0) * (inv_temperature * _LOG2E)
    lse2 = tl.load(lse_ptr + rows, mask=row_mask, other=0.0) * _LOG2E
    # Padded rows get g = 0, so their ds vanish whatever p is.
    row_weight = tl.load(row_weight_ptr + rows, mask=row_mask, other=0.0)
    acc = tl.zeros((BLOCK_B, BLOCK_DO), dtype=tl.float32)
    start = split * cols_per_split
    stop = tl.minimum(start + cols_per_split, M)
    full_stop = start + tl.maximum(stop - start, 0) // BLOCK_N * BLOCK_N
    for col0 in range(start, full_stop, BLOCK_N):
        acc = _soft_target_ce_dq_tile(
            q, q_rows, c_ptr, inv_c_ptr, acc, col0, stop, row_mask, out_feats, out_mask,
            row_scale2, lse2, row_weight, inv_temperature, D, stride_qd, stride_cm, stride_cd,
            BLOCK_B, BLOCK_N, BLOCK_D, BLOCK_DO, False, INPUT_PRECISION, CAST_FP32,
        )  # fmt: skip
    if full_stop < stop:
        acc = _soft_target_ce_dq_tile(
            q, q_rows, c_ptr, inv_c_ptr, acc, full_stop, stop, row_mask, out_feats, out_mask,
            row_scale2, lse2, row_weight, inv_temperature, D, stride_qd, stride_cm, stride_cd,
            BLOCK_B, BLOCK_N, BLOCK_D, BLOCK_DO, True, INPUT_PRECISION, CAST_FP32,
        )  # fmt: skip
    # splits * B * D can pass 2**31 when a caller asks for many splits.
    out = dq_ptr + split.to(tl.int64) * stride_ps + rows.to(tl.int64)[:, None] * stride_pb
    tl.store(out + out_feats[None, :] * stride_pd, acc, mask=row_mask[:, None] & out_mask[None, :])


@triton.jit
def _soft_target_ce_bwd_dc_kernel(
    q_ptr, c_ptr, inv_q_ptr, inv_c_ptr, lse_ptr, row_weight_ptr, dc_ptr,
    B, M, D: tl.constexpr, inv_temperature,
    stride_qb, stride_qd, stride_cm, stride_cd, stride_dm, stride_dd,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, CAST_FP32: tl.constexpr,
):  # fmt: skip
    tl.static_assert(BLOCK_B >= 16 and BLOCK_N >= 16 and BLOCK_DO >= 16)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < M
    out_feats = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_mask = out_feats < D
    inv_c = tl.load(inv_c_ptr + cols, mask=col_mask, other=0.0)
    c_cols = c_ptr + cols.to(tl.int64) * stride_cm
    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    for row0 in range(0, B, BLOCK_B):
        rows = row0 + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        inv_q = tl.load(inv_q_ptr + rows, mask=row_mask, other=0.0)
        lse2 = tl.load(lse_ptr + rows, mask=row_mask, other=0.0) * _LOG2E
        row_weight = tl.load(row_weight_ptr + rows, mask=row_mask, other=0.0)
        q_rows = q_ptr + rows.to(tl.int64) * stride_qb
        raw = _soft_target_ce_chunked_dot(
            q_rows, c_cols, row_mask, col_mask, D, stride_qd, stride_cd,
            BLOCK_B, BLOCK_N, BLOCK_D, INPUT_PRECISION, CAST_FP32,
        )  # fmt: skip
        s2 = raw * (inv_q * (inv_temperature * _LOG2E))[:, None] * inv_c[None, :]
        ds = _soft_target_ce_softmax_grad(s2, col_mask, lse2, row_weight, True)
        ds = ds * (inv_q * inv_temperature)[:, None]
        q = tl.load(
            q_rows[:, None] + out_feats[None, :] * stride_qd,
            mask=row_mask[:, None] & out_mask[None, :],
            other=0.0,
        )
        acc = _soft_target_ce_mma(tl.trans(ds), q, acc, INPUT_PRECISION, CAST_FP32)
    out = dc_ptr + cols.to(tl.int64)[:, None] * stride_dm + out_feats[None, :] * stride_dd
    tl.store(out, acc, mask=col_mask[:, None] & out_mask[None, :])


@triton.jit
def _soft_target_ce_fwd_finish_kernel(
    q_ptr, c_ptr, inv_q_ptr, inv_c_ptr, t_ptr, max_ptr, sum_ptr, lse_ptr, owned_ptr, loss_ptr,
    B, S, D, SPLITS, target_offset, inv_temperature,
    stride_qb, stride_qd, stride_cm, stride_cd, stride_tb, stride_ts, stride_pb, stride_ps,
    stride_ob, stride_os,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Per row block: the splits' (max, sum) combined in split order into lse, the owned
    logits in fp32 from their rows, and ``loss = sum(t) * lse - sum_s t * owned``."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    partials = rows64 * stride_pb
    row_max = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    for split in range(0, SPLITS):
        part_max = tl.load(max_ptr + partials + split * stride_ps, mask=row_mask, other=0.0)
        row_max = tl.maximum(row_max, part_max)
    total = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for split in range(0, SPLITS):
        part_max = tl.load(max_ptr + partials + split * stride_ps, mask=row_mask, other=0.0)
        # Padded rows read (0, 1): a finite lse, never stored.
        part_sum = tl.load(sum_ptr + partials + split * stride_ps, mask=row_mask, other=1.0)
        total += part_sum * tl.exp2(part_max - row_max)
    # The partials are in base 2.
    lse = (row_max + tl.log2(total)) * _LN2
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    inv_q = tl.load(inv_q_ptr + rows, mask=row_mask, other=0.0)
    q_rows = q_ptr + rows64 * stride_qb
    first_owned = target_offset + rows64 * S
    mass = tl.zeros((BLOCK_B,), dtype=tl.float32)
    target_logits = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for slot in range(0, S):
        own = first_owned + slot
        raw = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            feats = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (feats < D)[None, :]
            q = tl.load(q_rows[:, None] + feats[None, :] * stride_qd, mask=mask, other=0.0)
            c = tl.load(c_ptr + own[:, None] * stride_cm + feats[None, :] * stride_cd,
                        mask=mask, other=0.0)
            raw += tl.sum(q.to(tl.float32) * c.to(tl.float32), axis=1)
        inv_c = tl.load(inv_c_ptr + own, mask=row_mask, other=0.0)
        owned = raw * inv_q * inv_c * inv_temperature
        tl.store(owned_ptr + rows64 * stride_ob + slot * stride_os, owned, mask=row_mask)
        weight = tl.load(t_ptr + rows64 * stride_tb + slot * stride_ts, mask=row_mask,
                         other=0.0).to(tl.float32)
        mass += weight
        target_logits += weight * owned
    tl.store(loss_ptr + rows, mass * lse - target_logits, mask=row_mask)


@triton.jit
def _soft_target_ce_bwd_prep_kernel(
    grad_ptr, t_ptr, lse_ptr, owned_ptr, row_weight_ptr, dt_ptr, B, S,
    stride_g, stride_tb, stride_ts, stride_ob, stride_os, stride_db, stride_ds,
    BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """``row_weight = g * sum(t)`` (fp32, what the dq / dC kernels scale p by) and the target
    gradient ``g * (lse - owned)`` in the targets' dtype."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    g = tl.load(grad_ptr + rows64 * stride_g, mask=row_mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    mass = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        mask = row_mask[:, None] & (slots < S)[None, :]
        weights = tl.load(t_ptr + rows64[:, None] * stride_tb + slots[None, :] * stride_ts,
                          mask=mask, other=0.0).to(tl.float32)
        mass += tl.sum(weights, axis=1)
        owned = tl.load(owned_ptr + rows64[:, None] * stride_ob + slots[None, :] * stride_os,
                        mask=mask, other=0.0)
        grad_targets = g[:, None] * (lse[:, None] - owned)
        tl.store(dt_ptr + rows64[:, None] * stride_db + slots[None, :] * stride_ds,
                 grad_targets.to(dt_ptr.dtype.element_ty), mask=mask)
    tl.store(row_weight_ptr + rows, g * mass, mask=row_mask)


@triton.jit
def _soft_target_ce_dq_finish_kernel(
    q_ptr, c_ptr, inv_q_ptr, inv_c_ptr, t_ptr, grad_ptr, part_ptr, dq_ptr,
    B, S, D, SPLITS, target_offset, inv_temperature, inv_eps,
    stride_qb, stride_qd, stride_cm, stride_cd, stride_tb, stride_ts, stride_g,
    stride_ps, stride_pb, stride_pd, stride_ob, stride_od,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Per row block, whole rows (BLOCK_D >= D): h = the splits' dq partials summed in split
    order less ``g sum_s t_s n(C_own(s)) / T``, then the normalisation chain rule
    ``(h - n(q) <n(q), h>) * inv_q`` (``h * inv_q`` where the norm was clamped), in q's dtype."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    feats = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (feats < D)[None, :]
    partials = part_ptr + rows64[:, None] * stride_pb + feats[None, :] * stride_pd
    h = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for _ in range(0, SPLITS):
        h += tl.load(partials, mask=mask, other=0.0)
        partials += stride_ps  # a pointer step: splits * B * D may pass 2**31
    g = tl.load(grad_ptr + rows64 * stride_g, mask=row_mask, other=0.0).to(tl.float32)
    first_owned = target_offset + rows64 * S
    for slot in range(0, S):
        own = first_owned + slot
        weight = tl.load(t_ptr + rows64 * stride_tb + slot * stride_ts, mask=row_mask,
                         other=0.0).to(tl.float32)
        scale = weight * g * inv_temperature * tl.load(inv_c_ptr + own, mask=row_mask, other=0.0)
        c = tl.load(c_ptr + own[:, None] * stride_cm + feats[None, :] * stride_cd, mask=mask,
                    other=0.0)
        h -= scale[:, None] * c.to(tl.float32)
    inv_q = tl.load(inv_q_ptr + rows, mask=row_mask, other=0.0)
    q = tl.load(q_ptr + rows64[:, None] * stride_qb + feats[None, :] * stride_qd, mask=mask,
                other=0.0)
    unit = q.to(tl.float32) * inv_q[:, None]
    along = tl.where(inv_q >= inv_eps, 0.0, tl.sum(unit * h, axis=1))
    dq = (h - unit * along[:, None]) * inv_q[:, None]
    tl.store(dq_ptr + rows64[:, None] * stride_ob + feats[None, :] * stride_od,
             dq.to(dq_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------- launchers

_KERNELS = {
    "forward": _soft_target_ce_fwd_kernel,
    "dq": _soft_target_ce_bwd_dq_kernel,
    "dc": _soft_target_ce_bwd_dc_kernel,
}
_tuned: dict[str, object] = {}


def _kernel(name: str, block: dict | None, features: Tensor) -> tuple[object, dict]:
    """The kernel for ``name`` and its meta-parameters: the caller's block sizes (tests,
    bench), or the autotuned kernel, built on first use (nothing at import time); BLOCK_D
    from :func:`_block_d` unless the caller gives it."""
    kernel = _KERNELS[name]
    precision = _precision(features.dtype)
    itemsize = 4 if precision["CAST_FP32"] else features.element_size()
    meta = dict(BLOCK_D=_block_d(features.shape[1], itemsize, precision["INPUT_PRECISION"]),
                **precision)
    if block is not None:
        return kernel, {**meta, **block}
    if name not in _tuned:
        # INPUT_PRECISION is a key because the prune keeps other configs for "ieee" fp32.
        _tuned[name] = triton.autotune(
            configs=soft_target_ce_configs(name), key=["D", "S", "INPUT_PRECISION", "BLOCK_D"],
            prune_configs_by={"early_config_prune": _prune_configs},
        )(kernel)
    return _tuned[name], meta


def _precision(dtype: torch.dtype) -> dict:
    return dict(INPUT_PRECISION=input_precision(dtype), CAST_FP32=interpreted())


def _split_layout(num_rows: int, num_cols: int, splits: int | None, block: dict | None):
    """(splits, cols_per_split): column ranges aligned to every candidate BLOCK_N."""
    configs = [c for phase in _KERNELS for c in soft_target_ce_configs(phase)]
    align = block["BLOCK_N"] if block else max(c.kwargs["BLOCK_N"] for c in configs)
    tiles = triton.cdiv(num_cols, align)
    if splits is None:
        row_blocks = triton.cdiv(num_rows, block["BLOCK_B"] if block else 64)
        splits = min(triton.cdiv(_TARGET_PROGRAMS, row_blocks), tiles // _MIN_TILES_PER_SPLIT)
    splits = max(1, min(splits, tiles))
    cols_per_split = triton.cdiv(tiles, splits) * align
    # Rounding may leave trailing splits empty; drop them so every split owns a column.
    return triton.cdiv(num_cols, cols_per_split), cols_per_split


def inverse_norms(x: Tensor, y: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """``(R,)`` fp32 ``1 / max(||x_r||, 1e-12)`` of an ``(R, D)`` tensor; given ``y`` (same
    D), the pair ``(for x, for y)`` from one launch."""
    num_rows, width = x.shape
    other = x[:0] if y is None else y
    out_x = torch.empty(num_rows, device=x.device, dtype=torch.float32)
    out_y = torch.empty(other.shape[0], device=x.device, dtype=torch.float32)
    block_r, block_d = 32, min(128, max(16, triton.next_power_of_2(width)))
    grid = (triton.cdiv(num_rows, block_r) + triton.cdiv(other.shape[0], block_r),)
    _soft_target_ce_inverse_norm_kernel[grid](
        x_ptr=x, y_ptr=other, out_x_ptr=out_x, out_y_ptr=out_y, RX=num_rows, RY=other.shape[0],
        D=width, stride_xr=x.stride(0), stride_xd=x.stride(1), stride_yr=other.stride(0),
        stride_yd=other.stride(1), eps=NORM_EPS, BLOCK_R=block_r, BLOCK_D=block_d,
    )
    return out_x if y is None else (out_x, out_y)


def _finish_blocks(width: int, *, whole_rows: bool) -> dict:
    """The finish kernels' ``BLOCK_B, BLOCK_D``: whole padded rows (the dq finish holds h for
    its chain rule) or CHUNK_D slices (the forward's owned dots), on at most 4096 fp32 per
    program."""
    padded = max(16, triton.next_power_of_2(width))
    block_d = padded if whole_rows else min(padded, CHUNK_D)
    return dict(BLOCK_B=max(2, min(32, 4096 // block_d)), BLOCK_D=block_d)


def soft_target_ce_forward(
    queries: Tensor,
    candidates: Tensor,
    targets: Tensor,
    inv_q: Tensor,
    inv_c: Tensor,
    *,
    temperature: float,
    target_offset: int,
    splits: int | None = None,
    block: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The per-row loss, its lse and the owned logits: two launches.

    The main kernel stores per-split online-softmax partials; the finish kernel combines them
    in split order (deterministic), computes the owned logits (B*S of the B*M) in fp32 from
    their rows, so the main tile loop holds no owned-column work, and the loss
    ``sum(t) * lse - sum_s t * owned`` (``reference.soft_target_loss_of``).

    Args:
        queries: ``(B, D)`` fp32/fp16/bf16. candidates: ``(M, D)``, same dtype.
        targets: ``(B, S)`` float weights of the owned columns.
        inv_q, inv_c: ``(B,)``, ``(M,)`` fp32 inverse norms (:func:`inverse_norms`).
        splits: column splits (default: a grid of about 1024 programs).
        block: explicit ``BLOCK_B, BLOCK_N, BLOCK_DO`` (and optionally ``BLOCK_D``) instead
            of autotuning.

    Returns:
        ``(loss, lse, owned)``: ``(B,)``, ``(B,)`` and ``(B, S)`` fp32.
    """
    num_rows, width = queries.shape
    num_cols = candidates.shape[0]
    num_slots = targets.shape[1]
    splits, cols_per_split = _split_layout(num_rows, num_cols, splits, block)
    f32 = dict(device=queries.device, dtype=torch.float32)
    part_max = torch.empty(num_rows, splits, **f32)
    part_sum = torch.empty(num_rows, splits, **f32)
    kernel, meta = _kernel("forward", block, queries)

    def grid(meta):
        return (triton.cdiv(num_rows, meta["BLOCK_B"]), splits)

    kernel[grid](
        q_ptr=queries, c_ptr=candidates, inv_q_ptr=inv_q, inv_c_ptr=inv_c,
        max_ptr=part_max, sum_ptr=part_sum, B=num_rows, M=num_cols, D=width,
        cols_per_split=cols_per_split, inv_temperature=1.0 / temperature,
        stride_qb=queries.stride(0), stride_qd=queries.stride(1),
        stride_cm=candidates.stride(0), stride_cd=candidates.stride(1),
        stride_pb=part_max.stride(0), stride_ps=part_max.stride(1), **meta,
    )
    loss, lse = torch.empty(num_rows, **f32), torch.empty(num_rows, **f32)
    owned = torch.empty(num_rows, num_slots, **f32)
    blocks = _finish_blocks(width, whole_rows=False)
    _soft_target_ce_fwd_finish_kernel[(triton.cdiv(num_rows, blocks["BLOCK_B"]),)](
        q_ptr=queries, c_ptr=candidates, inv_q_ptr=inv_q, inv_c_ptr=inv_c, t_ptr=targets,
        max_ptr=part_max, sum_ptr=part_sum, lse_ptr=lse, owned_ptr=owned, loss_ptr=loss,
        B=num_rows, S=num_slots, D=width, SPLITS=splits, target_offset=target_offset,
        inv_temperature=1.0 / temperature,
        stride_qb=queries.stride(0), stride_qd=queries.stride(1),
        stride_cm=candidates.stride(0), stride_cd=candidates.stride(1),
        stride_tb=targets.stride(0), stride_ts=targets.stride(1),
        stride_pb=part_max.stride(0), stride_ps=part_max.stride(1),
        stride_ob=owned.stride(0), stride_os=owned.stride(1), **blocks,
    )
    return loss, lse, owned


def soft_target_ce_backward_prep(
    grad: Tensor, targets: Tensor, lse: Tensor, owned: Tensor
) -> tuple[Tensor, Tensor]:
    """``(row_weight, grad_targets)`` in one launch: ``(B,)`` fp32 ``g * sum(t)`` and the
    ``(B, S)`` target gradient ``g * (lse - owned)`` in the targets' dtype.

    ``grad`` is the ``(B,)`` incoming gradient of the per-row losses, any float dtype and
    stride (a ``loss.sum()`` backward gives a stride-0 one).
    """
    num_rows, num_slots = targets.shape
    row_weight = torch.empty(num_rows, device=targets.device, dtype=torch.float32)
    grad_targets = torch.empty_like(targets, memory_format=torch.contiguous_format)
    block_b, block_s = 32, min(32, max(2, triton.next_power_of_2(num_slots)))
    _soft_target_ce_bwd_prep_kernel[(triton.cdiv(num_rows, block_b),)](
        grad_ptr=grad, t_ptr=targets, lse_ptr=lse, owned_ptr=owned, row_weight_ptr=row_weight,
        dt_ptr=grad_targets, B=num_rows, S=num_slots, stride_g=grad.stride(0),
        stride_tb=targets.stride(0), stride_ts=targets.stride(1),
        stride_ob=owned.stride(0), stride_os=owned.stride(1),
        stride_db=grad_targets.stride(0), stride_ds=grad_targets.stride(1),
        BLOCK_B=block_b, BLOCK_S=block_s,
    )
    return row_weight, grad_targets


class BackwardInputs(NamedTuple):
    """What both backward launchers read; built once by the caller, passed by name.

    ``lse`` and ``row_weight = grad * sum(targets)`` (:func:`soft_target_ce_backward_prep`)
    are ``(B,)`` fp32, ``grad`` the ``(B,)`` incoming gradient in any float dtype and stride;
    the other tensors as for :func:`soft_target_ce_forward`.
    """

    queries: Tensor
    candidates: Tensor
    targets: Tensor
    inv_q: Tensor
    inv_c: Tensor
    lse: Tensor
    grad: Tensor
    row_weight: Tensor
    temperature: float
    target_offset: int

    def target_weights(self) -> Tensor:
        """``(B, S)`` fp32 ``g_j t_js / T``: the target term of the logit gradient, which
        lives on the owned columns only and is subtracted outside the kernels."""
        return self.grad.float().unsqueeze(1) * self.targets.float() / self.temperature


def _backward_args(inputs: BackwardInputs) -> dict:
    """The kernel arguments both backward kernels share, by name."""
    queries, candidates = inputs.queries, inputs.candidates
    return dict(
        q_ptr=queries, c_ptr=candidates, inv_q_ptr=inputs.inv_q, inv_c_ptr=inputs.inv_c,
        lse_ptr=inputs.lse, row_weight_ptr=inputs.row_weight,
        B=queries.shape[0], M=candidates.shape[0], D=queries.shape[1],
        inv_temperature=1.0 / inputs.temperature,
        stride_qb=queries.stride(0), stride_qd=queries.stride(1),
        stride_cm=candidates.stride(0), stride_cd=candidates.stride(1),
    )


def soft_target_ce_backward_queries(
    inputs: BackwardInputs, *, splits: int | None = None, block: dict | None = None
) -> Tensor:
    """``(B, D)`` gradient w.r.t. the queries, in their dtype: two launches.

    The main kernel stores per-split fp32 partials of the gradient w.r.t. ``n(q)``; the
    finish kernel sums them in split order (deterministic), subtracts the target term
    ``g_j sum_s t_js n(C_own(j,s)) / T`` and applies the normalisation chain rule
    (``snclr.ops._grads.normalize_backward``, the clamped-norm case included).
    """
    queries, candidates, targets = inputs.queries, inputs.candidates, inputs.targets
    num_rows, width = queries.shape
    splits, cols_per_split = _split_layout(num_rows, candidates.shape[0], splits, block)
    partial = torch.empty(splits, num_rows, width, device=queries.device, dtype=torch.float32)
    kernel, meta = _kernel("dq", block, queries)

    def grid(meta):
        return (triton.cdiv(num_rows, meta["BLOCK_B"]), splits,
                triton.cdiv(width, meta["BLOCK_DO"]))

    kernel[grid](
        **_backward_args(inputs), dq_ptr=partial, cols_per_split=cols_per_split,
        stride_ps=partial.stride(0), stride_pb=partial.stride(1), stride_pd=partial.stride(2),
        **meta,
    )
    grad_queries = torch.empty(num_rows, width, device=queries.device, dtype=queries.dtype)
    blocks = _finish_blocks(width, whole_rows=True)
    _soft_target_ce_dq_finish_kernel[(triton.cdiv(num_rows, blocks["BLOCK_B"]),)](
        q_ptr=queries, c_ptr=candidates, inv_q_ptr=inputs.inv_q, inv_c_ptr=inputs.inv_c,
        t_ptr=targets, grad_ptr=inputs.grad, part_ptr=partial, dq_ptr=grad_queries,
        B=num_rows, S=targets.shape[1], D=width, SPLITS=splits,
        target_offset=inputs.target_offset, inv_temperature=1.0 / inputs.temperature,
        inv_eps=1.0 / NORM_EPS,
        stride_qb=queries.stride(0), stride_qd=queries.stride(1),
        stride_cm=candidates.stride(0), stride_cd=candidates.stride(1),
        stride_tb=targets.stride(0), stride_ts=targets.stride(1), stride_g=inputs.grad.stride(0),
        stride_ps=partial.stride(0), stride_pb=partial.stride(1), stride_pd=partial.stride(2),
        stride_ob=grad_queries.stride(0), stride_od=grad_queries.stride(1), **blocks,
    )
    return grad_queries


def soft_target_ce_backward_candidates(
    inputs: BackwardInputs, *, block: dict | None = None
) -> Tensor:
    """``(M, D)`` fp32 gradient w.r.t. ``n(C)``, the target term subtracted on the owned rows."""
    num_cols, width = inputs.candidates.shape
    grad_unit = torch.empty(num_cols, width, device=inputs.queries.device, dtype=torch.float32)
    kernel, meta = _kernel("dc", block, inputs.queries)

    def grid(meta):
        return (triton.cdiv(num_cols, meta["BLOCK_N"]), triton.cdiv(width, meta["BLOCK_DO"]))

    kernel[grid](
        **_backward_args(inputs), dc_ptr=grad_unit, stride_dm=grad_unit.stride(0),
        stride_dd=grad_unit.stride(1), **meta,
    )
    num_rows, num_slots = inputs.targets.shape
    unit_q = inputs.queries.float() * inputs.inv_q.unsqueeze(1)
    owned = grad_unit.narrow(0, inputs.target_offset, num_rows * num_slots)
    owned -= torch.einsum("bs,bd->bsd", inputs.target_weights(), unit_q).flatten(0, 1)
    return grad_unit
