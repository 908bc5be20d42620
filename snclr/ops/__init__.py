"""The public ops: validation, backend dispatch and autograd around the kernels.

``backend="auto"`` runs the Triton kernels on CUDA tensors and the pure-PyTorch
references (``snclr.reference``) elsewhere; ``"torch"`` always runs the reference and
``"triton"`` forces the kernels (on CPU only under ``TRITON_INTERPRET=1``). float64 inputs
always run the reference, which is exact; the kernels accumulate in fp32.
"""

# One module per op; importing them registers the torch.ops.snclr.* custom ops.
from snclr.ops.knn_topk import knn_topk
from snclr.ops.soft_neighbors import SoftNeighbors, soft_neighbors
from snclr.ops.soft_target_contrastive_loss import soft_target_contrastive_loss

__all__ = ["SoftNeighbors", "knn_topk", "soft_neighbors", "soft_target_contrastive_loss"]
