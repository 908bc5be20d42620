"""The public ops: validation, custom-op registration and autograd around the kernels.

Every op is a ``torch.ops.snclr.*`` custom op with a CPU kernel (the pure-PyTorch reference,
``snclr.reference``) and a CUDA kernel (Triton), chosen by the dispatcher from the inputs'
device, so ``torch.ops``, ``torch.compile`` and ``torch.export`` work on either. The public
functions' ``backend=`` travels in the op's schema and overrides the choice: ``"torch"``
always runs the reference, ``"triton"`` the kernels (on CPU only under
``TRITON_INTERPRET=1``). float64 inputs always run the reference, which is exact; the kernels
accumulate in fp32. triton is imported only when a kernel runs it (``snclr.ops._backend``).
"""

# One module per op; importing them registers the torch.ops.snclr.* custom ops.
from snclr.ops.knn_topk import knn_topk
from snclr.ops.soft_neighbors import SoftNeighbors, soft_neighbors
from snclr.ops.soft_target_contrastive_loss import soft_target_contrastive_loss

__all__ = ["SoftNeighbors", "knn_topk", "soft_neighbors", "soft_target_contrastive_loss"]
