"""What the kernel files share: the interpreter switch, the norm eps, the dot precision.

No kernel lives here; nothing runs at import.
"""

from __future__ import annotations

import os

import torch

__all__ = ["CHUNK_D", "NORM_EPS", "input_precision", "interpreted", "one_pass_block_d"]

# F.normalize's default eps: every normalisation, forward or backward, divides by
# max(||x||, NORM_EPS).
NORM_EPS = 1e-12
_TRUE = ("1", "true", "yes", "on", "y")
# Rows up to this many bytes (D = 256 in 16 bits, 128 in fp32) are kept resident as one
# block and scored with one dot per tile; wider ones in CHUNK_D slices.
MAX_ONE_PASS_BYTES = 512
CHUNK_D = 64


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


def one_pass_block_d(width: int, itemsize: int) -> int:
    """The feature block of a row-block x tile dot: the padded width when a row of it fits
    in ``MAX_ONE_PASS_BYTES`` (the block is loaded once), else ``CHUNK_D`` slices."""
    padded = max(16, 1 << (width - 1).bit_length())
    return padded if padded * itemsize <= MAX_ONE_PASS_BYTES else CHUNK_D
