"""Benchmark: fused Triton knn_topk / soft_neighbors against torch.topk over a dense matmul.

Providers per case:
    triton   the fused split + merge kernels (``backend="triton"``)
    torch    ``torch.topk(query @ bank.T, k)`` (+ the reference positiveness for
             soft_neighbors): materialises the B x N score matrix

Flops of one forward: ``2 * B * N * D`` (the similarity matmul; the top-K and the
positiveness are O(B*N) and O(B*K*D)). Backward ("full" mode) adds O(B*K*D) only.

Run:
    python -m bench.bench_knn_topk                  # GPU shapes, bf16 and fp32
    python -m bench.bench_knn_topk --small          # CPU-sized smoke run (interpreter)
    pytest bench/bench_knn_topk.py                  # pytest-benchmark, small shapes on CPU
"""

from __future__ import annotations

import argparse
import os
from typing import Callable

import torch
import torch.nn.functional as F

from bench.harness import print_table, run_case

# (B, N, D, K): the headline shape, a mid-size queue, and the paper's ViT-S recipe
# (queue 128,000 per GPU, K = 30).
SHAPES = [(4096, 1 << 20, 256, 16), (1024, 65536, 256, 16), (128, 128000, 256, 30)]
SMALL_SHAPES = [(33, 2048, 64, 16), (8, 4096, 32, 1)]
DTYPES = [torch.bfloat16, torch.float32]


def _use_interpreter_without_gpu() -> None:
    # The kernels are decorated when snclr.kernels is first imported: set the switch first.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def flops(batch: int, rows: int, dim: int) -> float:
    return 2.0 * batch * rows * dim


def _torch_soft_neighbors(key, online, bank, k, temperature=1.0):
    """Dense baseline: full score matrix, torch.topk, reference positiveness."""
    similarity, indices = torch.topk(F.normalize(key, dim=-1) @ bank.t(), k, dim=1)
    neighbors = bank[indices]
    attention = torch.einsum(
        "bd,bkd->bk", F.normalize(online.float(), dim=-1), F.normalize(neighbors.float(), dim=-1)
    )
    return similarity, torch.softmax(attention / temperature, dim=-1), indices


def _fused_soft_neighbors(ops, key, online, bank, k):
    out = ops.soft_neighbors(key, online, bank, k, backend="triton")
    return out.similarity, out.positiveness


def setup(
    op: str, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
    mode: str = "forward",
) -> dict[str, Callable[[], object]]:
    """Inputs for one case and a zero-argument callable per provider."""
    from snclr import ops

    batch, rows, dim, k = shape
    gen = torch.Generator(device=device).manual_seed(0)
    grad = mode == "full"
    key = torch.randn(batch, dim, device=device, generator=gen).to(dtype).requires_grad_(grad)
    online = torch.randn(batch, dim, device=device, generator=gen).to(dtype).requires_grad_(grad)
    bank = F.normalize(torch.randn(rows, dim, device=device, generator=gen), dim=1).to(dtype)

    if op == "knn_topk":
        forwards = {
            "triton": lambda: ops.knn_topk(key, bank, k, backend="triton")[0],
            "torch": lambda: torch.topk(key @ bank.t(), k, dim=1).values,
        }
    else:
        forwards = {
            "triton": lambda: _fused_soft_neighbors(ops, key, online, bank, k),
            "torch": lambda: _torch_soft_neighbors(key, online, bank, k)[:2],
        }
    if not grad:
        return forwards

    def with_backward(forward):
        def run():
            outputs = forward()
            outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            loss = sum(o.float().sum() for o in outputs if o.is_floating_point())
            torch.autograd.grad(loss, [key, online] if op != "knn_topk" else [key],
                                allow_unused=True)
        return run

    return {name: with_backward(fn) for name, fn in forwards.items()}


def run(shapes, dtypes, ops_, modes, device, repeats) -> list[dict[str, object]]:
    rows = []
    for op in ops_:
        for mode in modes:
            for dtype in dtypes:
                for shape in shapes:
                    batch, n_rows, dim, k = shape
                    rows += run_case(
                        op, setup(op, shape, dtype, device, mode), flops(batch, n_rows, dim),
                        mode, shape=f"B={batch} N={n_rows} D={dim} K={k}", dtype=dtype,
                        device=device, repeats=repeats,
                    )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="CPU-sized smoke shapes, fp32")
    parser.add_argument("--op", choices=["knn_topk", "soft_neighbors", "both"], default="both")
    parser.add_argument("--mode", choices=["forward", "full", "both"], default="forward")
    parser.add_argument("--repeats", type=int, default=5, help="CPU timer repeats")
    args = parser.parse_args(argv)
    _use_interpreter_without_gpu()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or device.type != "cuda"
    shapes = SMALL_SHAPES if small else SHAPES
    dtypes = [torch.float32] if small else DTYPES
    ops_ = ["knn_topk", "soft_neighbors"] if args.op == "both" else [args.op]
    modes = ["forward", "full"] if args.mode == "both" else [args.mode]
    print_table(run(shapes, dtypes, ops_, modes, device, args.repeats))


def test_bench_knn_topk(benchmark):
    """pytest-benchmark entry: ``pytest bench/bench_knn_topk.py`` (collected only there)."""
    _use_interpreter_without_gpu()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SHAPES[1] if device.type == "cuda" else SMALL_SHAPES[0]
    providers = setup("soft_neighbors", shape, torch.float32, device)
    row = run_case("soft_neighbors", providers, flops(*shape[:3]), shape=str(shape),
                   dtype=torch.float32, device=device, repeats=3)
    benchmark.extra_info.update({r["provider"]: r["ms"] for r in row})
    triton_fn = providers["triton"]
    if device.type == "cuda":
        benchmark(lambda: (triton_fn(), torch.cuda.synchronize()))
    else:
        benchmark.pedantic(triton_fn, rounds=3, warmup_rounds=1)


if __name__ == "__main__":
    main()
