#!/usr/bin/env bash
# One script for a CUDA machine: the GPU-only tests, then every benchmark, end to end
# (a few minutes on a datacentre GPU). Output goes to the terminal and to $OUT (default
# bench/out/); copy the rows that matter into bench/RESULTS.md with date, device, command.
#
#   bash bench/run_gpu.sh            # in an environment where snclr is installed
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/out}
mkdir -p "$out"
python=${PYTHON:-python}
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
"$python" -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$out/gpu_tests.txt" || status=1
"$python" -m pytest -q -p no:cacheprovider tests/test_kernels_knn_topk.py tests/test_kernels_soft_target_ce.py \
    2>&1 | tee "$out/kernel_tests_compiled.txt" || status=1
"$python" -m bench.bench_knn_topk --mode both 2>&1 | tee "$out/bench_knn_topk.txt" || status=1
"$python" -m bench.bench_soft_target_ce 2>&1 | tee "$out/bench_soft_target_ce.txt" || status=1
# kNN evaluation at ImageNet scale: 50,000 queries against 1.28 M x 384 (ViT-S features),
# k = 200 (past the Triton kernels' k <= 64: the exact reference search on the GPU) and
# k = 20 (the Triton kernels), each next to the former dense path.
"$python" -m bench.bench_knn_eval --device cuda --bank 1280000 --dim 384 --queries 50000 --k 200 \
    2>&1 | tee "$out/bench_knn_eval_k200.txt" || status=1
"$python" -m bench.bench_knn_eval --device cuda --bank 1280000 --dim 384 --queries 50000 --k 20 \
    2>&1 | tee "$out/bench_knn_eval_k20.txt" || status=1
if [ -f bench/bench_train_step.py ]; then
    "$python" -m bench.bench_train_step 2>&1 | tee "$out/bench_train_step.txt" || status=1
fi
exit $status
