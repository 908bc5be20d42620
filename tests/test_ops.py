"""Public ops: input validation, backend resolution, and the documented examples."""

import doctest
import importlib

import pytest
import torch

from snclr import ops

Q, BANK = torch.randn(4, 8), torch.randn(20, 8)


def loss_of(targets, *, temperature=0.2, **options):
    """The loss op on Q and BANK: the rows below vary only the targets and the options."""
    return ops.soft_target_contrastive_loss(Q, BANK, targets, temperature=temperature, **options)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: ops.knn_topk(Q[0], BANK, 2),
         ValueError, r"query must have 2 dimensions, got shape \(8,\)"),
        (lambda: ops.knn_topk(Q, BANK[:, :5], 2),
         ValueError, r"feature dimension D must match: got query \(4, 8\), bank \(20, 5\)"),
        (lambda: ops.knn_topk(Q, BANK, 21),
         ValueError, r"k=21 exceeds the 20 searchable rows of bank"),
        (lambda: ops.knn_topk(Q, BANK, 0), ValueError, r"k must be >= 1, got 0"),
        (lambda: ops.knn_topk(Q, BANK, 2.0), TypeError, r"k must be an int"),
        (lambda: ops.knn_topk(Q.long(), BANK, 2),
         TypeError, r"query must be a floating-point tensor, got dtype torch.int64"),
        (lambda: ops.knn_topk(Q, BANK.to("meta"), 2),
         ValueError, r"one device: got query on cpu, bank on meta"),
        (lambda: ops.knn_topk(Q, BANK[:0], 1), ValueError, r"bank must not be empty"),
        (lambda: ops.knn_topk(Q[:0], BANK, 1), ValueError, r"query must not be empty"),
        (lambda: ops.knn_topk(Q, BANK, 2, exclude=torch.zeros(3, 1, dtype=torch.long)),
         ValueError, r"exclude must have shape \(B=4, E\)"),
        (lambda: ops.knn_topk(Q, BANK, 2, exclude=torch.zeros(4, 1)),
         TypeError, r"exclude must be int64"),
        (lambda: ops.knn_topk(Q, BANK, 2, backend="cuda"), ValueError, r"backend must be one of"),
        (lambda: ops.knn_topk([[1.0]], BANK, 2),
         TypeError, r"query must be a torch.Tensor, got list"),
        (lambda: ops.soft_neighbors(Q, Q[:3], BANK, 2),
         ValueError, r"batch dimension B must match: got key \(4, 8\), online \(3, 8\)"),
        (lambda: ops.soft_neighbors(Q, Q, BANK, 2, attention_temperature=0.0),
         ValueError, r"attention_temperature must be a finite number > 0, got 0.0"),
        (lambda: ops.soft_neighbors(Q, Q, BANK, 2, attention_temperature=float("nan")),
         ValueError, r"attention_temperature must be a finite number"),
        (lambda: ops.soft_neighbors(Q, Q, BANK, 2, attention_temperature=float("inf")),
         ValueError, r"attention_temperature must be a finite number > 0, got inf"),
        (lambda: ops.soft_neighbors(Q, Q, BANK, 2, attention_temperature="1"),
         TypeError, r"attention_temperature must be a number, got str"),
        (lambda: ops.soft_neighbors(Q, Q, BANK, 2, backend="gpu"),
         ValueError, r"backend must be one of"),
        (lambda: ops.soft_neighbors(Q, Q[:, :4], BANK, 2),
         ValueError, r"feature dimension D must match"),
        (lambda: ops.soft_neighbors(Q, Q, BANK, 30),
         ValueError, r"k=30 exceeds the 20 searchable rows"),
        (lambda: loss_of(torch.ones(4, 3), target_offset=9),
         ValueError, r"target columns \[9, 21\) of B=4 rows x S=3 slots must lie within the "
                     r"M=20 candidates"),
        (lambda: loss_of(torch.ones(4, 3), target_offset=-1), ValueError, r"must lie within"),
        (lambda: loss_of(torch.ones(5, 3)),
         ValueError, r"batch dimension B must match: got queries \(4, 8\), targets \(5, 3\)"),
        (lambda: loss_of(torch.ones(4)), ValueError, r"targets must have 2 dimensions"),
        (lambda: loss_of(torch.ones(4, 3, dtype=torch.long)),
         TypeError, r"targets must be a floating-point tensor"),
        (lambda: loss_of(torch.ones(4, 3), temperature=-1),
         ValueError, r"temperature must be a finite number > 0, got -1"),
        (lambda: loss_of(torch.ones(4, 3), temperature=float("inf")),
         ValueError, r"temperature must be a finite number > 0, got inf"),
        (lambda: loss_of(torch.ones(4, 3), temperature=None),
         TypeError, r"temperature must be a number, got NoneType"),
        (lambda: loss_of(torch.ones(4, 3), backend="gpu"), ValueError, r"backend must be one of"),
        (lambda: loss_of(torch.ones(4, 3), target_offset=1.5),
         TypeError, r"target_offset must be an int"),
    ],
)
def test_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors \(got cpu\)"):
        ops.knn_topk(Q, BANK, 2, backend="triton")


def test_auto_backend_on_cpu_is_the_reference():
    from snclr import reference

    for got, expected in zip(ops.knn_topk(Q, BANK, 3), reference.knn_topk(Q, BANK, 3)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "module",
    ["snclr.ops.knn_topk", "snclr.ops.soft_neighbors", "snclr.ops.soft_target_contrastive_loss",
     "snclr.functional", "snclr.bank", "snclr.model", "snclr.encoders", "snclr.training.stats",
     "snclr.training.compare"],
)
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_of_range_exclusions_are_ignored_by_both_backends(backend):
    # One documented rule, no host sync: entries outside [0, N) exclude nothing.
    query, bank = torch.randn(5, 16), torch.randn(70, 16)
    _, best = ops.knn_topk(query, bank, 3, backend="torch")
    exclude = torch.cat([best[:, :1], torch.tensor([[70, 75, -1, -9]] * 5)], dim=1)
    values, indices = ops.knn_topk(query, bank, 3, exclude=exclude, backend=backend)
    want_values, want_indices = ops.knn_topk(query, bank, 3, exclude=best[:, :1], backend="torch")
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values, want_values, atol=1e-5, rtol=1e-5)
