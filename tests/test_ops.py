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
     "snclr.training.compare", "snclr.training.train", "snclr.training.errors"],
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


# ------------------------------------------------------------- custom ops dispatched by device

# (B, N, D, K): small and odd, so that interpreted Triton stays cheap.
KEY, ONLINE = torch.randn(5, 16), torch.randn(5, 16)
UNIT_BANK = torch.nn.functional.normalize(torch.randn(70, 16), dim=1)
EXCLUDE = torch.tensor([[3, -1]] * 5)
LOSS_TARGETS = torch.rand(5, 3) + 0.1


def test_torch_ops_run_on_cpu_tensors_as_the_reference():
    from snclr import reference

    values, indices = torch.ops.snclr.knn_topk(KEY, UNIT_BANK, 3, None)
    want_values, want_indices = reference.knn_topk(KEY, UNIT_BANK, 3)
    assert torch.equal(indices, want_indices) and torch.equal(values, want_values)
    loss, *_ = torch.ops.snclr.soft_target_contrastive_loss(KEY, UNIT_BANK, LOSS_TARGETS,
                                                           temperature=0.2, target_offset=4)
    want = reference.soft_target_contrastive_loss(KEY, UNIT_BANK, LOSS_TARGETS,
                                                  temperature=0.2, target_offset=4)
    assert torch.equal(loss, want)


def _opcheck_cases(backend):
    """(op, args, kwargs) for every snclr op, inputs with and without gradients."""
    unit_key = torch.nn.functional.normalize(KEY, dim=1)
    unit_online = torch.nn.functional.normalize(ONLINE, dim=1)
    grad = [x.clone().requires_grad_() for x in (unit_key, unit_online, UNIT_BANK)]
    loss_inputs = (KEY, UNIT_BANK, LOSS_TARGETS)
    loss_options = dict(temperature=0.3, target_offset=7, backend=backend)
    stats = torch.ops.snclr.soft_target_contrastive_loss(*loss_inputs, **loss_options)[1:]
    snclr = torch.ops.snclr
    return [
        (snclr.knn_topk.default, (unit_key, UNIT_BANK, 4, None), dict(backend=backend)),
        (snclr.knn_topk.default, (grad[0], grad[2], 2, EXCLUDE), dict(backend=backend)),
        (snclr.soft_neighbors.default, (unit_key, unit_online, UNIT_BANK, 4),
         dict(backend=backend)),
        (snclr.soft_neighbors.default, (*grad, 3, EXCLUDE),
         dict(attention_temperature=0.5, threshold=True, backend=backend)),
        (snclr.soft_target_contrastive_loss.default, loss_inputs, loss_options),
        (snclr.soft_target_contrastive_loss.default,
         tuple(x.clone().requires_grad_() for x in loss_inputs), loss_options),
        (snclr.soft_target_contrastive_loss_backward.default,
         (torch.rand(5), *loss_inputs, *stats),
         dict(loss_options, need_queries=True, need_candidates=False)),
    ]


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_opcheck_every_op(backend):
    """"auto" on CPU tensors is the CPU kernel (the reference); "triton" the interpreter."""
    for op, args, kwargs in _opcheck_cases(backend):
        torch.library.opcheck(op, args, kwargs)


def test_cpu_kernels_gradcheck_in_float64():
    """The ops' own backward formulas (not autograd through the reference), exact in float64."""
    key, online = (torch.randn(4, 6, dtype=torch.float64, requires_grad=True) for _ in "ab")
    bank = torch.nn.functional.normalize(torch.randn(20, 6, dtype=torch.float64), dim=1)
    bank.requires_grad_()
    targets = (torch.rand(4, 3, dtype=torch.float64) + 0.1).requires_grad_()

    def searched(key, online, bank):
        out = ops.soft_neighbors(key, online, bank, 3, attention_temperature=0.7, threshold=True)
        return out.similarity, out.positiveness

    def loss(queries, candidates, targets):
        return ops.soft_target_contrastive_loss(queries, candidates, targets, temperature=0.3,
                                                target_offset=2)

    assert torch.autograd.gradcheck(lambda q, b: ops.knn_topk(q, b, 3)[0], (key, bank))
    assert torch.autograd.gradcheck(searched, (key, online, bank))
    assert torch.autograd.gradcheck(loss, (key, bank, targets))


def _public_calls(backend):
    """One differentiable scalar per public op."""
    return {
        "knn_topk": lambda q, o, b: ops.knn_topk(q, b, 3, exclude=EXCLUDE,
                                                 backend=backend)[0].sum(),
        "soft_neighbors": lambda q, o, b: ops.soft_neighbors(
            q, o, b, 4, attention_temperature=0.5, threshold=True, backend=backend
        ).positiveness.mul(torch.arange(4.0)).sum(),
        "soft_target_contrastive_loss": lambda q, o, b: ops.soft_target_contrastive_loss(
            q, b, torch.ones(5, 2), temperature=0.2, target_offset=9, backend=backend
        ).mul(torch.arange(5.0)).sum(),
    }


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("name", ["knn_topk", "soft_neighbors", "soft_target_contrastive_loss"])
def test_torch_compile_fullgraph(name, backend):
    """Every public op compiles without a graph break, forward and backward ("aot_eager":
    AOTAutograd traces the ops' fake and backward registrations; inductor is tested with the
    kernels and costs minutes on two cores)."""
    call = _public_calls(backend)[name]
    compiled = torch.compile(call, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (call, compiled):
        leaves = [x.clone().requires_grad_() for x in (KEY, ONLINE, UNIT_BANK)]
        value = fn(*leaves)
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
        results.append((value, *grads))
    for got, want in zip(*results):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_torch_export_keeps_the_ops_and_runs_on_cpu():
    class Search(torch.nn.Module):
        def forward(self, key, online, bank):
            values, _ = ops.knn_topk(key, bank, 3)
            found = ops.soft_neighbors(key, online, bank, 3, attention_temperature=0.5)
            loss = ops.soft_target_contrastive_loss(key, bank, torch.ones(5, 2), temperature=0.2)
            return values, found.positiveness, loss

    args = (KEY, ONLINE, UNIT_BANK)
    program = torch.export.export(Search(), args)
    called = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"snclr.knn_topk.default", "snclr.soft_neighbors.default",
            "snclr.soft_target_contrastive_loss.default"} <= called
    for got, want in zip(program.module()(*args), Search()(*args)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dynamic", [False, True])
def test_reference_search_compiles_fullgraph(dynamic):
    """The reference itself: exact ties with no value-dependent shape (no nonzero)."""
    from snclr import reference

    query = torch.randint(-2, 3, (9, 8)).float()
    bank = torch.randint(-2, 3, (40, 8)).float()  # few levels: many ties across the cut
    query[1] = float("nan")
    compiled = torch.compile(reference.knn_topk, backend="aot_eager", fullgraph=True,
                             dynamic=dynamic)
    for k in (1, 5):
        got, want = compiled(query, bank, k, exclude=EXCLUDE[:1].expand(9, 2)), \
            reference.knn_topk(query, bank, k, exclude=EXCLUDE[:1].expand(9, 2))
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


# ------------------------------------------------------------------ imports: light, no triton

def _run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter on this checkout; its stdout."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_cpu_path_imports_and_runs_without_triton():
    out = _run_python(r'''
import os, sys
sys.modules["triton"] = None  # "import triton" now raises ImportError
os.environ["TRITON_INTERPRET"] = "1"  # so that backend="triton" on CPU asks for triton
import torch
import snclr, snclr.ops, snclr.reference
from snclr import ops
q, o = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
bank = torch.nn.functional.normalize(torch.randn(30, 8), dim=1)
values, _ = torch.ops.snclr.knn_topk(q, bank, 3, None)
values.sum().backward()
ops.soft_neighbors(q, o, bank, 3, threshold=True).positiveness[:, 0].sum().backward()
ops.soft_target_contrastive_loss(q, bank, torch.ones(4, 2), temperature=0.2).sum().backward()
assert q.grad is not None and o.grad is not None
assert snclr.__version__ and snclr.MemoryBank  # the top level loads without triton too
for call in (lambda: ops.knn_topk(q, bank, 3, backend="triton"),
             lambda: torch.ops.snclr.knn_topk(q, bank, 3, None, backend="triton")):
    try:
        call()
    except ImportError as error:
        print(error)
''')
    assert out.count("backend='triton' needs the triton package, which is not installed") == 2


def test_import_ops_loads_neither_the_model_nor_the_program_nor_the_kernels():
    # (torch itself may import triton once its custom-op machinery runs: not checked here.)
    out = _run_python(r'''
import sys
import torch
import snclr.ops
torch.ops.snclr.knn_topk(torch.randn(3, 8), torch.randn(20, 8), 2, None)
print(" ".join(sorted(m for m in sys.modules if m.startswith("snclr"))))
''')
    loaded = set(out.split())
    assert {"snclr.ops", "snclr.reference"} <= loaded
    assert not {"snclr.model", "snclr.bank", "snclr.functional", "snclr.heads",
                "snclr.encoders"} & loaded, loaded
    assert not {m for m in loaded if m.startswith(("snclr.training", "snclr.kernels."))
                and m != "snclr.kernels._common"}, loaded
