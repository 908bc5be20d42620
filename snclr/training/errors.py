"""The exceptions the program raises on purpose, below every module that raises them.

The command line maps each to an exit status (:mod:`snclr.training.cli`): :class:`ConfigError` is a
refusal found before the run folder changes (exit 2), :class:`TrainingDiverged` a run that
stopped on non-finite values, :class:`UnreadableImages` one that met too many unreadable
images, :class:`DataFileVanished` one whose data file disappeared and :class:`WriteFailed`
one that could not write its files (exit 3), :class:`Interrupted` a run stopped by Ctrl-C or
SIGTERM (exit 128 + the signal: 130, 143). Anything else is a bug and keeps its traceback.

Below them, what keeps every such message one short line: :func:`shown` (a user's value as
a repr of at most 80 characters with its type) and :func:`check_path` (a path no file
system takes is refused before any file call fails on it).
"""

from __future__ import annotations

import os
import reprlib
import signal

__all__ = ["ConfigError", "DataFileVanished", "Interrupted", "TrainingDiverged",
           "UnreadableImages", "WriteFailed", "check_path", "clip", "short_repr", "shown"]

SHOWN_CHARS = 80  # a user value in a message: at most this many characters of its repr
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = SHOWN_CHARS
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 2, 4, 4
# repr() of an int past 4300 digits raises (Python's int-to-string limit): give its size.
_MAX_SHOWN_BITS = 256


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


class DataFileVanished(RuntimeError):
    """A data file that was checked at the start is gone mid-run (deleted, unmounted).

    Raised in a DataLoader worker, it reaches the main process rebuilt by torch from the
    worker's traceback text, whose last line is the original message: that line is kept.
    """

    def __init__(self, message: str) -> None:
        lines = [line for line in str(message).splitlines() if line.strip()]
        last = lines[-1] if lines else str(message)
        super().__init__(last.split(f"{type(self).__name__}: ", 1)[-1])


def clip(text: str) -> str:
    """``text`` cut to :data:`SHOWN_CHARS` characters (``...`` marks a cut)."""
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def short_repr(value: object) -> str:
    """A repr of at most :data:`SHOWN_CHARS` characters, whatever the value (a 10 MB
    string, a list expanded from YAML aliases, a 5000-digit integer)."""
    if isinstance(value, int) and value.bit_length() > _MAX_SHOWN_BITS:
        return f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
    return clip(_REPR.repr(value))


def shown(value: object) -> str:
    """A user's value for a one-line message: its :func:`short_repr` and type name.

    Example:
        >>> shown("fast"), shown(True), shown(list(range(1000)))
        ("'fast' (str)", 'True (bool)', '[0, 1, 2, 3, ...] (list)')
    """
    return f"{short_repr(value)} ({type(value).__name__})"


# Longer names fail in every file call with ENAMETOOLONG (Linux, macOS and Windows file
# systems alike allow 255 bytes a name; Linux 4096 a path).
MAX_NAME_BYTES, MAX_PATH_BYTES = 255, 4095


def check_path(option: str, path: str | os.PathLike) -> None:
    """Refuse a path with a name or a total length no file system takes (ConfigError)."""
    raw = os.fsencode(path)
    longest = max(raw.split(b"/"), key=len)
    if len(longest) > MAX_NAME_BYTES or len(raw) > MAX_PATH_BYTES:
        what = (f"a name of {len(longest)} bytes (at most {MAX_NAME_BYTES})"
                if len(longest) > MAX_NAME_BYTES
                else f"{len(raw)} bytes (at most {MAX_PATH_BYTES})")
        raise ConfigError(f"{option} {short_repr(os.fsdecode(raw))} is too long: {what}")
