"""The exceptions the program raises on purpose, below every module that raises them.

The command line maps each to an exit status (:mod:`snclr.training.cli`): :class:`ConfigError` is a
refusal found before the run folder changes (exit 2), :class:`TrainingDiverged` a run that
stopped on non-finite values (exit 3). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError", "TrainingDiverged"]


class ConfigError(ValueError):
    """A bad configuration or input; the command line prints it as one line and exits 2."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or weights: the run stopped, the last good checkpoint is kept.

    Every rank raises it at the same step (the values tested are reduced over ranks).
    """
