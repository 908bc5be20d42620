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

    inverse norms of q and C                      (_soft_target_ce_inverse_norm_kernel, O(B + M))
    forward grid (row blocks fastest, column splits):
        for each column tile of the split: s = (q_tile @ C_tile^T) * iq * ic * log2(e)/T
            online max / sum of exp2 per row; store s at owned columns of this row block
        store per-split (max, sum)                -> snclr.ops combines splits in fixed order
    backward dq grid (row blocks, column splits, D chunks): recompute s tiles, p = exp2(s-lse),
        ds from p and the in-tile target weights, acc += (ds * ic / T) @ C_chunk
        per-split partials, summed in fixed order by snclr.ops (deterministic, no atomics)
    backward dC grid (column blocks, D chunks): stream all row tiles, acc += (ds * iq / T)^T @ q

Cost (elements read, flops): the forward reads q once and C once per row block (B/BLOCK_B
passes over M*D, mostly from L2 since the row blocks of one split run together) and writes
O(B*splits + B*S) floats for 2*B*M*D flops. The dq pass recomputes the logits (2*B*M*D) and
accumulates 2*B*M*D, recomputing the logits once per output D chunk; the dC pass (only when C
needs a gradient) costs the same again and stages an fp32 (M, D) gradient before the
normalisation chain rule. The owned-column work runs only on the tiles that meet the row
block's owned range. No B x M tensor exists; extra memory is O(B + B*S + M + splits*B*D).

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

from snclr.kernels._common import NORM_EPS, input_precision, interpreted

__all__ = [
    "BackwardInputs",
    "inverse_norms",
    "soft_target_ce_backward_candidates",
    "soft_target_ce_backward_queries",
    "soft_target_ce_configs",
    "soft_target_ce_forward",
]

# Grid size the split heuristic aims for: enough waves for a large GPU without a device query.
_TARGET_PROGRAMS = 1024
# Fewest column tiles worth one split: below that the (max, sum) partials cost more than they give.
_MIN_TILES_PER_SPLIT = 4


# ----------------------------------------------------------------------------------- configs


def soft_target_ce_configs(phase: str) -> list[triton.Config]:
    """Autotune list for ``phase`` in ("forward", "backward"); one config under the interpreter.

    BLOCK_D is the reduction chunk of the logits; BLOCK_DO the output feature chunk of the
    backward accumulators (a grid dimension, so any D fits in registers).
    """
    if interpreted():
        return [triton.Config(dict(BLOCK_B=32, BLOCK_N=64, BLOCK_D=32, BLOCK_DO=64))]
    shapes = [(64, 128, 64, 4, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 4)]
    outs = (64,) if phase == "forward" else (64, 128, 256)
    return [
        triton.Config(
            dict(BLOCK_B=b, BLOCK_N=n, BLOCK_D=d, BLOCK_DO=o), num_warps=w, num_stages=st
        )
        for (b, n, d, w, st) in shapes
        for o in outs
        # Backward accumulators (dq: BLOCK_B x BLOCK_DO, dC: BLOCK_N x BLOCK_DO fp32) must stay
        # in registers: beyond 64 per thread the sm_90 compile spills heavily.
        if phase == "forward" or max(b, n) * o <= 64 * 32 * w
    ]


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop feature chunks wider than the padded D (they only load masked zeros), and for
    "ieee" fp32 the logit tiles above 32 per thread: that dot runs on FMA units with its
    operands in registers, and larger tiles spill tens of KB (minutes of ptxas per config)."""
    width = max(16, triton.next_power_of_2(named_args["D"]))
    ieee = kwargs.get("INPUT_PRECISION", named_args.get("INPUT_PRECISION")) == "ieee"
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_D"] <= width and c.kwargs["BLOCK_DO"] <= width
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
def _soft_target_ce_logits(
    q_ptr, c_ptr, inv_q, inv_c, rows, cols, row_mask, col_mask, D, scale,
    stride_qb, stride_qd, stride_cm, stride_cd,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, CAST_FP32: tl.constexpr,
):  # fmt: skip
    """(BLOCK_B, BLOCK_N) tile of s = <n(q), n(C)> * scale, the feature axis in BLOCK_D chunks."""
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    q_rows = q_ptr + rows.to(tl.int64) * stride_qb
    # Candidate offsets in int64: M * D passes 2**31 for large queues.
    c_cols = c_ptr + cols.to(tl.int64) * stride_cm
    for d0 in range(0, D, BLOCK_D):
        feats = d0 + tl.arange(0, BLOCK_D)
        feat_mask = feats < D
        q = tl.load(
            q_rows[:, None] + feats[None, :] * stride_qd,
            mask=row_mask[:, None] & feat_mask[None, :],
            other=0.0,
        )
        # Loaded transposed (BLOCK_D, BLOCK_N) so the dot needs no register transpose.
        c_t = tl.load(
            c_cols[None, :] + feats[:, None] * stride_cd,
            mask=feat_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        acc = _soft_target_ce_mma(q, c_t, acc, INPUT_PRECISION, CAST_FP32)
    return acc * (inv_q[:, None] * scale) * inv_c[None, :]


@triton.jit
def _soft_target_ce_owner(cols, B, S, target_offset):
    """Row owning each column (-1 if none) and its slot; guards negative division by hand."""
    rel = cols.to(tl.int64) - target_offset
    owned = (rel >= 0) & (rel < B * S)
    rel = tl.where(owned, rel, 0)
    owner = tl.where(owned, rel // S, -1)
    slot = rel % S
    return owner, slot


@triton.jit
def _soft_target_ce_touches_owned(row0, col0, S, target_offset, BLOCK_B, BLOCK_N):
    """Whether columns [col0, col0+BLOCK_N) meet those owned by rows [row0, row0+BLOCK_B)."""
    own_lo = target_offset + row0 * S
    own_hi = own_lo + BLOCK_B * S
    return (col0 < own_hi) & (col0 + BLOCK_N > own_lo)


@triton.jit
def _soft_target_ce_dlogits(
    s, row0, col0, rows, cols, col_mask, lse2, grad, row_weight, t_ptr, stride_tb, stride_ts,
    B, S, target_offset, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """ds = g * (sum(t) * p - target) on a tile; target_jc is read only where row j owns c."""
    p = tl.exp2(s * 1.4426950408889634 - lse2[:, None])
    ds = row_weight[:, None] * tl.where(col_mask[None, :], p, 0.0)
    # Most tiles own nothing: the target gather and compare run only where they can hit.
    if _soft_target_ce_touches_owned(row0, col0, S, target_offset, BLOCK_B, BLOCK_N):
        owner, slot = _soft_target_ce_owner(cols, B, S, target_offset)
        t_col = tl.load(
            t_ptr + owner * stride_tb + slot * stride_ts, mask=owner >= 0, other=0.0
        ).to(tl.float32)
        target = tl.where(owner[None, :] == rows[:, None], t_col[None, :], 0.0)
        ds = ds - grad[:, None] * target
    return ds


# ----------------------------------------------------------------------------------- kernels


@triton.jit
def _soft_target_ce_inverse_norm_kernel(
    x_ptr, out_ptr, R, D, stride_xr, stride_xd, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
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
def _soft_target_ce_fwd_kernel(
    q_ptr, c_ptr, inv_q_ptr, inv_c_ptr, max_ptr, sum_ptr, owned_ptr,
    B, M, D, S, target_offset, cols_per_split, inv_temperature,
    stride_qb, stride_qd, stride_cm, stride_cd, stride_pb, stride_ps, stride_ob, stride_os,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, CAST_FP32: tl.constexpr,
):  # fmt: skip
    tl.static_assert(BLOCK_B >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    row0 = pid_b * BLOCK_B
    rows = row0 + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    inv_q = tl.load(inv_q_ptr + rows, mask=row_mask, other=0.0)
    # Online softmax in base 2: log2(e) is folded into the logit scale.
    m_i = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_B,), dtype=tl.float32)
    start = split * cols_per_split
    stop = tl.minimum(start + cols_per_split, M)
    for col0 in range(start, stop, BLOCK_N):
        cols = col0 + tl.arange(0, BLOCK_N)
        col_mask = cols < stop
        inv_c = tl.load(inv_c_ptr + cols, mask=col_mask, other=0.0)
        s = _soft_target_ce_logits(
            q_ptr, c_ptr, inv_q, inv_c, rows, cols, row_mask, col_mask, D, inv_temperature,
            stride_qb, stride_qd, stride_cm, stride_cd,
            BLOCK_B, BLOCK_N, BLOCK_D, INPUT_PRECISION, CAST_FP32,
        )  # fmt: skip
        # Owned logits: each owned column lies in exactly one tile of one split, so one store.
        if _soft_target_ce_touches_owned(row0, col0, S, target_offset, BLOCK_B, BLOCK_N):
            owner, slot = _soft_target_ce_owner(cols, B, S, target_offset)
            mine = (owner >= row0) & (owner < row0 + BLOCK_B)
            owned_s = tl.sum(tl.where(owner[None, :] == rows[:, None], s, 0.0), axis=0)
            tl.store(owned_ptr + owner * stride_ob + slot * stride_os, owned_s, mask=mine)
        # Every tile has a valid column, so m_new is finite and exp2(-inf) = 0 rescales cleanly.
        s2 = tl.where(col_mask[None, :], s * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s2 - m_new[:, None]), axis=1)
        m_i = m_new
    partial = rows.to(tl.int64) * stride_pb + split * stride_ps
    tl.store(max_ptr + partial, m_i, mask=row_mask)
    tl.store(sum_ptr + partial, l_i, mask=row_mask)


@triton.jit
def _soft_target_ce_bwd_dq_kernel(
    q_ptr, c_ptr, t_ptr, inv_q_ptr, inv_c_ptr, lse_ptr, grad_ptr, row_weight_ptr, dq_ptr,
    B, M, D, S, target_offset, cols_per_split, inv_temperature,
    stride_qb, stride_qd, stride_cm, stride_cd, stride_tb, stride_ts,
    stride_ps, stride_pb, stride_pd,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, CAST_FP32: tl.constexpr,
):  # fmt: skip
    tl.static_assert(BLOCK_B >= 16 and BLOCK_N >= 16 and BLOCK_DO >= 16)
    split = tl.program_id(1)
    row0 = tl.program_id(0) * BLOCK_B
    rows = row0 + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    out_feats = tl.program_id(2) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_mask = out_feats < D
    inv_q = tl.load(inv_q_ptr + rows, mask=row_mask, other=0.0)
    lse2 = tl.load(lse_ptr + rows, mask=row_mask, other=0.0) * 1.4426950408889634
    # Padded rows get g = 0, so their ds vanish whatever p is.
    grad = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)
    row_weight = tl.load(row_weight_ptr + rows, mask=row_mask, other=0.0)
    acc = tl.zeros((BLOCK_B, BLOCK_DO), dtype=tl.float32)
    start = split * cols_per_split
    stop = tl.minimum(start + cols_per_split, M)
    for col0 in range(start, stop, BLOCK_N):
        cols = col0 + tl.arange(0, BLOCK_N)
        col_mask = cols < stop
        inv_c = tl.load(inv_c_ptr + cols, mask=col_mask, other=0.0)
        s = _soft_target_ce_logits(
            q_ptr, c_ptr, inv_q, inv_c, rows, cols, row_mask, col_mask, D, inv_temperature,
            stride_qb, stride_qd, stride_cm, stride_cd,
            BLOCK_B, BLOCK_N, BLOCK_D, INPUT_PRECISION, CAST_FP32,
        )  # fmt: skip
        ds = _soft_target_ce_dlogits(
            s, row0, col0, rows, cols, col_mask, lse2, grad, row_weight, t_ptr,
            stride_tb, stride_ts, B, S, target_offset, BLOCK_B, BLOCK_N,
        )  # fmt: skip
        # d s / d n(q) = n(C) / T = C * ic / T: the column scale goes on ds, C stays raw.
        ds = ds * (inv_c * inv_temperature)[None, :]
        c = tl.load(
            c_ptr + cols.to(tl.int64)[:, None] * stride_cm + out_feats[None, :] * stride_cd,
            mask=col_mask[:, None] & out_mask[None, :],
            other=0.0,
        )
        acc = _soft_target_ce_mma(ds, c, acc, INPUT_PRECISION, CAST_FP32)
    # splits * B * D can pass 2**31 when a caller asks for many splits.
    out = dq_ptr + split.to(tl.int64) * stride_ps + rows.to(tl.int64)[:, None] * stride_pb
    tl.store(out + out_feats[None, :] * stride_pd, acc, mask=row_mask[:, None] & out_mask[None, :])


@triton.jit
def _soft_target_ce_bwd_dc_kernel(
    q_ptr, c_ptr, t_ptr, inv_q_ptr, inv_c_ptr, lse_ptr, grad_ptr, row_weight_ptr, dc_ptr,
    B, M, D, S, target_offset, inv_temperature,
    stride_qb, stride_qd, stride_cm, stride_cd, stride_tb, stride_ts, stride_dm, stride_dd,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, CAST_FP32: tl.constexpr,
):  # fmt: skip
    tl.static_assert(BLOCK_B >= 16 and BLOCK_N >= 16 and BLOCK_DO >= 16)
    col0 = tl.program_id(0) * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    col_mask = cols < M
    out_feats = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_mask = out_feats < D
    inv_c = tl.load(inv_c_ptr + cols, mask=col_mask, other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    for row0 in range(0, B, BLOCK_B):
        rows = row0 + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        inv_q = tl.load(inv_q_ptr + rows, mask=row_mask, other=0.0)
        lse2 = tl.load(lse_ptr + rows, mask=row_mask, other=0.0) * 1.4426950408889634
        grad = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)
        row_weight = tl.load(row_weight_ptr + rows, mask=row_mask, other=0.0)
        s = _soft_target_ce_logits(
            q_ptr, c_ptr, inv_q, inv_c, rows, cols, row_mask, col_mask, D, inv_temperature,
            stride_qb, stride_qd, stride_cm, stride_cd,
            BLOCK_B, BLOCK_N, BLOCK_D, INPUT_PRECISION, CAST_FP32,
        )  # fmt: skip
        ds = _soft_target_ce_dlogits(
            s, row0, col0, rows, cols, col_mask, lse2, grad, row_weight, t_ptr,
            stride_tb, stride_ts, B, S, target_offset, BLOCK_B, BLOCK_N,
        )  # fmt: skip
        ds = ds * (inv_q * inv_temperature)[:, None]
        q = tl.load(
            q_ptr + rows.to(tl.int64)[:, None] * stride_qb + out_feats[None, :] * stride_qd,
            mask=row_mask[:, None] & out_mask[None, :],
            other=0.0,
        )
        acc = _soft_target_ce_mma(tl.trans(ds), q, acc, INPUT_PRECISION, CAST_FP32)
    out = dc_ptr + cols.to(tl.int64)[:, None] * stride_dm + out_feats[None, :] * stride_dd
    tl.store(out, acc, mask=col_mask[:, None] & out_mask[None, :])


# ----------------------------------------------------------------------------------- launchers

_KERNELS = {
    "forward": (_soft_target_ce_fwd_kernel, "forward"),
    "dq": (_soft_target_ce_bwd_dq_kernel, "backward"),
    "dc": (_soft_target_ce_bwd_dc_kernel, "backward"),
}
_tuned: dict[str, object] = {}


def _kernel(name: str, block: dict | None) -> tuple[object, dict]:
    """The kernel for ``name`` and its meta-parameters: the caller's block sizes (tests,
    bench), or the autotuned kernel, built on first use (nothing at import time)."""
    kernel, phase = _KERNELS[name]
    if block is not None:
        return kernel, dict(block)
    if name not in _tuned:
        # INPUT_PRECISION is a key because the prune keeps other configs for "ieee" fp32.
        _tuned[name] = triton.autotune(
            configs=soft_target_ce_configs(phase), key=["D", "S", "INPUT_PRECISION"],
            prune_configs_by={"early_config_prune": _prune_configs},
        )(kernel)
    return _tuned[name], {}


def _precision(dtype: torch.dtype) -> dict:
    return dict(INPUT_PRECISION=input_precision(dtype), CAST_FP32=interpreted())


def _split_layout(num_rows: int, num_cols: int, splits: int | None, block: dict | None):
    """(splits, cols_per_split): column ranges aligned to every candidate BLOCK_N."""
    configs = soft_target_ce_configs("forward") + soft_target_ce_configs("backward")
    align = block["BLOCK_N"] if block else max(c.kwargs["BLOCK_N"] for c in configs)
    tiles = triton.cdiv(num_cols, align)
    if splits is None:
        row_blocks = triton.cdiv(num_rows, block["BLOCK_B"] if block else 64)
        splits = min(triton.cdiv(_TARGET_PROGRAMS, row_blocks), tiles // _MIN_TILES_PER_SPLIT)
    splits = max(1, min(splits, tiles))
    cols_per_split = triton.cdiv(tiles, splits) * align
    # Rounding may leave trailing splits empty; drop them so every split owns a column.
    return triton.cdiv(num_cols, cols_per_split), cols_per_split


def inverse_norms(x: Tensor) -> Tensor:
    """``(R,)`` fp32 ``1 / max(||x_r||, 1e-12)`` of an ``(R, D)`` tensor."""
    num_rows, width = x.shape
    out = torch.empty(num_rows, device=x.device, dtype=torch.float32)
    block_r, block_d = 32, min(128, max(16, triton.next_power_of_2(width)))
    _soft_target_ce_inverse_norm_kernel[(triton.cdiv(num_rows, block_r),)](
        x_ptr=x, out_ptr=out, R=num_rows, D=width, stride_xr=x.stride(0), stride_xd=x.stride(1),
        eps=NORM_EPS, BLOCK_R=block_r, BLOCK_D=block_d,
    )
    return out


def soft_target_ce_forward(
    queries: Tensor,
    candidates: Tensor,
    inv_q: Tensor,
    inv_c: Tensor,
    *,
    num_slots: int,
    temperature: float,
    target_offset: int,
    splits: int | None = None,
    block: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-split online-softmax partials and the owned logits.

    Args:
        queries: ``(B, D)`` fp32/fp16/bf16. candidates: ``(M, D)``, same dtype.
        inv_q, inv_c: ``(B,)``, ``(M,)`` fp32 inverse norms (:func:`inverse_norms`).
        splits: column splits (default: a grid of about 1024 programs).
        block: explicit ``BLOCK_B, BLOCK_N, BLOCK_D, BLOCK_DO`` instead of autotuning.

    Returns:
        ``(part_max, part_sum, owned)``: ``(B, SPLITS)`` fp32 base-2 running max and sum of
        ``exp2`` per split, and ``(B, S)`` fp32 owned logits ``s_j,own(j,s)``.
    """
    num_rows, width = queries.shape
    num_cols = candidates.shape[0]
    splits, cols_per_split = _split_layout(num_rows, num_cols, splits, block)
    f32 = dict(device=queries.device, dtype=torch.float32)
    part_max = torch.empty(num_rows, splits, **f32)
    part_sum = torch.empty(num_rows, splits, **f32)
    owned = torch.empty(num_rows, num_slots, **f32)
    kernel, meta = _kernel("forward", block)

    def grid(meta):
        return (triton.cdiv(num_rows, meta["BLOCK_B"]), splits)

    kernel[grid](
        q_ptr=queries, c_ptr=candidates, inv_q_ptr=inv_q, inv_c_ptr=inv_c,
        max_ptr=part_max, sum_ptr=part_sum, owned_ptr=owned,
        B=num_rows, M=num_cols, D=width, S=num_slots, target_offset=target_offset,
        cols_per_split=cols_per_split, inv_temperature=1.0 / temperature,
        stride_qb=queries.stride(0), stride_qd=queries.stride(1),
        stride_cm=candidates.stride(0), stride_cd=candidates.stride(1),
        stride_pb=part_max.stride(0), stride_ps=part_max.stride(1),
        stride_ob=owned.stride(0), stride_os=owned.stride(1),
        **meta, **_precision(queries.dtype),
    )
    return part_max, part_sum, owned


class BackwardInputs(NamedTuple):
    """What both backward kernels read; built once by the caller, passed by name.

    ``lse``, ``grad`` and ``row_weight = grad * sum(targets)`` are ``(B,)`` fp32; the other
    tensors as for :func:`soft_target_ce_forward`.
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


def _backward_args(inputs: BackwardInputs) -> dict:
    """The kernel arguments both backward kernels share, by name."""
    queries, candidates, targets = inputs.queries, inputs.candidates, inputs.targets
    return dict(
        q_ptr=queries, c_ptr=candidates, t_ptr=targets, inv_q_ptr=inputs.inv_q,
        inv_c_ptr=inputs.inv_c, lse_ptr=inputs.lse, grad_ptr=inputs.grad,
        row_weight_ptr=inputs.row_weight,
        B=queries.shape[0], M=candidates.shape[0], D=queries.shape[1], S=targets.shape[1],
        target_offset=inputs.target_offset, inv_temperature=1.0 / inputs.temperature,
        stride_qb=queries.stride(0), stride_qd=queries.stride(1),
        stride_cm=candidates.stride(0), stride_cd=candidates.stride(1),
        stride_tb=targets.stride(0), stride_ts=targets.stride(1),
        **_precision(queries.dtype),
    )


def soft_target_ce_backward_queries(
    inputs: BackwardInputs, *, splits: int | None = None, block: dict | None = None
) -> Tensor:
    """``(SPLITS, B, D)`` fp32 per-split partials of the gradient w.r.t. ``n(q)``."""
    num_rows, width = inputs.queries.shape
    splits, cols_per_split = _split_layout(num_rows, inputs.candidates.shape[0], splits, block)
    partial = torch.empty(splits, num_rows, width, device=inputs.queries.device,
                          dtype=torch.float32)
    kernel, meta = _kernel("dq", block)

    def grid(meta):
        return (triton.cdiv(num_rows, meta["BLOCK_B"]), splits,
                triton.cdiv(width, meta["BLOCK_DO"]))

    kernel[grid](
        **_backward_args(inputs), dq_ptr=partial, cols_per_split=cols_per_split,
        stride_ps=partial.stride(0), stride_pb=partial.stride(1), stride_pd=partial.stride(2),
        **meta,
    )
    return partial


def soft_target_ce_backward_candidates(
    inputs: BackwardInputs, *, block: dict | None = None
) -> Tensor:
    """``(M, D)`` fp32 gradient w.r.t. ``n(C)``."""
    num_cols, width = inputs.candidates.shape
    grad_unit = torch.empty(num_cols, width, device=inputs.queries.device, dtype=torch.float32)
    kernel, meta = _kernel("dc", block)

    def grid(meta):
        return (triton.cdiv(num_cols, meta["BLOCK_N"]), triton.cdiv(width, meta["BLOCK_DO"]))

    kernel[grid](
        **_backward_args(inputs), dc_ptr=grad_unit, stride_dm=grad_unit.stride(0),
        stride_dd=grad_unit.stride(1), **meta,
    )
    return grad_unit
