"""snclr: fast soft-neighbour contrastive self-supervised learning (SNCLR).

The model and queue are importable from the top level; the ops live in ``snclr.ops``, the
loss in ``snclr.functional``.
"""

from snclr.bank import MemoryBank
from snclr.model import SNCLR, SNCLROutput, create_model

__version__ = "0.1.0"
__all__ = ["MemoryBank", "SNCLR", "SNCLROutput", "create_model", "__version__"]
