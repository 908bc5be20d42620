"""The fused soft-target contrastive loss (forward, dq, dC) on an H200 by
``../shared/tools/gpu_model.py``, next to a dense eager torch loss, at full shapes in bf16,
without a GPU.

Our side, at the launchers' own choices (``snclr.kernels.soft_target_ce``):
    forward   ``_split_layout`` for the column splits, every config of
              ``soft_target_ce_configs("forward")`` that ``_prune_configs`` keeps (the
              autotuner's candidates; the fastest modelled one stands for its pick), the
              logits' D loop as nested tensor trips (D / BLOCK_D); plus the inverse norms of
              q and C (one launch) and the finish kernel (split combine, owned logits, loss),
              as memory passes.
    dq        the same for ``_soft_target_ce_bwd_dq_kernel`` (grid: row blocks x splits x
              D / BLOCK_DO; each program recomputes its logits at full D), plus the prep
              kernel (row weights, target gradient) and the finish kernel (fixed-order sum of
              the (SPLITS, B, D) fp32 partials, target term, chain rule), as memory passes.
    dC        ``_soft_target_ce_bwd_dc_kernel`` (grid: column blocks x D / BLOCK_DO), only when
              the candidates need a gradient (in SNCLR they do not: keys and neighbours are
              detached), reported apart.
The model executes every instruction of a trip, including the forward's owned-logit store
that only the tiles holding a row block's own columns take: pessimistic for the forward.

The eager baseline is the dense loss written in plain torch at bf16, costed as a lower bound:
    forward   normalise q and C (read + write), cuBLAS ``n(q) @ n(C).T`` writing B x M bf16 at
              790 TFLOP/s (gpu_model_knn's rate), the 1/T scale (read + write B x M),
              ``logsumexp`` (two reads: max, then sum), the owned columns (negligible)
    backward  ``softmax`` from the saved logits (read B x M, write ds), the dq GEMM
              ``ds @ n(C)`` (reads ds); dC adds a second GEMM
B x M passes run at L2 bandwidth when the B x M bf16 scores fit in 50 MB, else HBM.
``--launch`` adds 2 us per launch on both sides, counted with a TorchDispatchMode over each
side's ops on small CPU inputs (views and allocations not counted): the eager loss 14
forward + 24 backward (F.normalize, the GEMM, logsumexp, the owned diagonal, and their
autograd), ours 3 + 3: Triton kernels only (norms, logits, finish; prep, dq, finish), counted
by wrapping each kernel's launch and a TorchDispatchMode over the op's ``_forward`` /
``_backward`` on fp32 CPU tensors under TRITON_INTERPRET=1 (the interpreter's own
empty / new_empty / set_ / copy_ ignored), which sees no torch op between the launches.
Before the finish kernels it was 20 + 20 (3 kernels + 17 torch ops of the split combine, the
owned logits and the loss; 1 + 19 with the row weights, the target gradient, the partial sum,
the target term and the normalisation chain rule).

Run from the checkout:
    .venv/bin/python -m bench.model_soft_target_ce [--shape B,M,D ...] [--launch] [--verbose]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
_TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "tools")
sys.path.insert(0, os.path.abspath(_TOOLS))

import gpu_model as gm  # noqa: E402
import sass_model as sm  # noqa: E402
import triton  # noqa: E402
from gpu_model_knn import GEMM_SUSTAINED, L2_BYTES, LAUNCH_US  # noqa: E402

from snclr.kernels import soft_target_ce as ce  # noqa: E402

BF16, FP32 = 2, 4
# The paper's per-GPU loss (b = 128, 4096 x 31 gathered candidates) and a large gathered batch.
SHAPES = [(128, 4096 * 31, 256), (1024, 2**20, 256)]
SLOTS = 31
LAUNCHES = {"eager": (14, 24), "snclr": (3, 3)}  # (forward, backward with dq)
PTRS = dict(q_ptr="bf16", c_ptr="bf16")


def _compile(kernel, D, config):
    consts = dict(config.kwargs, D=D, BLOCK_D=ce._block_d(D, BF16, "tf32"),
                  INPUT_PRECISION="tf32", CAST_FP32=False)
    unit = tuple(n for n in kernel.arg_names if n.startswith("stride_") and n.endswith("d"))
    return sm.compile_for_sm90(kernel, consts, PTRS, num_warps=config.num_warps,
                               num_stages=config.num_stages, unit_strides=unit)


def _best(phase, kernel, B, M, D, work, *, verbose=False):
    """The fastest kept config of ``kernel``: (seconds, details).

    ``work(config)`` gives (grid trips in launch order, flops per tile, total flops, HBM bytes).
    """
    configs = ce._prune_configs(ce.soft_target_ce_configs(phase), {"D": D},
                                INPUT_PRECISION="tf32")
    block_d = ce._block_d(D, BF16, "tf32")
    sm.FLOAT_SCALARS.add("inv_temperature")
    best = None
    for c in configs:
        trips, tile_flops, flops, hbm = work(c)
        a = gm.analyse(_compile(kernel, D, c), num_warps=c.num_warps, num_stages=c.num_stages,
                       tile_flops=tile_flops,
                       inner_trips=0.0 if block_d >= D else D / block_d)
        if a["occupancy"]["ctas_per_sm"] < 1:
            continue
        kr = gm.kernel(a, grid=len(trips), trips=trips, flops=flops, hbm_bytes=hbm)
        kw = c.kwargs
        cfg = (kw["BLOCK_B"], kw["BLOCK_N"], block_d, kw["BLOCK_DO"], c.num_warps, c.num_stages)
        if verbose:
            print(f"    {kernel.__name__} {cfg}: mix {a['mix_as_is']['bound']:.2f} "
                  f"({a['mix_as_is']['limiter']}), {kr['time_s'] * 1e6:.1f} us, "
                  f"{kr['tflops']:.0f} TF, {a['occupancy']['ctas_per_sm']} CTA/SM, "
                  f"{kr['limiter']}", flush=True)
        if best is None or kr["time_s"] < best["time_s"]:
            best = dict(time_s=kr["time_s"], cfg=cfg, mix=a["mix_as_is"]["bound"],
                        limiter=kr["limiter"], tflops=kr["tflops"])
    return best


def _pass(nbytes):
    """Seconds of one memory pass over ``nbytes`` (L2 when the scores fit there)."""
    return nbytes / (gm.L2_BW if nbytes <= L2_BYTES else gm.HBM_BW)


def ours(B, M, D, *, verbose=False):
    splits, cols_per_split = ce._split_layout(B, M, None, None)

    def column_trips(c, per_row_block_d=1):
        trips = []
        for s in range(splits):  # launch order: row blocks vary fastest
            span = max(0, min(cols_per_split, M - s * cols_per_split))
            trips += [triton.cdiv(span, c.kwargs["BLOCK_N"])] * (
                triton.cdiv(B, c.kwargs["BLOCK_B"]) * per_row_block_d)
        return trips

    def forward(c):
        bb, bn = c.kwargs["BLOCK_B"], c.kwargs["BLOCK_N"]
        hbm = (M + B) * D * BF16 + 2 * B * splits * FP32
        return column_trips(c), 2 * bb * bn * D, 2 * B * M * D, hbm

    def dq(c):
        bb, bn, bdo = c.kwargs["BLOCK_B"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_DO"]
        chunks = triton.cdiv(D, bdo)
        hbm = (M + B) * D * BF16 + splits * B * D * FP32
        # Each output chunk recomputes the logits at full D.
        return (column_trips(c, chunks), 2 * bb * bn * (D + bdo), 2 * B * M * D * (chunks + 1),
                hbm)

    def dc(c):
        bb, bn, bdo = c.kwargs["BLOCK_B"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_DO"]
        chunks = triton.cdiv(D, bdo)
        trips = [triton.cdiv(B, bb)] * (triton.cdiv(M, bn) * chunks)
        return trips, 2 * bb * bn * (D + bdo), 2 * B * M * D * (chunks + 1), (M + B) * D * BF16

    fwd = _best("forward", ce._soft_target_ce_fwd_kernel, B, M, D, forward, verbose=verbose)
    bq = _best("dq", ce._soft_target_ce_bwd_dq_kernel, B, M, D, dq, verbose=verbose)
    bc = _best("dc", ce._soft_target_ce_bwd_dc_kernel, B, M, D, dc, verbose=verbose)
    norms = _pass((M + B) * D * BF16)
    owned_rows = B * SLOTS * D * BF16
    # Forward finish: the max partials twice and the sums once, q and the owned rows, the
    # targets; writes lse, loss and the owned logits.
    forward_finish = _pass(3 * B * splits * FP32 + B * D * BF16 + owned_rows
                           + 2 * B * SLOTS * FP32 + 2 * B * FP32)
    # Prep: g, lse, targets and owned logits in, row weights and the target gradient out.
    prep = _pass(3 * B * FP32 + 3 * B * SLOTS * FP32)
    # dq finish: the partials, the owned rows, targets, q in and dq out.
    dq_finish = _pass(splits * B * D * FP32 + owned_rows + B * SLOTS * FP32 + 2 * B * D * BF16)
    return dict(splits=splits, forward=fwd, dq=bq, dc=bc, norms_s=norms,
                forward_finish_s=forward_finish, prep_s=prep, dq_finish_s=dq_finish,
                forward_s=norms + fwd["time_s"] + forward_finish,
                backward_s=prep + bq["time_s"] + dq_finish)


def eager(B, M, D):
    scores = B * M * BF16
    features = (B + M) * D * BF16
    gemm = max(2 * B * M * D / GEMM_SUSTAINED, (scores + features) / gm.HBM_BW)
    forward = 2 * features / gm.HBM_BW + gemm + 4 * _pass(scores)
    backward = 2 * _pass(scores) + gemm
    return dict(forward_s=forward, backward_s=backward, dc_s=gemm)


def model_shape(B, M, D, *, launch=False, verbose=False):
    mine, base = ours(B, M, D, verbose=verbose), eager(B, M, D)
    extra = {name: LAUNCH_US * 1e-6 * n if launch else 0.0
             for name, n in zip(("forward", "backward"), LAUNCHES["snclr"], strict=True)}
    extra_eager = {name: LAUNCH_US * 1e-6 * n if launch else 0.0
                   for name, n in zip(("forward", "backward"), LAUNCHES["eager"], strict=True)}
    t_ours = {k: mine[f"{k}_s"] + extra[k] for k in extra}
    t_eager = {k: base[f"{k}_s"] + extra_eager[k] for k in extra_eager}
    return dict(shape=(B, M, D), ours=mine, eager=base, t_ours=t_ours, t_eager=t_eager,
                extra_mb=(2 * B * mine["splits"] + B * SLOTS + B + M) * FP32 / 1e6,
                dq_extra_mb=mine["splits"] * B * D * FP32 / 1e6)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", action="append", help="B,M,D (default: the two study shapes)")
    p.add_argument("--launch", action="store_true", help="add 2 us per kernel launch")
    p.add_argument("--verbose", action="store_true", help="print every config")
    a = p.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split(",")) for s in a.shape] if a.shape else SHAPES
    print("| B, M, D | splits | kernel | config (BB, BN, BD, BDO, warps, stages) | mix bound "
          "| est. | TFLOP/s | limiter |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for shape in shapes:
        r = model_shape(*shape, launch=a.launch, verbose=a.verbose)
        rows.append(r)
        for name in ("forward", "dq", "dc"):
            k = r["ours"][name]
            print(f"| {', '.join(map(str, shape))} | {r['ours']['splits']} | {name} | {k['cfg']} "
                  f"| {k['mix']:.2f} | {k['time_s'] * 1e6:.1f} us | {k['tflops']:.0f} "
                  f"| {k['limiter']} |", flush=True)
    print()
    print("| B, M, D | snclr fwd | eager fwd | eager / snclr | snclr fwd+dq | eager fwd+dq "
          "| eager / snclr | dq partials MB | eager scores MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        B, M, D = r["shape"]
        fo, fe = r["t_ours"]["forward"], r["t_eager"]["forward"]
        to, te = fo + r["t_ours"]["backward"], fe + r["t_eager"]["backward"]
        print(f"| {B}, {M}, {D} | {fo * 1e6:.1f} us | {fe * 1e6:.1f} us | {fe / fo:.2f} "
              f"| {to * 1e6:.1f} us | {te * 1e6:.1f} us | {te / to:.2f} "
              f"| {r['dq_extra_mb']:.1f} | {B * M * BF16 / 1e6:.1f} |")
    return rows


if __name__ == "__main__":
    main()
