"""The exceptions the program raises on purpose, below every module that raises them.

The command line maps each to an exit status (:mod:`snclr.training.cli`): :class:`ConfigError` is a
refusal found before the run folder changes (exit 2), :class:`TrainingDiverged` a run that
stopped on non-finite values (exit 3). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError", "TrainingDiverged", "UnreadableImages"]


class ConfigError(ValueError):
    """A bad configuration or input; the command line prints it as one line and exits 2."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or weights: the run stopped, the last good checkpoint is kept.

    Every rank raises it at the same step (the values tested are reduced over ranks).
    """


class UnreadableImages(RuntimeError):
    """More image files failed to decode than ``max_bad_images`` allows: the run stopped
    (exit 3, like a diverged run; the last checkpoint is kept).

    Every rank raises it at the same step (the files found are gathered over ranks).
    """
