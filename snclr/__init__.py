"""snclr: fast soft-neighbour contrastive self-supervised learning (SNCLR).

The model, the queue and the module loss are importable from the top level; the ops live in
``snclr.ops``, the functional loss in ``snclr.functional``. The top-level names load on first
use, so ``import snclr.ops`` loads the ops alone.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from snclr.bank import MemoryBank
    from snclr.loss import SoftNeighborLoss
    from snclr.model import SNCLR, SNCLROutput, create_model

__version__ = "0.1.0"
__all__ = ["SNCLR", "MemoryBank", "SNCLROutput", "SoftNeighborLoss", "__version__",
           "create_model"]

_HOMES = {"MemoryBank": "snclr.bank", "SNCLR": "snclr.model", "SNCLROutput": "snclr.model",
          "SoftNeighborLoss": "snclr.loss", "create_model": "snclr.model"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'snclr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
