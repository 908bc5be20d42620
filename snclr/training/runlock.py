"""An exclusive lock on a run folder for the whole of a run (one snclr process per folder).

The lock is an ``fcntl.flock`` on the folder itself (no lock file is left behind); the
kernel releases it when the process exits, however it ends.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from snclr.training.errors import ConfigError

__all__ = ["acquire", "release"]

_held: dict[str, int] = {}


def acquire(run_dir: Path) -> None:
    """Lock ``run_dir`` (idempotent in one process).

    Raises:
        ConfigError: another process holds the lock (one line).
    """
    key = os.path.realpath(run_dir)
    if key in _held:
        return
    fd = os.open(key, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"another snclr process is using {str(run_dir)!r}; wait for it to "
                          "finish or choose another --output-dir") from None
    _held[key] = fd


def release(run_dir: Path) -> None:
    """Unlock ``run_dir`` if this process holds it."""
    fd = _held.pop(os.path.realpath(run_dir), None)
    if fd is not None:
        os.close(fd)
