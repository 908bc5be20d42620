"""Fused soft-target contrastive loss (``snclr.kernels.soft_target_ce`` through the op's
forward and backward in ``snclr.ops.soft_target_contrastive_loss``) against the reference.

On CPU the kernels run under the Triton interpreter (set in conftest.py); sizes stay small.
"""

import pytest
import torch
from conftest import TOLERANCES, requires_cuda
from sm90 import compile_for_sm90
from torch.utils._python_dispatch import TorchDispatchMode

import snclr.ops  # noqa: F401  (registers the snclr:: custom ops)
from snclr import reference
from snclr.kernels import soft_target_ce
from snclr.kernels._common import interpreted
from snclr.ops import soft_target_contrastive_loss
from snclr.ops.soft_target_contrastive_loss import _backward as fused_backward
from snclr.ops.soft_target_contrastive_loss import _forward as fused_forward

# (B, M, D, S, target_offset): B*S + target_offset <= M; no M is a multiple of the tiles.
SHAPES = [
    (1, 70, 16, 1, 0),  # a single row, plain InfoNCE
    (7, 203, 64, 4, 13),  # K = 3 soft neighbours, offset inside the candidates
    (33, 150, 96, 4, 5),  # D not a power of two, several row blocks
    (7, 301, 64, 17, 100),  # K = 16
    (33, 598, 16, 1, 17),  # InfoNCE with an offset, many column tiles
]
TEMPERATURES = [0.05, 0.2, 1.0]


def _ids(shape):
    return "B{}-M{}-D{}-S{}-off{}".format(*shape)


def _inputs(shape, *, dtype=torch.float32, device="cpu"):
    num_rows, num_cols, width, num_slots, _ = shape
    queries = torch.randn(num_rows, width, device=device, dtype=dtype)
    candidates = torch.randn(num_cols, width, device=device, dtype=dtype)
    # Soft targets like SNCLR's: 1 for the key column, attention weights in (0, 1) after.
    targets = torch.rand(num_rows, num_slots, device=device, dtype=dtype) * 0.9 + 0.05
    targets[:, 0] = 1.0
    return queries, candidates, targets


def _loss_and_grads(backend, queries, candidates, targets, grad, *, candidate_grad, **options):
    q = queries.detach().clone().requires_grad_()
    c = candidates.detach().clone().requires_grad_(candidate_grad)
    t = targets.detach().clone().requires_grad_()
    loss = soft_target_contrastive_loss(q, c, t, backend=backend, **options)
    loss.backward(grad)
    return loss.detach(), q.grad, c.grad, t.grad


def _assert_matches(queries, candidates, targets, *, candidate_grad=True, tol=None, **options):
    atol, rtol = tol or TOLERANCES[torch.float32]
    grad = torch.rand(queries.shape[0], device=queries.device) + 0.5
    args = (queries, candidates, targets, grad)
    got = _loss_and_grads("triton", *args, candidate_grad=candidate_grad, **options)
    want = _loss_and_grads("torch", *args, candidate_grad=candidate_grad, **options)
    for name, g, w in zip(("loss", "dq", "dC", "dt"), got, want):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_matches_reference(shape, temperature):
    queries, candidates, targets = _inputs(shape)
    _assert_matches(
        queries, candidates, targets, temperature=temperature, target_offset=shape[4]
    )


@pytest.mark.parametrize("shape", SHAPES[1:3], ids=_ids)
def test_without_candidate_gradient(shape):
    queries, candidates, targets = _inputs(shape)
    _assert_matches(
        queries, candidates, targets, candidate_grad=False, temperature=0.2, target_offset=shape[4]
    )


def test_candidate_gradient_only():
    """Queries that need no gradient skip the dq pass; dC and dt must still be right."""
    shape = (7, 203, 64, 4, 13)
    queries, candidates, targets = _inputs(shape)
    grads = []
    for backend in ("triton", "torch"):
        c = candidates.clone().requires_grad_()
        t = targets.clone().requires_grad_()
        loss = soft_target_contrastive_loss(
            queries, c, t, temperature=0.2, target_offset=13, backend=backend
        )
        grads.append(torch.autograd.grad(loss.sum(), (c, t)))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_launchers_any_split_and_block(splits):
    """Split counts and block sizes change the reduction order only, not the result."""
    shape = (33, 459, 64, 4, 21)
    queries, candidates, targets = _inputs(shape)
    grad = torch.rand(shape[0]) + 0.5
    block = dict(BLOCK_B=16, BLOCK_N=32, BLOCK_D=16, BLOCK_DO=32) if splits % 2 else None
    options = dict(splits=splits, block=block)
    formula = dict(temperature=0.1, target_offset=shape[4])
    loss, *saved = fused_forward(queries, candidates, targets, **formula, **options)
    grads = fused_backward(grad, queries, candidates, targets, *saved, **formula,
                           need_queries=True, need_candidates=True, **options)
    q, c, t = (x.clone().requires_grad_() for x in (queries, candidates, targets))
    want = reference.soft_target_contrastive_loss(q, c, t, temperature=0.1, target_offset=shape[4])
    want.backward(grad)
    torch.testing.assert_close(loss, want.detach(), atol=1e-4, rtol=1e-4)
    for got, ref in zip(grads, (q.grad, c.grad, t.grad)):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


# The finish kernels (split combine + owned logits + loss; backward prep; dq partial sum +
# target term + normalisation chain rule) at odd sizes, with owned columns at an offset.
FINISH_SIZES = [(num_rows, num_slots, width) for num_rows in (1, 7, 33)
                for num_slots in (1, 4, 17) for width in (16, 96)]  # fmt: skip


def _finish_inputs(num_rows, num_slots, width, *, offset=5):
    return _inputs((num_rows, offset + num_rows * num_slots + 9, width, num_slots, offset))


@pytest.mark.parametrize("num_rows, num_slots, width", FINISH_SIZES)
def test_forward_finish_matches_reference(num_rows, num_slots, width):
    queries, candidates, targets = _finish_inputs(num_rows, num_slots, width)
    inv_q, inv_c = soft_target_ce.inverse_norms(queries, candidates)
    torch.testing.assert_close(inv_q, 1.0 / queries.norm(dim=1), atol=0, rtol=1e-5)
    torch.testing.assert_close(inv_c, 1.0 / candidates.norm(dim=1), atol=0, rtol=1e-5)
    loss, lse, owned = soft_target_ce.soft_target_ce_forward(
        queries, candidates, targets, inv_q, inv_c, temperature=0.1, target_offset=5, splits=2
    )
    want_lse, want_owned = reference.soft_target_logits(
        queries, candidates, targets, temperature=0.1, target_offset=5
    )
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(owned, want_owned, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(
        loss, reference.soft_target_loss_of(targets, want_lse, want_owned), atol=1e-4, rtol=1e-5
    )


@pytest.mark.parametrize("num_rows, num_slots, width", FINISH_SIZES)
def test_query_gradient_finish_matches_reference(num_rows, num_slots, width):
    queries, candidates, targets = _finish_inputs(num_rows, num_slots, width)
    grad = torch.rand(num_rows) + 0.5
    loss, *saved = fused_forward(queries, candidates, targets, temperature=0.1, target_offset=5,
                                 splits=3)
    grad_q, _, grad_t = fused_backward(
        grad, queries, candidates, targets, *saved, temperature=0.1, target_offset=5,
        need_queries=True, need_candidates=False, splits=3,
    )  # fmt: skip
    q, t = queries.clone().requires_grad_(), targets.clone().requires_grad_()
    want = reference.soft_target_contrastive_loss(q, candidates, t, temperature=0.1,
                                                  target_offset=5)
    want.backward(grad)
    torch.testing.assert_close(loss, want.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_q, q.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_t, t.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backward_prep_dtypes_and_strides(target_dtype, grad_dtype):
    """``g * sum(t)`` in fp32 and ``g * (lse - owned)`` rounded once to the targets' dtype,
    from a stride-0 gradient (what ``loss.sum().backward()`` passes) and strided targets."""
    num_rows, num_slots = 33, 17
    targets = torch.rand(num_slots, num_rows).to(target_dtype).t()
    lse, owned = torch.randn(num_rows) * 3, torch.randn(num_rows, num_slots) * 3
    for grad in (torch.tensor(0.7).to(grad_dtype).expand(num_rows),
                 torch.rand(2 * num_rows).to(grad_dtype)[::2]):
        row_weight, grad_targets = soft_target_ce.soft_target_ce_backward_prep(
            grad, targets, lse, owned
        )
        g = grad.float()
        assert row_weight.dtype == torch.float32 and grad_targets.dtype == target_dtype
        torch.testing.assert_close(row_weight, g * targets.float().sum(dim=1), atol=1e-6,
                                   rtol=1e-6)
        want = (g.unsqueeze(1) * (lse.unsqueeze(1) - owned)).to(target_dtype)
        # The interpreter truncates fp32 to bf16 (the GPU rounds to nearest): one ulp there.
        rtol = 2**-7 if target_dtype == torch.bfloat16 and interpreted() else 0.0
        torch.testing.assert_close(grad_targets, want, atol=0, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_finish_kernels_keep_half_dtypes(dtype):
    """16-bit queries and candidates with targets of another dtype: dq in the queries' dtype,
    dt in the targets', as the reference."""
    queries, candidates, targets = _finish_inputs(7, 4, 96)
    queries, candidates = queries.to(dtype), candidates.to(dtype)
    targets = targets.to(torch.bfloat16 if dtype == torch.float16 else torch.float16)
    _assert_matches(queries, candidates, targets, tol=TOLERANCES[dtype], temperature=0.2,
                    target_offset=5)


def test_query_gradient_where_the_norm_is_clamped():
    """Rows with ||q|| below 1e-12 (and zero) take ``h / eps``, as normalize_backward."""
    queries, candidates, targets = _finish_inputs(7, 4, 16)
    queries[2] *= 1e-14
    queries[4] = 0.0
    q = queries.clone().requires_grad_()
    grad = torch.rand(7) + 0.5
    soft_target_contrastive_loss(q, candidates, targets, temperature=0.2, target_offset=5,
                                 backend="triton").backward(grad)
    want = queries.clone().requires_grad_()
    reference.soft_target_contrastive_loss(want, candidates, targets, temperature=0.2,
                                           target_offset=5).backward(grad)
    assert q.grad[2].abs().max() > 1e9  # the clamped branch: scaled by 1 / eps
    torch.testing.assert_close(q.grad, want.grad, atol=1e-4, rtol=1e-4)


def test_fused_loss_is_deterministic():
    """Fixed-order split sums: two runs agree bit for bit."""
    queries, candidates, targets = _finish_inputs(33, 4, 96)
    grad = torch.rand(33) + 0.5
    runs = []
    for _ in range(2):
        loss, *saved = fused_forward(queries, candidates, targets, temperature=0.2,
                                     target_offset=5, splits=3)
        grads = fused_backward(grad, queries, candidates, targets, *saved, temperature=0.2,
                               target_offset=5, need_queries=True, need_candidates=False,
                               splits=3)
        runs.append((loss, *saved, grads[0], grads[2]))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


class _ComputeOps(TorchDispatchMode):
    """The torch ops that compute (allocations, and the interpreter's copies, left out)."""

    QUIET = {"empty", "empty_like", "empty_strided", "new_empty", "set_", "copy_"}

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.QUIET:
            self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_forward_and_query_backward_are_kernels_only():
    """The split combine, owned logits, loss, row weights, target gradient, partial sum,
    target term and chain rule all run in the finish kernels: no torch op in between."""
    queries, candidates, targets = _finish_inputs(7, 4, 16)
    grad = torch.ones(7)
    with _ComputeOps() as forward_ops:
        loss, *saved = fused_forward(queries, candidates, targets, temperature=0.2,
                                     target_offset=5)
    with _ComputeOps() as backward_ops:
        fused_backward(grad, queries, candidates, targets, *saved, temperature=0.2,
                       target_offset=5, need_queries=True, need_candidates=False)
    assert forward_ops.names == [] and backward_ops.names == []


def test_inverse_norms():
    x = torch.randn(45, 96) * torch.logspace(-3, 3, 45).unsqueeze(1)
    torch.testing.assert_close(
        soft_target_ce.inverse_norms(x), 1.0 / x.norm(dim=1), atol=0, rtol=1e-5
    )


def test_large_logits_do_not_overflow():
    """Queries equal to their key columns at T = 0.05: logits of 20 next to the others."""
    num_rows, width = 7, 64
    candidates = torch.randn(150, width) * 100.0
    queries = candidates[:num_rows].clone() * 3.0
    targets = torch.ones(num_rows, 1)
    loss = soft_target_contrastive_loss(
        queries, candidates, targets, temperature=0.05, backend="triton"
    )
    assert torch.isfinite(loss).all()
    _assert_matches(queries, candidates, targets, temperature=0.05, target_offset=0)


def test_row_without_target_mass():
    shape = (7, 203, 64, 4, 13)
    queries, candidates, targets = _inputs(shape)
    targets[3] = 0.0
    _assert_matches(queries, candidates, targets, temperature=0.2, target_offset=shape[4])
    q = queries.clone().requires_grad_()
    loss = soft_target_contrastive_loss(
        q, candidates, targets, temperature=0.2, target_offset=13, backend="triton"
    )
    loss.sum().backward()
    assert loss[3].item() == 0.0
    assert torch.count_nonzero(q.grad[3]) == 0


def test_non_contiguous_inputs():
    shape = (7, 203, 64, 4, 13)
    queries, candidates, targets = _inputs(shape)
    candidates = candidates.t().contiguous().t()  # column-major (M, D)
    queries = torch.randn(shape[2], 2 * shape[0])[:, ::2].t()  # strided rows and features
    _assert_matches(queries, candidates, targets, temperature=0.2, target_offset=shape[4])


def test_float64_takes_exact_reference():
    queries, candidates, targets = _inputs((7, 70, 16, 4, 3), dtype=torch.float64)
    got = soft_target_contrastive_loss(
        queries, candidates, targets, temperature=0.2, target_offset=3, backend="triton"
    )
    want = reference.soft_target_contrastive_loss(
        queries, candidates, targets, temperature=0.2, target_offset=3
    )
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]], ids=_ids)
def test_opcheck(shape):
    queries, candidates, targets = _inputs(shape)
    args = (queries, candidates, targets)
    options = dict(temperature=0.2, target_offset=shape[4], backend="triton")
    torch.library.opcheck(torch.ops.snclr.soft_target_contrastive_loss.default, args, options)
    grad_args = tuple(x.requires_grad_() for x in args)
    torch.library.opcheck(torch.ops.snclr.soft_target_contrastive_loss.default, grad_args,
                          options)


def test_torch_compile_forward_backward():
    shape = (7, 203, 64, 4, 13)
    queries, candidates, targets = _inputs(shape)

    def total(q, c, t):
        loss = soft_target_contrastive_loss(
            q, c, t, temperature=0.2, target_offset=13, backend="triton"
        )
        return (loss * torch.linspace(0.5, 1.5, loss.shape[0])).sum()

    compiled = torch.compile(total, backend="inductor", fullgraph=True)
    results = []
    for fn in (total, compiled):
        leaves = [x.clone().requires_grad_() for x in (queries, candidates, targets)]
        value = fn(*leaves)
        value.backward()
        results.append((value.detach(), *(x.grad for x in leaves)))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- GPU only

HALF_TOLERANCES = [
    (torch.float16, *TOLERANCES[torch.float16]),
    (torch.bfloat16, *TOLERANCES[torch.bfloat16]),
]


@requires_cuda
@pytest.mark.parametrize("dtype, atol, rtol", HALF_TOLERANCES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(256, 70000, 256, 17, 4096), (33, 5000, 96, 4, 7)], ids=_ids)
def test_half_precision_on_gpu(shape, dtype, atol, rtol):
    queries, candidates, targets = _inputs(shape, dtype=dtype, device="cuda")
    _assert_matches(
        queries, candidates, targets, tol=(atol, rtol), temperature=0.2, target_offset=shape[4]
    )


@requires_cuda
def test_large_queue_on_gpu():
    shape = (64, 1 << 20, 128, 31, 12345)
    queries, candidates, targets = _inputs(shape, device="cuda")
    _assert_matches(
        queries, candidates, targets, tol=(1e-3, 1e-3), temperature=0.05, target_offset=shape[4]
    )


@requires_cuda
@pytest.mark.parametrize("width", [16, 96, 256, 1024])
def test_every_config_compiles_on_gpu(width):
    shape = (70, 3000, width, 4, 9)
    queries, candidates, targets = _inputs(shape, device="cuda")
    grad = torch.rand(shape[0], device="cuda")
    q, c, t = (x.clone().requires_grad_() for x in (queries, candidates, targets))
    want = reference.soft_target_contrastive_loss(q, c, t, temperature=0.2, target_offset=9)
    want.backward(grad)
    configs = {
        tuple(sorted(cfg.kwargs.items())): cfg
        for phase in ("forward", "dq", "dc")
        for cfg in soft_target_ce.soft_target_ce_configs(phase)
    }
    for cfg in configs.values():
        loss, *saved = fused_forward(queries, candidates, targets, 0.2, 9, block=cfg.kwargs)
        grads = fused_backward(
            grad, queries, candidates, targets, *saved, 0.2, 9, True, True, block=cfg.kwargs
        )
        torch.testing.assert_close(loss, want.detach(), atol=2e-3, rtol=2e-3)
        for got, ref in zip(grads, (q.grad, c.grad, t.grad)):
            torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)


# Main variants of every kernel compile for an H200 (see tests/sm90.py).
_SM90_BODY = r'''
from snclr.kernels import soft_target_ce as st

build(st._soft_target_ce_inverse_norm_kernel, dict(x_ptr="*bf16", y_ptr="*bf16", eps="fp32"),
      dict(BLOCK_R=32, BLOCK_D=128))
# The finish kernels at the launchers' blocks: 16-bit and fp32 rows, targets of another dtype,
# D = 256 (the study shape) and 1024 (few rows per program).
for dtype, target_dtype, width in [("bf16", "fp16", 256), ("fp32", "bf16", 1024)]:
    rows = dict(q_ptr="*" + dtype, c_ptr="*" + dtype, t_ptr="*" + target_dtype,
                inv_temperature="fp32")
    finish = [
        build(st._soft_target_ce_fwd_finish_kernel, rows,
              st._finish_blocks(width, whole_rows=False)),
        build(st._soft_target_ce_dq_finish_kernel, dict(rows, dq_ptr="*" + dtype, inv_eps="fp32"),
              st._finish_blocks(width, whole_rows=True)),
        build(st._soft_target_ce_bwd_prep_kernel,
              dict(grad_ptr="*" + dtype, t_ptr="*" + target_dtype, dt_ptr="*" + target_dtype),
              dict(BLOCK_B=32, BLOCK_S=32)),
    ]
    # Their blocks are sized to stay in registers (dq finish: whole rows, 4096 fp32 at most).
    assert [local_memory_ops(kernel) for kernel in finish] == [0, 0, 0], (dtype, width)
# 16-bit D = 256: the resident query block (dq reuses its tiles at BLOCK_DO = D); D = 1024
# and "ieee" fp32: the chunked logits.
variants = [("bf16", "tf32", 256, 256, 256, 8), ("bf16", "tf32", 1024, 64, 64, 4),
            ("fp32", "ieee", 256, 64, 64, 4)]
for fn in (st._soft_target_ce_fwd_kernel, st._soft_target_ce_bwd_dq_kernel,
           st._soft_target_ce_bwd_dc_kernel):
    for dtype, precision, width, block_d, block_do, warps in variants:
        kernel = build(fn, dict(q_ptr="*" + dtype, c_ptr="*" + dtype, inv_temperature="fp32"),
                       dict(BLOCK_B=64, BLOCK_N=64, BLOCK_D=block_d, BLOCK_DO=block_do, D=width,
                            INPUT_PRECISION=precision, CAST_FP32=False), num_warps=warps)
        # The tensor-core paths keep their tiles in registers ("ieee" fp32 runs on FMA units).
        if fn is not st._soft_target_ce_bwd_dc_kernel and precision == "tf32":
            assert local_memory_ops(kernel, loops_only=True) == 0, (fn.__name__, width)
print("compiled")
'''


def test_kernels_compile_for_sm90():
    compile_for_sm90(_SM90_BODY)
