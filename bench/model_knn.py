"""The fused search (split + merge) on an H200 by ``../shared/tools/gpu_model.py``, next to
``torch.topk(query @ bank.T, k)``, at full problem shapes in bf16, without a GPU.

Every kernel of the search counts, at the launcher's own choices:
    split   ``search_plan`` (group rows = BLOCK_N, subgroup rows SUB), ``num_splits_for``,
            rows per split rounded up as ``knn_topk_split`` does, ``one_pass_block_d``, and every
            config of ``split_configs()`` that its prune keeps (the autotuner's candidates);
            the fastest modelled config stands for the autotuner's pick. The tile loop has no
            nested loop, so nothing is charged as insertion rounds.
    merge   ``merge_blocks`` (rows per program, gather width, ranked or round selections);
            each of its loops (the list walk and, unless ranked, two more selections of K
            rounds; the D loops of two gathers) is simulated per trip by ``gpu_model.run_sm``
            and charged as often as it runs (D / BLOCK_D for a gather), the code outside them
            (the ranked selections among it) once per program from a cold start, and the
            fill (only for rows short of K eligible rows) not at all; CTAs spread over the
            SMs, floored by the HBM bytes it must read: K * SUB refined rows and K winners
            per query row, as bf16.
The torch figure is ``gpu_model_knn.torch_baseline`` (same directory as gpu_model.py): cuBLAS
at 790 TFLOP/s writing bf16 scores, plus PyTorch's radix-select passes over them; a lower
bound on torch's time, so the ratio is a lower bound on the speedup. ``--launch`` adds 2 us
per kernel launch on both sides (2 for snclr, 13 for torch).

Run from the checkout:
    .venv/bin/python -m bench.model_knn [--shape B,N,D,K ...] [--launch]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
_TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "tools")
sys.path.insert(0, os.path.abspath(_TOOLS))

import gpu_model as gm  # noqa: E402
import sass_model as sm  # noqa: E402
import triton  # noqa: E402
from gpu_model_knn import LAUNCH_US, SHAPES, torch_baseline  # noqa: E402

from snclr.kernels import knn_topk as kk  # noqa: E402
from snclr.kernels._common import one_pass_block_d  # noqa: E402

BF16 = 2


def compile_split(D, K, plan, layout, block_b, warps, stages):
    consts = dict(K=K, K_PAD=layout.list_pad, HAS_EXCLUDE=False, E_PAD=1,
                  CAST_FP32=False, INPUT_PRECISION="tf32", D=D, BLOCK_B=block_b,
                  BLOCK_N=plan.group_rows, BLOCK_D=one_pass_block_d(D, BF16), SUB=plan.sub_rows,
                  DIRECT=layout.direct)
    unit = tuple(n for n in kk._knn_topk_split_kernel.arg_names
                 if n.startswith("stride_") and n.endswith("d"))
    ptrs = dict(q_ptr="bf16", bank_ptr="bf16", cand_ptr="i64", exclude_ptr="i64",
                sub_ptr="fp32")
    return sm.compile_for_sm90(kk._knn_topk_split_kernel, consts, ptrs, num_warps=warps,
                               num_stages=stages, unit_strides=unit)


def split_time(B, N, D, K, plan, *, splits=None, verbose=False):
    """The fastest kept config: (seconds, details)."""
    layout = kk.split_layout(B, N, K, plan.group_rows, splits)
    splits, rows = layout.splits, layout.rows_per_split
    configs, prune = kk.split_configs()
    # The launch's own prune arguments: the kept configs depend on the row width too.
    configs = prune(configs, {"K_PAD": layout.list_pad, "BLOCK_N": plan.group_rows,
                              "BLOCK_D": one_pass_block_d(D, BF16)})
    subgroups = plan.group_rows // plan.sub_rows
    hbm = (N * D * BF16 + splits * B * D * BF16
           + B * splits * (K * 8 + layout.stored_slots * subgroups * 4))
    best = None
    for c in configs:
        bb, w, st = c.kwargs["BLOCK_B"], c.num_warps, c.num_stages
        ck = compile_split(D, K, plan, layout, bb, w, st)
        a = gm.analyse(ck, num_warps=w, num_stages=st, tile_flops=2 * bb * plan.group_rows * D)
        if a["occupancy"]["ctas_per_sm"] < 1:
            continue
        trips = []
        for s in range(splits):  # launch order: query blocks vary fastest
            span = max(0, min(rows, N - s * rows))
            trips += [triton.cdiv(span, plan.group_rows)] * triton.cdiv(B, bb)
        kr = gm.kernel(a, grid=len(trips), trips=trips, flops=2 * B * N * D, hbm_bytes=hbm)
        row = dict(cfg=(bb, w, st), a=a, k=kr)
        if verbose:
            print(f"    split {bb} x {plan.group_rows}, {w} warps, {st} stages: mix "
                  f"{a['mix_as_is']['bound']:.2f} ({a['mix_as_is']['limiter']}), "
                  f"{kr['time_s'] * 1e3:.3f} ms, {kr['tflops']:.0f} TF, "
                  f"{a['occupancy']['ctas_per_sm']} CTA/SM, {kr['limiter']}", flush=True)
        if best is None or kr["time_s"] < best["k"]["time_s"]:
            best = row
    return best["k"]["time_s"], dict(best, splits=splits, rows=rows, layout=layout)


def merge_time(B, D, K, plan, splits):
    """Seconds of the merge: its K-round loops simulated per trip, CTAs over the SMs."""
    k_pad = triton.next_power_of_2(K)
    subgroups = plan.group_rows // plan.sub_rows
    block_b, block_d, block_dw, warps, ranked = kk.merge_blocks(B, K, subgroups,
                                                                 plan.sub_rows, D)
    consts = dict(K=K, K_PAD=k_pad, SPLITS_PAD=triton.next_power_of_2(splits), S=subgroups,
                  SUB=plan.sub_rows, HAS_EXCLUDE=False, WITH_POSITIVENESS=True,
                  THRESHOLD=False, BLOCK_B=block_b, BLOCK_D=block_d,
                  BLOCK_DW=block_dw, GATHER_STAGES=3, RANKED=ranked)
    ptrs = dict(cand_ptr="i64", sub_ptr="fp32", q_ptr="bf16", bank_ptr="bf16",
                online_ptr="bf16", exclude_ptr="i64", idx_ptr="i64", val_ptr="bf16",
                pos_ptr="fp32")
    ck = sm.compile_for_sm90(kk._knn_topk_merge_kernel, consts, ptrs, num_warps=warps,
                             num_stages=2, unit_strides=("stride_qd", "stride_bd", "stride_od",
                                                         "stride_ee"))
    instrs, labels = sm.disassemble(ck.asm["cubin"])
    spans = sm.find_loops(instrs, labels)

    def inside(s, o):
        return s != o and o[0] <= s[0] and s[1] <= o[1]

    def loads(s):
        return any(op.startswith("LDG") for a, op, _ in instrs if s[0] <= a <= s[1])

    # The fill (taken only when a row runs short of eligible rows) is the loop that holds a
    # loop and no loads. ptxas lays part of its body out after the code that follows it,
    # so back-edges from there make spans that wrap the winners' gather and the softmax:
    # only loops holding no other loop count, those inside the fill not at all.
    fill = [s for s in spans if any(inside(o, s) for o in spans) and not loads(s)]
    top = [s for s in spans if not any(inside(o, s) for o in spans)
           and not any(inside(s, f) for f in fill)]
    # Loops with loads, in code order: the walk over the splits' lists (K rounds), the
    # refine's gather (D / BLOCK_D trips), the winners' gather (D / BLOCK_DW trips).
    load_trips = [K, triton.cdiv(D, block_d), triton.cdiv(D, block_dw)]
    res = gm.resource_usage(ck.asm["cubin"])
    occ = gm.occupancy(res["regs"], ck.metadata.shared, res["static_shared"], warps)
    ctas = triton.cdiv(B, block_b)
    per_sm = math.ceil(ctas / gm.SMS)
    k = max(1, min(occ["ctas_per_sm"], per_sm))
    # The code outside the loops (the loads of the lists' heads and of the subgroup maxima,
    # the selections when they are ranked instead of taken in rounds, the softmax), run
    # once per program from a cold start, k programs sharing an SM.
    straight = [(a, op, t) for a, op, t in instrs
                if not any(lo <= a <= hi for lo, hi in top + fill)]
    _, cold, _ = gm.run_sm(lambda j, i: straight, k, warps, 4096 * gm.TENSOR_SUSTAINED,
                           trips=1)
    once = max(c.t for c in cold)
    clk = math.ceil(per_sm / k) * once
    loops, gathers = [], 0
    for lo, hi in top:
        body = [(a, op, t) for a, op, t in instrs if lo <= a <= hi]
        if loads((lo, hi)):
            trips = load_trips[min(gathers, len(load_trips) - 1)]
            gathers += 1
        else:
            trips = K  # a selection: K rounds of max
        per_trip = gm.run_sm(lambda j, i, body=body: body, k, warps, 4096 * gm.TENSOR_SUSTAINED,
                             trips=6)[0]
        loops.append((trips, round(per_trip)))
        clk += math.ceil(per_sm / k) * trips * per_trip
    hbm = B * K * (plan.sub_rows + 1) * D * BF16 + B * K * (8 + 4 * subgroups)
    t = max(clk / gm.CLOCK_HZ, hbm / gm.HBM_BW)
    return t, dict(block_b=block_b, ctas=ctas, ctas_per_sm=k, loops=loops,
                   straight=(len(straight), round(once)), ranked=ranked, hbm_mb=hbm / 1e6)


def model_shape(B, N, D, K, *, launch=False, verbose=False):
    plan = kk.search_plan(B, N, D, K)
    t_split, split = split_time(B, N, D, K, plan, verbose=verbose)
    t_merge, merge = merge_time(B, D, K, plan, split["splits"])
    t_ours = t_split + t_merge + (2 * LAUNCH_US * 1e-6 if launch else 0.0)
    base = torch_baseline(B, N, D, K, launch)
    slots = split["layout"].stored_slots
    extra_mb = B * split["splits"] * (K * 8 + slots * 4 * plan.group_rows // plan.sub_rows) / 1e6
    return dict(shape=(B, N, D, K), plan=plan, split=split, merge=merge, t_split=t_split,
                t_merge=t_merge, t_ours=t_ours, torch=base, ratio=base["time_s"] / t_ours,
                extra_mb=extra_mb)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", action="append", help="B,N,D,K (default: the six study shapes)")
    p.add_argument("--launch", action="store_true", help="add 2 us per kernel launch")
    p.add_argument("--verbose", action="store_true", help="print every split config")
    a = p.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split(",")) for s in a.shape] if a.shape else SHAPES
    print("| B, N, D, K | G, SUB | split config (BB, warps, stages) | splits x rows | mix bound "
          "| est. split | merge | TFLOP/s | limiter | extra MB | torch est. | torch / snclr |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for shape in shapes:
        r = model_shape(*shape, launch=a.launch, verbose=a.verbose)
        rows.append(r)
        s, k = r["split"], r["split"]["k"]
        print(f"| {', '.join(map(str, r['shape']))} | {r['plan'].group_rows}, "
              f"{r['plan'].sub_rows} | {s['cfg']} | {s['splits']} x {s['rows']} | "
              f"{s['a']['mix_as_is']['bound']:.2f} | {r['t_split'] * 1e3:.3f} ms | "
              f"{r['t_merge'] * 1e3:.3f} ms | {k['tflops']:.0f} | {k['limiter']} | "
              f"{r['extra_mb']:.1f} | {r['torch']['time_s'] * 1e3:.3f} ms | {r['ratio']:.2f} |",
              flush=True)
    return rows


if __name__ == "__main__":
    main()
