"""kNN evaluation: ``weighted_knn_predict`` (``knn_topk``, chunked) next to the dense path.

The dense path is the former implementation: ``(queries @ memory.T).topk(k)`` in chunks of
1,024 queries. Each path runs in its own process on the same random features; the time is
the best of ``--repeat`` runs (wall clock, and the process's CPU time, which a
busy machine disturbs less), the peak memory the growth of the process's maximum resident
set over the call (the inputs already allocated). The predictions are compared.

    python -m bench.bench_knn_eval                          # 100,000 x 2,048, k=200, CPU
    python -m bench.bench_knn_eval --bank 1280000 --dim 384 --queries 50000 --device cuda

On CUDA the peak is ``torch.cuda.max_memory_allocated`` over the call.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

CLASSES = 1000
DENSE_CHUNK = 1024


def features(bank: int, dim: int, queries: int, device: str):
    g = torch.Generator().manual_seed(0)
    memory = torch.randn(bank, dim, generator=g)
    labels = torch.randint(0, CLASSES, (bank,), generator=g)
    query = torch.randn(queries, dim, generator=g)
    return memory.to(device), labels.to(device), query.to(device)


@torch.no_grad()
def dense_predict(memory, labels, queries, k: int, temperature: float = 0.07):
    memory = F.normalize(memory.float(), dim=1)
    preds = []
    for chunk in F.normalize(queries.float(), dim=1).split(DENSE_CHUNK):
        sim, idx = (chunk @ memory.T).topk(k, dim=1)
        votes = torch.zeros(chunk.shape[0], CLASSES, device=chunk.device)
        preds.append(votes.scatter_add_(1, labels[idx], (sim / temperature).exp()).argmax(1))
    return torch.cat(preds)


def fused_predict(memory, labels, queries, k: int):
    from snclr.training.evaluate import weighted_knn_predict

    return weighted_knn_predict(memory, labels, queries, ks=(k,), num_classes=CLASSES)[k].argmax(1)


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(path: str, args) -> dict:
    memory, labels, queries = features(args.bank, args.dim, args.queries, args.device)
    predict = dense_predict if path == "dense" else fused_predict
    cuda = args.device == "cuda"
    times, cpu_times, peak = [], [], 0.0
    for _ in range(args.repeat):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _max_rss_mb()
        tic, cpu_tic = time.perf_counter(), time.process_time()
        pred = predict(memory, labels, queries, args.k)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
        cpu_times.append(time.process_time() - cpu_tic)
        grown = ((torch.cuda.max_memory_allocated() - base) / 2**20 if cuda
                 else _max_rss_mb() - base)
        peak = max(peak, grown)
    return {"path": path, "seconds": min(times), "cpu_seconds": min(cpu_times), "peak_mb": peak,
            "pred": pred.cpu().tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bank", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=2048)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--paths", default="dense,fused")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args)))
        return
    print(f"kNN evaluation: bank {args.bank} x {args.dim}, {args.queries} queries, k={args.k}, "
          f"{args.device}, {torch.get_num_threads()} threads")
    results = {}
    for path in args.paths.split(","):
        argv = [sys.executable, "-m", "bench.bench_knn_eval", "--child", path,
                *[f"--{name}={getattr(args, name)}" for name in
                  ("bank", "dim", "queries", "k", "device", "repeat")]]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        results[path] = json.loads(out.strip().splitlines()[-1])
        r = results[path]
        print(f"{path:>6}: {r['seconds']:.2f} s ({r['cpu_seconds']:.2f} s of CPU time), "
              f"peak +{r['peak_mb']:.0f} MB")
    if len(results) == 2:
        a, b = (results[p]["pred"] for p in results)
        same = sum(x == y for x, y in zip(a, b))
        print(f"identical predictions: {same} of {len(a)}")


if __name__ == "__main__":
    main()
