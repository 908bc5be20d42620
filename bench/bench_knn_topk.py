"""Benchmark: fused Triton knn_topk / soft_neighbors against torch.topk over a dense matmul.

Providers per case:
    triton   the fused split + merge kernels (``backend="triton"``)
    torch    ``torch.topk(query @ bank.T, k)`` (+ the reference positiveness for
             soft_neighbors): materialises the B x N score matrix

Flops of one forward: ``2 * B * N * D`` (the similarity matmul; the top-K and the
positiveness are O(B*N) and O(B*K*D)). Backward ("full" mode) adds O(B*K*D) only.

CPU mode (``--cpu``): the search ``auto`` runs on a CPU (the O(N) torch path of
``snclr.reference``) against the same two dense baselines a CPU user would reach for, on
the same fp32 inputs, forward only:
    snclr    ``snclr.ops.knn_topk(query, bank, k)`` (backend "auto")
    torch    ``torch.topk(query @ bank.T, k)``
    faiss    faiss-cpu ``IndexFlatIP.search`` (column skipped when faiss is not installed;
             the index is built outside the timed call)
Each case runs ``--rounds`` times, providers in turn, and keeps per provider the round with
the median time, so that load from other processes hits every provider alike.

Run:
    python -m bench.bench_knn_topk                  # GPU shapes, bf16 and fp32
    python -m bench.bench_knn_topk --small          # CPU-sized smoke run (interpreter)
    python -m bench.bench_knn_topk --cpu            # CPU search vs torch and faiss-cpu
    pytest bench/bench_knn_topk.py                  # pytest-benchmark, small shapes on CPU
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.harness import print_table, run_case

# (B, N, D, K): the headline shape, a mid-size queue, and the paper's ViT-S recipe
# (queue 128,000 per GPU, K = 30).
SHAPES = [(4096, 1 << 20, 256, 16), (1024, 65536, 256, 16), (128, 128000, 256, 30)]
SMALL_SHAPES = [(33, 2048, 64, 16), (8, 4096, 32, 1)]
DTYPES = [torch.bfloat16, torch.float32]
# CPU mode: the shapes of issue 8's side-by-side (the CPU training step's search, a mid-size
# queue, the paper's K = 30 with a large queue), fp32.
CPU_SHAPES = [(64, 4096, 128, 5), (256, 65536, 256, 16), (512, 131072, 128, 30)]
# A CPU case repeats each provider for at least this long (small shapes take < 1 ms).
CPU_MIN_SECONDS = 0.5


def _use_interpreter_without_gpu() -> None:
    # The kernels are decorated when snclr.kernels is first imported: set the switch first.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def flops(batch: int, rows: int, dim: int) -> float:
    return 2.0 * batch * rows * dim


def _torch_soft_neighbors(key, online, bank, k, attention_temperature=1.0):
    """Dense baseline: full score matrix, torch.topk, reference positiveness."""
    similarity, indices = torch.topk(F.normalize(key, dim=-1) @ bank.t(), k, dim=1)
    neighbors = bank[indices]
    attention = torch.einsum(
        "bd,bkd->bk", F.normalize(online.float(), dim=-1), F.normalize(neighbors.float(), dim=-1)
    )
    return similarity, torch.softmax(attention / attention_temperature, dim=-1), indices


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


def cpu_setup(shape: tuple[int, int, int, int]) -> dict[str, Callable[[], object]]:
    """fp32 CPU inputs and a callable per provider of the CPU mode (see the docstring)."""
    from snclr import ops

    batch, rows, dim, k = shape
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(batch, dim, generator=gen)
    bank = F.normalize(torch.randn(rows, dim, generator=gen), dim=1)
    providers = {
        "snclr": lambda: ops.knn_topk(query, bank, k),
        "torch": lambda: torch.topk(query @ bank.t(), k, dim=1),
    }
    try:
        import faiss
    except ImportError:
        return providers
    index = faiss.IndexFlatIP(dim)
    index.add(bank.numpy())
    query_np = query.numpy()
    providers["faiss"] = lambda: index.search(query_np, k)
    return providers


def run_cpu(shapes, repeats: int, rounds: int) -> list[dict[str, object]]:
    """CPU mode: per shape, ``rounds`` runs of every provider; the median round is kept."""
    rows = []
    for shape in shapes:
        batch, n_rows, dim, k = shape
        providers = cpu_setup(shape)
        start = time.perf_counter()
        providers["torch"]()
        once = time.perf_counter() - start
        case_repeats = max(repeats, min(1000, math.ceil(CPU_MIN_SECONDS / max(once, 1e-6))))
        runs = [
            run_case(
                "knn_topk", providers, flops(batch, n_rows, dim), "forward",
                shape=f"B={batch} N={n_rows} D={dim} K={k}", dtype=torch.float32,
                device="cpu", repeats=case_repeats,
            )
            for _ in range(rounds)
        ]
        kept = []
        for i in range(len(providers)):
            by_time = sorted((run[i] for run in runs), key=lambda row: row["ms"])
            kept.append(dict(by_time[len(by_time) // 2]))
        torch_ms = next(row["ms"] for row in kept if row["provider"] == "torch")
        for row in kept:
            row["ratio"] = torch_ms / row["ms"]
        rows += kept
    return rows


def print_cpu_summary(rows: list[dict[str, object]]) -> None:
    """Median ms per provider and each one's time as a multiple of torch's (lower is faster)."""
    providers = list(dict.fromkeys(row["provider"] for row in rows))
    shapes = list(dict.fromkeys(row["shape"] for row in rows))
    ms = {(row["shape"], row["provider"]): row["ms"] for row in rows}
    lines = [["shape", *(f"{p} ms" for p in providers)]]
    lines[0] += [f"{p}/torch" for p in providers if p != "torch"]
    for shape in shapes:
        cells = [shape, *(f"{ms[shape, p]:.4g}" for p in providers)]
        cells += [f"{ms[shape, p] / ms[shape, 'torch']:.3f}" for p in providers if p != "torch"]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))


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
    parser.add_argument("--cpu", action="store_true",
                        help="CPU search: snclr knn_topk vs torch.topk(q @ bank.T) and faiss-cpu")
    parser.add_argument("--repeats", type=int, default=5, help="CPU timer repeats (at least)")
    parser.add_argument("--rounds", type=int, default=3, help="--cpu: rounds per case")
    args = parser.parse_args(argv)
    if args.cpu:
        rows = run_cpu(CPU_SHAPES, args.repeats, args.rounds)
        print_table(rows)
        print()
        print_cpu_summary(rows)
        return
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
