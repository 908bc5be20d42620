"""Compile Triton kernels for an H200 (sm_90) target without a GPU, for the kernel tests.

The interpreter the CPU tests run under accepts code that the GPU compiler rejects; this
compiles (no launch) in a fresh process without ``TRITON_INTERPRET``, down to a cubin.
"""

import os
import shutil
import subprocess
import sys

import pytest

# Defines build(fn, dtypes, constexprs, num_warps, num_stages) -> compiled kernel and
# local_memory_ops(kernel) in the child process.
_PRELUDE = r'''
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Inner strides that a real launch specialises to 1.
UNIT_STRIDES = ("stride_qd", "stride_bd", "stride_od", "stride_ee", "stride_cd", "stride_xd")

def build(fn, dtypes, constexprs, num_warps=4, num_stages=3):
    # Unit inner strides are specialised and ints aligned to 16, as in a real launch.
    consts = dict({n: 1 for n in UNIT_STRIDES}, **constexprs)
    sig = {n: "constexpr" if n in consts
           else dtypes.get(n, "*fp32" if n.endswith("_ptr") else "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n][0] == "*" or (sig[n] == "i32" and (n.startswith("stride") or n == "D"))}
    consts = {n: v for n, v in consts.items() if n in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))

def local_memory_ops(kernel, *, loops_only=False):
    # Spills show as local loads and stores (LDL / STL) in the SASS. With loops_only, only
    # those inside a loop count (from a label to the branch back to it): a spill in the
    # prologue or epilogue costs a few instructions once.
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
    lines = sass.splitlines()
    local = [i for i, line in enumerate(lines) if re.search(r"\b(LDL|STL)\b", line)]
    if not loops_only:
        return len(local)
    labels = {m.group(1): i for i, line in enumerate(lines)
              if (m := re.match(r"\s*(\.L_x_\d+):", line))}
    spans = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line))
             and labels.get(m.group(1), i + 1) < i]
    return sum(1 for i in local if any(lo <= i <= hi for lo, hi in spans))
'''


def compile_for_sm90(body: str) -> None:
    """Run ``body`` (calls to ``build``, then ``print("compiled")``) in a child process."""
    triton = pytest.importorskip("triton")
    backends = getattr(getattr(triton, "backends", None), "backends", {})
    if "nvidia" not in backends or not shutil.which(
        "ptxas", path=os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    ):
        pytest.skip("this Triton build cannot target CUDA (no nvidia backend or ptxas)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _PRELUDE + body], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-4000:]
