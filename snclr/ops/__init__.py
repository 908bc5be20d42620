"""The public ops: validation, backend dispatch and autograd around the kernels.

``backend="auto"`` runs the Triton kernels on CUDA tensors and the pure-PyTorch
references (``snclr.reference``) elsewhere; ``"torch"`` always runs the reference and
``"triton"`` forces the kernels (on CPU only under ``TRITON_INTERPRET=1``). float64 inputs
always run the reference, which is exact; the kernels accumulate in fp32.
"""

from snclr.ops.contrastive import soft_target_contrastive_loss
from snclr.ops.knn import SoftNeighbors, knn_topk, soft_neighbors

__all__ = ["SoftNeighbors", "knn_topk", "soft_neighbors", "soft_target_contrastive_loss"]
