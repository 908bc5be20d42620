"""What the kernel files share: the interpreter switch, the norm eps, the dot precision.

No kernel lives here; nothing runs at import.
"""

from __future__ import annotations

import os

import torch

__all__ = ["NORM_EPS", "input_precision", "interpreted"]

# F.normalize's default eps: every normalisation, forward or backward, divides by
# max(||x||, NORM_EPS).
NORM_EPS = 1e-12
_TRUE = ("1", "true", "yes", "on", "y")


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET`` set true).

    Read from the environment as Triton reads it (not through ``triton.knobs``, whose C
    getter ``torch.compile`` cannot trace); it must be set before the kernels are defined.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: fp32 inputs follow ``torch.get_float32_matmul_precision()``.

    "highest" asks for IEEE fp32 (no tensor cores); anything else allows tf32. 16-bit inputs
    ignore the setting.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"
