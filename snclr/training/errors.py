"""The exceptions the program raises on purpose, below every module that raises them.

The command line maps each to an exit status (:mod:`snclr.training.cli`): :class:`ConfigError` is a
refusal found before the run folder changes (exit 2), :class:`TrainingDiverged` a run that
stopped on non-finite values and :class:`WriteFailed` one that could not write its files (exit
3), :class:`Interrupted` a run stopped by Ctrl-C or SIGTERM (exit 128 + the signal: 130, 143).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal

__all__ = ["ConfigError", "Interrupted", "TrainingDiverged", "UnreadableImages", "WriteFailed"]


class ConfigError(ValueError):
    """A bad configuration or input; the command line prints it as one line and exits 2."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or weights: the run stopped, the last good checkpoint is kept.

    Every rank raises it at the same step (the values tested are reduced over ranks).
    """


class WriteFailed(RuntimeError):
    """A run folder's file could not be written (a full disk, a quota, a file size limit).

    The temporary file is removed, so the previous version of the file (and the last good
    checkpoint) stays; the command line prints one line and exits 3.
    """


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped a command; ``str()`` says where and what was kept.

    A KeyboardInterrupt, so whatever lets Ctrl-C through (DataLoader workers, torch) does the
    same with SIGTERM.
    """

    def __init__(self, signum: int = signal.SIGINT, message: str = "") -> None:
        super().__init__(message)
        self.signum = signum
        self.message = message

    @classmethod
    def of(cls, err: KeyboardInterrupt, message: str) -> Interrupted:
        """``err`` (a plain Ctrl-C or an Interrupted) restated with ``message``."""
        return cls(getattr(err, "signum", signal.SIGINT), message)


class UnreadableImages(RuntimeError):
    """More image files failed to decode than ``max_bad_images`` allows: the run stopped
    (exit 3, like a diverged run; the last checkpoint is kept).

    Every rank raises it at the same step (the files found are gathered over ranks).
    """
