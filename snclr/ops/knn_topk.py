"""``knn_topk``: checks, the custom op with its CPU and CUDA kernels, its sparse autograd.

``snclr::knn_topk`` runs the reference search on the CPU and the split and merge (refine)
kernels of ``snclr.kernels.knn_topk`` on CUDA; its ``backend`` argument overrides the choice
(``snclr.ops._backend``). The backward never goes dense: it gathers the K winning bank rows
(O(B*K*D)) and scatters into the bank gradient only when the bank requires grad. Registered
with ``custom_op`` (a kernel for the CPU and CUDA device types) + ``register_fake`` +
``register_autograd``, so it works eagerly, under ``torch.compile``, ``torch.export`` and
``torch.library.opcheck``, also under the Triton interpreter (DESIGN section 4).
"""

from __future__ import annotations

import torch
from torch import Tensor

from snclr import reference
from snclr.ops._backend import DEVICE_TYPES, check_backend, resolve_backend
from snclr.ops._checks import (
    check_exclude,
    check_features,
    check_k,
    check_same_device,
    check_same_width,
)
from snclr.ops._grads import acc_dtype, scatter_rows, similarity_grads

__all__ = ["knn_topk"]


def _check_knn_topk(
    query: Tensor, bank: Tensor, k: int, exclude: Tensor | None, backend: str
) -> None:
    check_features("query", query)
    check_features("bank", bank)
    check_same_width(query=query, bank=bank)
    device = check_same_device(query=query, bank=bank)
    check_k(k, bank.shape[0])
    check_exclude(exclude, query.shape[0], device)
    check_backend(backend, device)


def _knn_topk_triton(
    query: Tensor, bank: Tensor, k: int, exclude: Tensor | None
) -> tuple[Tensor, Tensor]:
    from snclr.kernels.knn_topk import knn_topk_search  # triton only on this path

    out_dtype = torch.promote_types(query.dtype, bank.dtype)
    indices, values, _ = knn_topk_search(query, bank, k, values_dtype=out_dtype,
                                         exclude=exclude)
    return values, indices


def _knn_topk_reference(
    query: Tensor, bank: Tensor, k: int, exclude: Tensor | None
) -> tuple[Tensor, Tensor]:
    return reference.knn_topk(query, bank, k, exclude=exclude)


_IMPLEMENTATIONS = {"torch": _knn_topk_reference, "triton": _knn_topk_triton}


@torch.library.custom_op("snclr::knn_topk", mutates_args=(), device_types=DEVICE_TYPES)
def _knn_topk_op(
    query: Tensor, bank: Tensor, k: int, exclude: Tensor | None = None, *, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """The CPU and CUDA kernels: the reference on CPU, Triton on CUDA, unless ``backend``."""
    return _IMPLEMENTATIONS[resolve_backend(backend, query, bank)](query, bank, k, exclude)


@_knn_topk_op.register_fake
def _knn_topk_fake(query, bank, k, exclude=None, **_options):
    out_dtype = torch.promote_types(query.dtype, bank.dtype)
    num_queries = query.shape[0]
    return (
        query.new_empty((num_queries, k), dtype=out_dtype),
        query.new_empty((num_queries, k), dtype=torch.int64),
    )


def _knn_topk_setup_context(ctx, inputs, keyword_only_inputs, output) -> None:
    query, bank, _, _ = inputs
    values, indices = output
    ctx.save_for_backward(query, bank, values, indices)


def _knn_topk_backward(ctx, grad_values: Tensor, _grad_indices: Tensor | None):
    query, bank, values, indices = ctx.saved_tensors
    rows = bank[indices].to(acc_dtype(query, bank))  # (B, K, D), transient
    grad_query, grad_rows = similarity_grads(grad_values, values, query, rows)
    grad_bank = scatter_rows(bank, indices, grad_rows) if ctx.needs_input_grad[1] else None
    return grad_query.to(query.dtype), grad_bank, None, None


_knn_topk_op.register_autograd(_knn_topk_backward, setup_context=_knn_topk_setup_context)


def knn_topk(
    query: Tensor,
    bank: Tensor,
    k: int,
    *,
    exclude: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Inner-product top-k of each query row against the bank rows.

    ``indices[b]`` are the k bank rows with the largest ``<query_b, bank_n>``, most similar
    first; ties go to the smaller index. NaN scores never win, and neither do the rows in
    ``exclude``; if fewer than k rows are eligible the remaining slots hold ``-inf``.

    Args:
        query: ``(B, D)`` float tensor.
        bank: ``(N, D)`` float tensor on the same device.
        k: neighbours per query, ``1 <= k <= N``.
        exclude: optional ``(B, E)`` int64 rows to skip per query. Entries outside
            ``[0, N)`` are ignored (``-1`` is the usual padding): no range check, which
            would need a host sync.
        backend: ``"auto"`` (Triton on CUDA, the reference elsewhere), ``"torch"`` or
            ``"triton"``.

    Returns:
        ``(values, indices)``: ``(B, K)`` scores in the inputs' promoted dtype, and
        ``(B, K)`` int64 indices. ``values`` is differentiable w.r.t. ``query`` and ``bank``
        through the K selected rows only.

    Raises:
        TypeError, ValueError: on a wrong rank, dtype, width, device, empty input, k or
            backend.
        ImportError: ``backend="triton"`` where triton is not installed.

    Example:
        >>> import torch
        >>> from snclr.ops import knn_topk
        >>> bank = torch.eye(4)
        >>> values, indices = knn_topk(torch.tensor([[0.1, 0.9, 0.0, 0.5]]), bank, 2)
        >>> indices.tolist()
        [[1, 3]]
    """
    _check_knn_topk(query, bank, k, exclude, backend)
    return _knn_topk_op(query, bank, k, exclude, backend=backend)
