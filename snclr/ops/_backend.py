"""Which implementation an op's device kernel runs: the reference or the Triton kernels.

Every ``torch.ops.snclr.*`` op registers its kernel with the dispatcher for the CPU and CUDA
device types (``DEVICE_TYPES``) and has a ``backend`` string in its schema: ``"auto"`` runs
the reference for CPU tensors and Triton for CUDA tensors, ``"torch"`` always the reference,
``"triton"`` always the kernels (for CPU tensors only under ``TRITON_INTERPRET=1``). float64
inputs always run the reference, which is exact; the kernels accumulate in fp32. The Triton
kernel modules are imported only when a kernel runs Triton, so the package imports and runs
its CPU path without triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from snclr.kernels._common import interpreted

__all__ = ["BACKENDS", "DEVICE_TYPES", "check_backend", "resolve_backend", "triton_available"]

BACKENDS = ("auto", "torch", "triton")
# The device types each op registers a kernel for; the dispatcher refuses the others.
DEVICE_TYPES = ("cpu", "cuda")


def triton_available() -> bool:
    """Whether ``import triton`` works (it is a Linux-only dependency)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_backend(backend: object, device: torch.device) -> None:
    """A known backend name, and ``"triton"`` only where the kernels can run on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and device.type != "cuda" and not interpreted():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device}) "
            "or TRITON_INTERPRET=1 set before snclr is imported"
        )


def resolve_backend(backend: str, *tensors: Tensor) -> str:
    """``"torch"`` or ``"triton"``: what a device kernel runs for these inputs.

    ``"auto"`` is Triton for CUDA tensors when triton is installed, and the reference
    elsewhere. float64 inputs always run the reference: the kernels accumulate in fp32 and
    would silently drop the precision asked for.

    Raises:
        ValueError: an unknown backend, or ``"triton"`` on CPU tensors without the interpreter.
        ImportError: ``"triton"`` forced where triton is not installed.
    """
    device = tensors[0].device
    check_backend(backend, device)
    if backend == "torch" or any(t.dtype == torch.float64 for t in tensors):
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise ImportError(
            "backend='triton' needs the triton package, which is not installed (it ships for "
            "Linux only); backend='torch' or 'auto' runs the pure-PyTorch reference"
        )
    return "triton"
