"""A run folder's files: atomic writes, stale temporary files, and what marks a snclr run.

Every file that must never be seen half-written (``checkpoint.pt``, ``config.yaml``, a
rewritten ``metrics.jsonl``, a compare cell's ``cell.json``) is written by
:func:`write_atomically`: to ``NAME.snclr-<pid>.tmp`` beside it, fsynced, renamed over NAME,
then the folder is fsynced. After a power loss NAME is the old file or the new one. The
temporary name is unique to the process, so two processes never share one. A write that
fails (a full disk, a quota, a file size limit: any ``OSError``) or is interrupted removes
its temporary file; the failure is one :class:`~snclr.training.errors.WriteFailed` line. A
SIGKILL cannot remove it, so the process that next holds the folder's lock
(:mod:`snclr.training.runlock`) removes the stale ones (:func:`remove_stale`).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import IO

import yaml

from snclr.training.config import Config
from snclr.training.errors import ConfigError, WriteFailed

__all__ = ["check_run_folder", "is_run_folder", "remove_stale", "sync_folder",
           "write_atomically", "write_failed", "write_text_atomically"]

# Ours only: NAME.snclr-<pid>.tmp, a checkpoint's .NAME.<pid>.link (keep_last), and the fixed
# names earlier versions used.
_STALE = re.compile(r".+\.snclr-\d+\.tmp|\..+\.pt\.\d+\.link"
                    r"|(checkpoint\.pt|metrics\.jsonl|cell\.json)\.tmp")


def write_failed(path: Path, err: BaseException) -> WriteFailed | None:
    """A :class:`WriteFailed` naming ``path`` if ``err`` is (or wraps) an ``OSError``.

    ``torch.save`` reports a failed write as a RuntimeError raised while handling the OSError.
    """
    seen = err
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    if seen is None or not isinstance(err, Exception):
        return None
    return WriteFailed(f"cannot write {str(path)!r} ({seen.strerror or type(seen).__name__})")


def write_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file and an atomic rename.

    Raises:
        WriteFailed: an OSError while writing (the temporary file is removed, ``path`` is
            unchanged).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.snclr-{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:  # Ctrl-C too: never leave a partial file behind
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        failed = write_failed(path, err)
        if failed is None:
            raise
        raise failed from None
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """fsync ``folder``: a rename in it is durable once its folder is."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda f: f.write(text.encode()))


def remove_stale(folder: Path) -> list[str]:
    """Remove the temporary files a killed write left in ``folder``; their names.

    Call it only while holding the folder's lock: then no live write of ours is in it.
    """
    removed = []
    for entry in sorted(Path(folder).iterdir()):
        if _STALE.fullmatch(entry.name) and entry.is_file():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
            removed.append(entry.name)
    return removed


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` is a snclr run: it holds ``checkpoint.pt``, or a ``config.yaml``
    that is a snclr config (a mapping whose keys are all config fields), as ``pretrain``
    writes before anything else."""
    folder = Path(folder)
    if (folder / "checkpoint.pt").exists():
        return True
    try:
        saved = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    names = {field.name for field in fields(Config)}
    return isinstance(saved, dict) and bool(saved) and set(saved) <= names


def check_run_folder(text: str, *, option: str = "output_dir") -> Path:
    """``text`` as a run folder: not empty, and new, empty or a snclr run.

    Raises:
        ConfigError: an empty name (it would be the working directory), or an existing
            non-empty folder that is not a snclr run (its files would be overwritten).
    """
    if not str(text).strip():
        raise ConfigError(f"{option} is empty; name a run folder (e.g. runs/demo)")
    folder = Path(text)
    if folder.is_dir() and any(folder.iterdir()) and not is_run_folder(folder):
        raise ConfigError(f"{option} {str(folder)!r} holds files but is not a snclr run (no "
                          "checkpoint.pt or snclr config.yaml); choose a new or empty folder")
    return folder
