"""``soft_target_contrastive_loss``: checks, the fused custom ops and their autograd.

``snclr::soft_target_contrastive_loss`` runs the fused forward (``snclr.kernels.soft_target_ce``),
combines its per-split partials and returns the per-row losses with what the backward needs:
the (B,) logsumexp, the (B, S) owned logits and the inverse norms of queries and candidates
(O(B + B*S + M) floats, never the B x M logits). ``snclr::soft_target_contrastive_loss_backward``
recomputes the logits tile by tile. float64 inputs take the exact reference instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from snclr import reference
from snclr.kernels.soft_target_ce import (
    inverse_norms,
    soft_target_ce_backward_candidates,
    soft_target_ce_backward_queries,
    soft_target_ce_forward,
)
from snclr.ops._checks import (
    check_features,
    check_positive,
    check_same_device,
    check_same_rows,
    check_same_width,
    resolve_backend,
)
from snclr.ops._grads import normalize_backward

__all__ = ["soft_target_contrastive_loss"]


def _check_soft_target_contrastive_loss(
    queries: Tensor, candidates: Tensor, targets: Tensor, temperature: float, target_offset: int
) -> None:
    check_features("queries", queries)
    check_features("candidates", candidates)
    check_features("targets", targets)
    check_same_width(queries=queries, candidates=candidates)
    check_same_device(queries=queries, candidates=candidates, targets=targets)
    check_same_rows(queries=queries, targets=targets)
    check_positive("temperature", temperature)
    if isinstance(target_offset, bool) or not isinstance(target_offset, int):
        raise TypeError(f"target_offset must be an int, got {type(target_offset).__name__}")
    num_rows, num_slots = targets.shape
    last = target_offset + num_rows * num_slots
    if target_offset < 0 or last > candidates.shape[0]:
        raise ValueError(
            f"target columns [{target_offset}, {last}) of B={num_rows} rows x S={num_slots} "
            f"slots must lie within the M={candidates.shape[0]} candidates"
        )


# ----------------------------------------------------------------------------------- forward


def _forward(
    queries: Tensor, candidates: Tensor, targets: Tensor, temperature: float,
    target_offset: int, *, splits: int | None = None, block: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, lse, owned logits, inverse query norms, inverse candidate norms), fp32.

    ``loss_j = sum(t_j) * lse_j - sum_s t_js * s_j,own(j,s)`` (DESIGN section 2).
    ``splits`` and ``block`` override the launchers' heuristic and autotuning (tests).
    """
    inv_q, inv_c = inverse_norms(queries), inverse_norms(candidates)
    part_max, part_sum, owned = soft_target_ce_forward(
        queries, candidates, inv_q, inv_c, num_slots=targets.shape[1], temperature=temperature,
        target_offset=target_offset, splits=splits, block=block,
    )
    # Split combine in a fixed order (deterministic); the partials are in base 2.
    row_max = part_max.amax(dim=1, keepdim=True)
    total = (part_sum * torch.exp2(part_max - row_max)).sum(dim=1)
    lse = (row_max.squeeze(1) + torch.log2(total)) * math.log(2.0)
    weights = targets.float()
    loss = weights.sum(dim=1) * lse - (weights * owned).sum(dim=1)
    return loss, lse, owned, inv_q, inv_c


@torch.library.custom_op("snclr::soft_target_contrastive_loss", mutates_args=())
def _loss_op(
    queries: Tensor, candidates: Tensor, targets: Tensor, temperature: float, target_offset: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward(queries, candidates, targets, temperature, target_offset)


@_loss_op.register_fake
def _loss_op_fake(queries, candidates, targets, temperature, target_offset):
    f32 = dict(dtype=torch.float32)
    num_rows, num_slots = targets.shape
    return (
        queries.new_empty(num_rows, **f32),
        queries.new_empty(num_rows, **f32),
        queries.new_empty(num_rows, num_slots, **f32),
        queries.new_empty(num_rows, **f32),
        queries.new_empty(candidates.shape[0], **f32),
    )


# ----------------------------------------------------------------------------------- backward


def _backward(
    grad: Tensor, queries: Tensor, candidates: Tensor, targets: Tensor, lse: Tensor,
    owned: Tensor, inv_q: Tensor, inv_c: Tensor, temperature: float, target_offset: int,
    need_queries: bool, need_candidates: bool, *, splits: int | None = None,
    block: dict | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """Gradients of ``sum_j grad_j * loss_j``: ``(dq or None, dC or None, dt)``, input dtypes.

    ``dL/du_js = g_j (lse_j - s_j,own(j,s))``; the logit gradients are recomputed tile by
    tile in the kernels, then chained through the normalisations here.
    """
    grad = grad.float().contiguous()
    weights = targets.float()
    row_weight = (grad * weights.sum(dim=1)).contiguous()
    grad_targets = (grad.unsqueeze(1) * (lse.unsqueeze(1) - owned)).to(targets.dtype)
    saved = (queries, candidates, targets, inv_q, inv_c, lse, grad, row_weight)
    options = dict(temperature=temperature, target_offset=target_offset, block=block)
    grad_queries = grad_candidates = None
    if need_queries:
        partial = soft_target_ce_backward_queries(*saved, splits=splits, **options)
        # Fixed-order sum over splits keeps the gradient deterministic.
        grad_queries = normalize_backward(queries, inv_q, partial.sum(dim=0))
    if need_candidates:
        grad_unit = soft_target_ce_backward_candidates(*saved, **options)
        grad_candidates = normalize_backward(candidates, inv_c, grad_unit)
    return grad_queries, grad_candidates, grad_targets


@torch.library.custom_op("snclr::soft_target_contrastive_loss_backward", mutates_args=())
def _loss_backward_op(
    grad: Tensor, queries: Tensor, candidates: Tensor, targets: Tensor, lse: Tensor,
    owned: Tensor, inv_q: Tensor, inv_c: Tensor, temperature: float, target_offset: int,
    need_queries: bool, need_candidates: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dC, dt); a gradient that is not needed comes back empty (custom ops return tensors)."""
    grad_q, grad_c, grad_t = _backward(
        grad, queries, candidates, targets, lse, owned, inv_q, inv_c, temperature,
        target_offset, need_queries, need_candidates,
    )
    if grad_q is None:
        grad_q = queries.new_empty(0)
    if grad_c is None:
        grad_c = candidates.new_empty(0)
    return grad_q, grad_c, grad_t


@_loss_backward_op.register_fake
def _loss_backward_op_fake(
    grad, queries, candidates, targets, lse, owned, inv_q, inv_c,
    temperature, target_offset, need_queries, need_candidates,
):  # fmt: skip
    return (
        queries.new_empty(queries.shape if need_queries else (0,)),
        candidates.new_empty(candidates.shape if need_candidates else (0,)),
        torch.empty_like(targets),
    )


def _loss_setup_context(ctx, inputs, output) -> None:
    queries, candidates, targets, temperature, target_offset = inputs
    _, lse, owned, inv_q, inv_c = output
    ctx.save_for_backward(queries, candidates, targets, lse, owned, inv_q, inv_c)
    ctx.temperature = temperature
    ctx.target_offset = target_offset
    ctx.mark_non_differentiable(lse, owned, inv_q, inv_c)


def _loss_backward(ctx, grad_loss, *unused_grads):
    need_q, need_c, need_t = ctx.needs_input_grad[:3]
    grad_q, grad_c, grad_t = _loss_backward_op(
        grad_loss, *ctx.saved_tensors, ctx.temperature, ctx.target_offset, need_q, need_c
    )
    return (
        grad_q if need_q else None,
        grad_c if need_c else None,
        grad_t if need_t else None,
        None,
        None,
    )


_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)


# ----------------------------------------------------------------------------------- public


def soft_target_contrastive_loss(
    queries: Tensor,
    candidates: Tensor,
    targets: Tensor,
    *,
    temperature: float,
    target_offset: int = 0,
    backend: str = "auto",
) -> Tensor:
    """Per-row soft-target contrastive cross-entropy over all candidate columns.

    Queries and candidates are L2-normalised inside. Row j owns the S columns
    ``target_offset + j*S + s`` and::

        loss_j = -sum_s targets[j, s] * log_softmax(n(q_j) . n(C)^T / T)[target_offset + j*S + s]

    The targets are not normalised (SNCLR's target mass is ``1 + sum(w)``).

    Args:
        queries: ``(B, D)`` float tensor.
        candidates: ``(M, D)`` float tensor, ``M >= target_offset + B*S``.
        targets: ``(B, S)`` float weights of each row's owned columns.
        temperature: logit temperature T > 0.
        target_offset: index of the first column owned by row 0 (``rank * B * S`` when the
            candidates are gathered from all ranks).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``(B,)`` per-row losses, float32 (float64 for float64 inputs). Differentiable w.r.t.
        ``queries``, ``targets`` and ``candidates``. NaN inputs give NaN rows (not checked:
        that would need a host sync).

    Raises:
        TypeError, ValueError: on a wrong rank, dtype, width, device, empty input,
            temperature or owned columns outside the candidates.

    Example:
        >>> import torch
        >>> from snclr.ops import soft_target_contrastive_loss
        >>> q, c = torch.randn(4, 8), torch.randn(8, 8)
        >>> soft_target_contrastive_loss(q, c, torch.ones(4, 2), temperature=0.2).shape
        torch.Size([4])
    """
    _check_soft_target_contrastive_loss(queries, candidates, targets, temperature, target_offset)
    options = dict(temperature=float(temperature), target_offset=int(target_offset))
    if resolve_backend(backend, queries, candidates, targets) == "torch":
        return reference.soft_target_contrastive_loss(queries, candidates, targets, **options)
    # The kernels read queries and candidates in one dtype (the dot operands must match).
    dtype = torch.promote_types(queries.dtype, candidates.dtype)
    loss, *_ = _loss_op(queries.to(dtype), candidates.to(dtype), targets, **options)
    return loss
