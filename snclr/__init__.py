"""snclr: fast soft-neighbour contrastive self-supervised learning (SNCLR).

The model and queue are importable from the top level; the ops live in ``snclr.ops``, the
loss in ``snclr.functional``. The top-level names load on first use, so that
``import snclr.ops`` loads the ops alone (not the model, the bank or the program).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["MemoryBank", "SNCLR", "SNCLROutput", "create_model", "__version__"]

# Top-level name -> the module that defines it.
_LAZY = {"MemoryBank": "snclr.bank", "SNCLR": "snclr.model", "SNCLROutput": "snclr.model",
         "create_model": "snclr.model"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'snclr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
