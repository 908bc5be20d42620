"""``soft_target_contrastive_loss``: checks, the custom ops with their CPU and CUDA kernels.

``snclr::soft_target_contrastive_loss`` returns the per-row losses with what the backward
needs: the (B,) logsumexp, the (B, S) owned logits and the inverse norms of queries and
candidates (O(B + B*S + M) floats, never the B x M logits). On the CPU it runs the
row-chunked reference; on CUDA the fused forward (``snclr.kernels.soft_target_ce``) and a
fixed-order combine of its per-split partials. ``snclr::soft_target_contrastive_loss_backward``
recomputes the logits chunk by chunk (CPU) or tile by tile (CUDA). The forward's keyword
options (``temperature``, ``target_offset``, ``backend``) are the one definition: autograd
saves them as the schema gives them and forwards them by name to the backward op. float64
inputs take the exact torch path on either device (``snclr.ops._backend``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from snclr import reference
from snclr.kernels._common import NORM_EPS
from snclr.ops._backend import DEVICE_TYPES, check_backend, resolve_backend
from snclr.ops._checks import (
    check_features,
    check_positive,
    check_same_device,
    check_same_rows,
    check_same_width,
)
from snclr.ops._grads import acc_dtype, normalize_backward

__all__ = ["soft_target_contrastive_loss"]


def _check_soft_target_contrastive_loss(
    queries: Tensor, candidates: Tensor, targets: Tensor, *, temperature: float,
    target_offset: int, backend: str,
) -> None:
    check_features("queries", queries)
    check_features("candidates", candidates)
    check_features("targets", targets)
    check_same_width(queries=queries, candidates=candidates)
    device = check_same_device(queries=queries, candidates=candidates, targets=targets)
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
    check_backend(backend, device)


def _inverse_norms(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``(R,)`` ``1 / max(||x_r||, eps)`` in ``dtype``, as :func:`F.normalize` divides."""
    return 1.0 / x.to(dtype).norm(dim=1).clamp_min(NORM_EPS)


def _owned_columns(num_rows: int, num_slots: int, target_offset: int, device) -> Tensor:
    """``(B, S)`` int64 ``own(j, s) = target_offset + j*S + s``."""
    rows = torch.arange(num_rows, device=device).unsqueeze(1) * num_slots
    return target_offset + rows + torch.arange(num_slots, device=device)


# ----------------------------------------------------------------------------------- forward


def _forward_reference(
    queries: Tensor, candidates: Tensor, targets: Tensor, *, temperature: float,
    target_offset: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, lse, owned logits, inverse query norms, inverse candidate norms), exact."""
    lse, owned = reference.soft_target_logits(
        queries, candidates, targets, temperature=temperature, target_offset=target_offset
    )
    loss = reference.soft_target_loss_of(targets, lse, owned)
    inv_q, inv_c = _inverse_norms(queries, lse.dtype), _inverse_norms(candidates, lse.dtype)
    return loss, lse, owned, inv_q, inv_c


def _forward(
    queries: Tensor, candidates: Tensor, targets: Tensor, *, temperature: float,
    target_offset: int, splits: int | None = None, block: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The Triton forward: as :func:`_forward_reference`, fp32.

    ``splits`` and ``block`` override the launchers' heuristic and autotuning (tests).
    """
    from snclr.kernels.soft_target_ce import inverse_norms, soft_target_ce_forward

    inv_q, inv_c = inverse_norms(queries, candidates)
    loss, lse, owned = soft_target_ce_forward(
        queries, candidates, targets, inv_q, inv_c, temperature=temperature,
        target_offset=target_offset, splits=splits, block=block,
    )
    return loss, lse, owned, inv_q, inv_c


_FORWARDS = {"torch": _forward_reference, "triton": _forward}


@torch.library.custom_op(
    "snclr::soft_target_contrastive_loss", mutates_args=(), device_types=DEVICE_TYPES
)
def _loss_op(
    queries: Tensor, candidates: Tensor, targets: Tensor, *, temperature: float,
    target_offset: int = 0, backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The CPU and CUDA kernels: the reference on CPU, Triton on CUDA, unless ``backend``."""
    run = _FORWARDS[resolve_backend(backend, queries, candidates, targets)]
    return run(queries, candidates, targets, temperature=temperature,
               target_offset=target_offset)


@_loss_op.register_fake
def _loss_op_fake(queries, candidates, targets, **_options):
    acc = dict(dtype=acc_dtype(queries, candidates, targets))
    num_rows, num_slots = targets.shape
    return (
        queries.new_empty(num_rows, **acc),
        queries.new_empty(num_rows, **acc),
        queries.new_empty(num_rows, num_slots, **acc),
        queries.new_empty(num_rows, **acc),
        queries.new_empty(candidates.shape[0], **acc),
    )


# ----------------------------------------------------------------------------------- backward


def _backward_reference(
    grad: Tensor, queries: Tensor, candidates: Tensor, targets: Tensor, lse: Tensor,
    owned: Tensor, inv_q: Tensor, inv_c: Tensor, *, temperature: float, target_offset: int,
    need_queries: bool, need_candidates: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """Gradients of ``sum_j grad_j * loss_j`` in torch, row-chunked as the reference.

    ``ds_jc = g_j (sum(t_j) p_jc - target_jc) / T`` on ``reference.CHUNK_ROWS`` rows at a
    time, then the normalisation chain rule (DESIGN section 2).
    """
    acc = lse.dtype
    g, weights = grad.to(acc), targets.to(acc)
    grad_targets = (g.unsqueeze(1) * (lse.unsqueeze(1) - owned)).to(targets.dtype)
    q = queries.to(acc) * inv_q.unsqueeze(1)
    c = candidates.to(acc) * inv_c.unsqueeze(1)
    own = _owned_columns(*targets.shape, target_offset, q.device)
    grad_q_unit = torch.zeros_like(q) if need_queries else None
    grad_c_unit = torch.zeros_like(c) if need_candidates else None
    row_weight = g * weights.sum(dim=1)  # (B,)
    for start in range(0, q.shape[0], reference.CHUNK_ROWS):
        rows = slice(start, start + reference.CHUNK_ROWS)
        logits = q[rows] @ c.t() / temperature  # (chunk, M)
        ds = row_weight[rows].unsqueeze(1) * torch.exp(logits - lse[rows].unsqueeze(1))
        ds = ds.scatter_add(1, own[rows], -g[rows].unsqueeze(1) * weights[rows]) / temperature
        if need_queries:
            grad_q_unit[rows] = ds @ c
        if need_candidates:
            grad_c_unit += ds.t() @ q[rows]
    grad_queries = normalize_backward(queries, inv_q, grad_q_unit) if need_queries else None
    grad_candidates = (normalize_backward(candidates, inv_c, grad_c_unit)
                       if need_candidates else None)
    return grad_queries, grad_candidates, grad_targets


def _backward(
    grad: Tensor, queries: Tensor, candidates: Tensor, targets: Tensor, lse: Tensor,
    owned: Tensor, inv_q: Tensor, inv_c: Tensor, *, temperature: float, target_offset: int,
    need_queries: bool, need_candidates: bool, splits: int | None = None,
    block: dict | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """The Triton backward: ``(dq or None, dC or None, dt)`` in the inputs' dtypes.

    ``dL/du_js = g_j (lse_j - s_j,own(j,s))``; the logit gradients are recomputed tile by
    tile in the kernels and chained through the query normalisation there; the candidates'
    (off SNCLR's path) here.
    """
    from snclr.kernels.soft_target_ce import (
        BackwardInputs,
        soft_target_ce_backward_candidates,
        soft_target_ce_backward_prep,
        soft_target_ce_backward_queries,
    )

    row_weight, grad_targets = soft_target_ce_backward_prep(grad, targets, lse, owned)
    inputs = BackwardInputs(
        queries=queries, candidates=candidates, targets=targets, inv_q=inv_q, inv_c=inv_c,
        lse=lse, grad=grad, row_weight=row_weight, temperature=temperature,
        target_offset=target_offset,
    )
    grad_queries = grad_candidates = None
    if need_queries:
        grad_queries = soft_target_ce_backward_queries(inputs, splits=splits, block=block)
    if need_candidates:
        grad_unit = soft_target_ce_backward_candidates(inputs, block=block)
        grad_candidates = normalize_backward(candidates, inv_c, grad_unit)
    return grad_queries, grad_candidates, grad_targets


_BACKWARDS = {"torch": _backward_reference, "triton": _backward}


def _tensors_or_empty(queries: Tensor, candidates: Tensor, grads: tuple) -> tuple:
    """A gradient that is not needed comes back empty (custom ops return tensors)."""
    grad_q, grad_c, grad_t = grads
    return (queries.new_empty(0) if grad_q is None else grad_q,
            candidates.new_empty(0) if grad_c is None else grad_c, grad_t)


@torch.library.custom_op(
    "snclr::soft_target_contrastive_loss_backward", mutates_args=(), device_types=DEVICE_TYPES
)
def _loss_backward_op(
    grad: Tensor, queries: Tensor, candidates: Tensor, targets: Tensor, lse: Tensor,
    owned: Tensor, inv_q: Tensor, inv_c: Tensor, *, temperature: float, target_offset: int,
    backend: str, need_queries: bool, need_candidates: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dC, dt)`` on CPU and CUDA, by the implementation the forward ran."""
    run = _BACKWARDS[resolve_backend(backend, queries, candidates, targets)]
    grads = run(grad, queries, candidates, targets, lse, owned, inv_q, inv_c,
                temperature=temperature, target_offset=target_offset,
                need_queries=need_queries, need_candidates=need_candidates)
    return _tensors_or_empty(queries, candidates, grads)


@_loss_backward_op.register_fake
def _loss_backward_op_fake(grad, queries, candidates, targets, *_stats, need_queries,
                           need_candidates, **_options):
    return (
        queries.new_empty(queries.shape if need_queries else (0,)),
        candidates.new_empty(candidates.shape if need_candidates else (0,)),
        torch.empty_like(targets),
    )


def _loss_setup_context(ctx, inputs, keyword_only_inputs, output) -> None:
    queries, candidates, targets = inputs
    _, lse, owned, inv_q, inv_c = output
    ctx.save_for_backward(queries, candidates, targets, lse, owned, inv_q, inv_c)
    ctx.options = keyword_only_inputs  # temperature, target_offset, backend
    ctx.mark_non_differentiable(lse, owned, inv_q, inv_c)


def _loss_backward(ctx, grad_loss, *unused_grads):
    need_q, need_c, need_t = ctx.needs_input_grad[:3]
    queries, candidates, targets, *stats = ctx.saved_tensors
    grad_q, grad_c, grad_t = _loss_backward_op(
        grad_loss, queries, candidates, targets, *stats, need_queries=need_q,
        need_candidates=need_c, **ctx.options,
    )
    return grad_q if need_q else None, grad_c if need_c else None, grad_t if need_t else None


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
            temperature, backend or owned columns outside the candidates.
        ImportError: ``backend="triton"`` where triton is not installed.

    Example:
        >>> import torch
        >>> from snclr.ops import soft_target_contrastive_loss
        >>> q, c = torch.randn(4, 8), torch.randn(8, 8)
        >>> soft_target_contrastive_loss(q, c, torch.ones(4, 2), temperature=0.2).shape
        torch.Size([4])
    """
    _check_soft_target_contrastive_loss(queries, candidates, targets, temperature=temperature,
                                        target_offset=target_offset, backend=backend)
    # The kernels read queries and candidates in one dtype (the dot operands must match).
    dtype = torch.promote_types(queries.dtype, candidates.dtype)
    loss, *_ = _loss_op(queries.to(dtype), candidates.to(dtype), targets,
                        temperature=float(temperature), target_offset=target_offset,
                        backend=backend)
    return loss
