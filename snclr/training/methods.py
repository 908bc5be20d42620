"""What each registered method fixes or never reads, for validation, comparisons and reports.

The library states the facts (:data:`snclr.model.METHODS`, the options a method sets, and
:data:`snclr.functional.ATTENTION_OPTIONS`, the options an attention reads); this module
turns them into the program's questions: which K runs, and which options a comparison
could vary for a method without changing anything.
"""

from __future__ import annotations

from snclr.functional import ATTENTION_OPTIONS
from snclr.model import METHODS

__all__ = ["fixed_options", "num_neighbors_used"]

# The options that only matter through the positiveness weights.
_WEIGHT_OPTIONS = ("attention_temperature", "threshold", "detach_positiveness")


def _options(method: str) -> dict:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method]


def fixed_options(method: str) -> dict[str, str]:
    """The SNCLR options a method sets itself or never reads: ``{option: why}``.

    A comparison that varied one of these for the method would vary nothing.

    Example:
        >>> fixed_options("mocov3")["num_neighbors"]
        'mocov3 fixes num_neighbors=0'
    """
    options = _options(method)
    fixed = {name: f"{method} fixes {name}={value}" for name, value in options.items()
             if name != "attention"}
    if options.get("num_neighbors", 1) == 0:
        unread = (*_WEIGHT_OPTIONS, "exclude_self_neighbors")
        reason = f"{method} has no neighbours (K=0)"
    else:
        attention = options.get("attention", "cosine")
        unread = tuple(name for name in _WEIGHT_OPTIONS
                       if name not in ATTENTION_OPTIONS[attention])
        reason = f"{method}'s {attention} attention does not use it"
    return {**fixed, **{name: reason for name in unread}}


def num_neighbors_used(method: str, num_neighbors: int) -> int:
    """K as a method runs it: its own when it fixes K (``mocov3`` 0, ``nnclr`` 1), else
    ``num_neighbors``.

    Example:
        >>> num_neighbors_used("mocov3", 5), num_neighbors_used("nnclr", 5)
        (0, 1)
    """
    return _options(method).get("num_neighbors", num_neighbors)
