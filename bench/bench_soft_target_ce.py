"""Benchmark: fused soft-target contrastive loss vs the PyTorch reference (eager and compiled).

Providers: ``triton`` (``snclr.ops`` with backend="triton"), ``torch`` (the row-chunked
reference, eager) and ``compiled`` (``torch.compile`` of the reference). Modes: ``forward``
(no autograd) and ``full`` (forward + backward w.r.t. queries and targets, and candidates with
``--candidate-grad``). Flop model, matmuls only::

    forward   2*B*M*D                      (the logits)
    backward  4*B*M*D                      (recompute logits + dq), +4*B*M*D with dC

Usage::

    python -m bench.bench_soft_target_ce            # the issue's shapes (GPU)
    python -m bench.bench_soft_target_ce --small    # CPU-sized smoke run (Triton interpreter)
    pytest bench/bench_soft_target_ce.py --benchmark-only
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch

# Without a GPU the Triton provider runs under the interpreter, which must be switched on
# before any kernel is decorated (same switch as tests/conftest.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from bench.harness import print_table, run_case  # noqa: E402
from snclr import reference  # noqa: E402
from snclr.ops import soft_target_contrastive_loss  # noqa: E402

# (B, M, D, S): SNCLR ViT-S recipe on one GPU (M = 4096*17), a 1M-column gathered batch, and a
# small local batch against a large world (W*b*(K+1) columns, K = 30).
SHAPES = [(4096, 69632, 256, 17), (1024, 1048576, 256, 17), (128, 126976, 256, 31)]
SMALL_SHAPES = [(32, 1024, 64, 5)]
TEMPERATURE = 0.2
INPUT_SETS = 3  # inputs rotated between calls so no provider times a cached result


def flops(shape: tuple[int, int, int, int], mode: str, candidate_grad: bool) -> float:
    num_rows, num_cols, width, _ = shape
    forward = 2.0 * num_rows * num_cols * width
    if mode == "forward":
        return forward
    return forward + (4.0 + (4.0 if candidate_grad else 0.0)) * num_rows * num_cols * width


def setup(
    shape: tuple[int, int, int, int],
    *,
    mode: str,
    dtype: torch.dtype,
    device: torch.device,
    candidate_grad: bool = False,
) -> dict[str, object]:
    """One zero-argument callable per provider running the op once (backward included)."""
    num_rows, num_cols, width, num_slots = shape
    offset = (num_cols - num_rows * num_slots) // 2  # this rank's columns sit mid-queue
    grad = mode != "forward"
    sets = []
    for _ in range(INPUT_SETS):
        targets = torch.rand(num_rows, num_slots, device=device, dtype=dtype)
        targets[:, 0] = 1.0
        sets.append(
            (
                torch.randn(num_rows, width, device=device, dtype=dtype).requires_grad_(grad),
                torch.randn(num_cols, width, device=device, dtype=dtype).requires_grad_(
                    grad and candidate_grad
                ),
                targets.requires_grad_(grad),
            )
        )
    rotation = itertools.cycle(sets)
    options = dict(temperature=TEMPERATURE, target_offset=offset)
    compiled_reference = torch.compile(reference.soft_target_contrastive_loss)

    def provider(loss_fn):
        def run():
            queries, candidates, targets = next(rotation)
            with torch.set_grad_enabled(grad):
                loss = loss_fn(queries, candidates, targets, **options)
                if grad:
                    # Gradients are discarded each call; .grad accumulation would add traffic.
                    inputs = [x for x in (queries, candidates, targets) if x.requires_grad]
                    torch.autograd.grad(loss.sum(), inputs)
            return loss

        return run

    return {
        "triton": provider(
            lambda *a, **k: soft_target_contrastive_loss(*a, backend="triton", **k)
        ),
        "torch": provider(reference.soft_target_contrastive_loss),
        "compiled": provider(compiled_reference),
    }


def bench_shape(
    shape, *, mode: str, dtype: torch.dtype, device: torch.device, candidate_grad: bool
) -> list[dict[str, object]]:
    providers = setup(shape, mode=mode, dtype=dtype, device=device, candidate_grad=candidate_grad)
    label = "B={} M={} D={} S={}".format(*shape) + (" +dC" if candidate_grad else "")
    return run_case(
        "soft_target_contrastive_loss",
        providers,
        flops(shape, mode, candidate_grad),
        mode,
        shape=label,
        dtype=dtype,
        device=device,
        warmup=1 if device.type == "cpu" else 3,
        repeats=3 if device.type == "cpu" else 10,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU-sized smoke run")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--modes", default="forward,full", help="comma-separated modes")
    parser.add_argument("--candidate-grad", action="store_true", help="also differentiate C")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default_dtype = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, args.dtype or default_dtype)
    rows = []
    for shape in SMALL_SHAPES if args.small else SHAPES:
        for mode in args.modes.split(","):
            rows += bench_shape(
                shape, mode=mode, dtype=dtype, device=device, candidate_grad=args.candidate_grad
            )
    print_table(rows)


# ------------------------------------------------------------------------ pytest-benchmark


@pytest.mark.parametrize("provider", ["triton", "torch", "compiled"])
@pytest.mark.parametrize("mode", ["forward", "full"])
def test_soft_target_ce(benchmark, provider, mode):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SHAPES[0] if device.type == "cuda" else SMALL_SHAPES[0]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    run = setup(shape, mode=mode, dtype=dtype, device=device)[provider]
    if device.type == "cuda":

        def run_synced():
            run()
            torch.cuda.synchronize(device)

        benchmark(run_synced)
    else:
        benchmark.pedantic(run, rounds=3, warmup_rounds=1)


if __name__ == "__main__":
    main()
