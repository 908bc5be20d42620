"""Triton path of ``soft_target_contrastive_loss``: custom ops and autograd.

``snclr::soft_target_contrastive_loss`` runs the fused forward (``snclr.kernels.soft_target_ce``)
and returns the per-row losses together with what the backward needs: the (B,) logsumexp, the
(B, S) owned logits and the inverse norms of queries and candidates (O(B + B*S + M) floats,
never the B x M logits). ``snclr::soft_target_contrastive_loss_backward`` recomputes the logits
tile by tile. Both are ``torch.library.custom_op`` with ``register_fake`` (the registration
that also traces under the Triton interpreter: eager, ``torch.compile`` and ``opcheck``).

float64 inputs never get here: ``snclr.ops`` sends them to the float64 reference.
Inputs are validated by ``snclr.ops.contrastive`` before this module is called.
"""

from __future__ import annotations

import torch
from torch import Tensor

from snclr.kernels.soft_target_ce import soft_target_ce_backward, soft_target_ce_forward

__all__ = ["soft_target_contrastive_loss"]


@torch.library.custom_op("snclr::soft_target_contrastive_loss", mutates_args=())
def _loss_op(
    queries: Tensor, candidates: Tensor, targets: Tensor, temperature: float, target_offset: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, lse, owned logits, inverse query norms, inverse candidate norms)."""
    return soft_target_ce_forward(
        queries, candidates, targets, temperature=temperature, target_offset=target_offset
    )


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


@torch.library.custom_op("snclr::soft_target_contrastive_loss_backward", mutates_args=())
def _loss_backward_op(
    grad: Tensor,
    queries: Tensor,
    candidates: Tensor,
    targets: Tensor,
    lse: Tensor,
    owned: Tensor,
    inv_q: Tensor,
    inv_c: Tensor,
    temperature: float,
    target_offset: int,
    need_queries: bool,
    need_candidates: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dC, dt); a gradient that is not needed comes back empty (custom ops return tensors)."""
    grad_q, grad_c, grad_t = soft_target_ce_backward(
        grad, queries, candidates, targets, lse, owned, inv_q, inv_c,
        temperature=temperature, target_offset=target_offset,
        need_queries=need_queries, need_candidates=need_candidates,
    )  # fmt: skip
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


def _setup_context(ctx, inputs, output) -> None:
    queries, candidates, targets, temperature, target_offset = inputs
    _, lse, owned, inv_q, inv_c = output
    ctx.save_for_backward(queries, candidates, targets, lse, owned, inv_q, inv_c)
    ctx.temperature = temperature
    ctx.target_offset = target_offset
    ctx.mark_non_differentiable(lse, owned, inv_q, inv_c)


def _backward(ctx, grad_loss, *unused_grads):
    queries, candidates, targets, lse, owned, inv_q, inv_c = ctx.saved_tensors
    need_q, need_c, need_t = ctx.needs_input_grad[:3]
    grad_q, grad_c, grad_t = _loss_backward_op(
        grad_loss, queries, candidates, targets, lse, owned, inv_q, inv_c,
        ctx.temperature, ctx.target_offset, need_q, need_c,
    )  # fmt: skip
    return (
        grad_q if need_q else None,
        grad_c if need_c else None,
        grad_t if need_t else None,
        None,
        None,
    )


_loss_op.register_autograd(_backward, setup_context=_setup_context)


def soft_target_contrastive_loss(
    queries: Tensor,
    candidates: Tensor,
    targets: Tensor,
    *,
    temperature: float,
    target_offset: int,
) -> Tensor:
    """Fused :func:`snclr.reference.soft_target_contrastive_loss`; inputs already validated.

    Shapes: queries ``(B, D)``, candidates ``(M, D)``, targets ``(B, S)``; returns ``(B,)``
    float32.
    """
    # The kernels read queries and candidates in one dtype (the dot operands must match).
    dtype = torch.promote_types(queries.dtype, candidates.dtype)
    loss, *_ = _loss_op(
        queries.to(dtype), candidates.to(dtype), targets, float(temperature), int(target_offset)
    )
    return loss
