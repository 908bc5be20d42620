"""The training program: the ``snclr`` command and everything it needs to pretrain, evaluate
and compare runs on folders of images.

The library (:mod:`snclr`, :mod:`snclr.ops`, ...) never imports from here. The program needs
the ``train`` extra (``pip install 'snclr[train]'``); :func:`main` says so in one line when a
piece of it is missing, instead of an import traceback.
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["main"]

# Import names of the ``train`` extra in pyproject.toml.
PROGRAM_DEPENDENCIES = ("torchvision", "timm", "numpy", "yaml", "tqdm", "matplotlib", "PIL")


def _importable(name: str) -> bool:
    if name in sys.modules:  # None there means the import is blocked
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_dependencies() -> list[str]:
    """The program's dependencies that cannot be imported here."""
    return [name for name in PROGRAM_DEPENDENCIES if not _importable(name)]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``snclr`` command; returns the exit status."""
    missing = missing_dependencies()
    if missing:
        print(f"snclr: error: the snclr command needs the training extras (missing: "
              f"{', '.join(missing)}); install them with: pip install 'snclr[train]'",
              file=sys.stderr)
        return 2
    from snclr.training.cli import main as run_command

    return run_command(argv)
