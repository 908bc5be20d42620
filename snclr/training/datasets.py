"""Readers of image data on disk: the data sets snclr knows by name, and image folders.

Nothing here downloads, and no file can run code. Binary distributions are read as raw
bytes; the pickled ones (the CIFAR "python version", Animal-MNIST) go through an unpickler
that rebuilds numpy arrays and plain containers only, and refuses anything else.

- ``animal-mnist``: the ``animal_mnist`` package's pickled arrays (one set, no split).
- ``cifar10:DIR`` / ``cifar100:DIR``: the extracted official archives, binary
  (``cifar-10-batches-bin/``, ``cifar-100-binary/``) or python (``cifar-10-batches-py/``,
  ``cifar-100-python/``) version, in DIR or DIR itself being that folder. CIFAR-100 uses
  the 100 fine labels.
- ``stl10:DIR``: ``stl10_binary/`` (``train_X.bin``, ``train_y.bin``, ``test_X.bin``,
  ``test_y.bin``), and the 100,000 unlabelled images of ``unlabeled_X.bin`` when it is there.
- an image folder: every file with an image extension is checked cheaply before anything
  runs (it exists and its image header gives a format and a size), in threads, and the
  result is cached, keyed by every file's name, size and modification time. A file that
  fails to decode later is counted and skipped by the training loop. ``check="decode"``
  decodes every file up front instead (JPEGs at 1/8 scale) and refuses any failure.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import io
import json
import os
import pickle
import struct
import sys
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from snclr.training.errors import ConfigError

__all__ = ["CHECKS", "DECODE_ERRORS", "NAMED_DATASETS", "ArraySplits", "FolderScan", "bad_budget",
           "error_reason", "has_images", "read_named", "scan_cache_dir", "scan_folder",
           "scan_unlabelled"]

NAMED_DATASETS = ("animal-mnist", "cifar10:DIR", "cifar100:DIR", "stl10:DIR")
INSTALL_HINT = "pip install --no-deps animal-mnist==0.4"
CHECK_CHUNK = 4096  # files handed to the thread pool at a time


@dataclass(frozen=True)
class ArraySplits:
    """uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)`` per split.

    ``splits`` has ``"train"`` and ``"test"``, or only ``"all"`` when the data set ships no
    split (the caller splits it); ``"unlabelled"`` images (labels -1) may come with them.
    """

    splits: dict[str, tuple[Tensor, Tensor]]
    num_classes: int


class _ArraysOnlyUnpickler(pickle.Unpickler):
    # What pickled numpy arrays need (protocol 2 from Python 3 encodes bytes with
    # _codecs.encode, protocol 5 rebuilds arrays with _frombuffer); dicts, lists, strings and
    # numbers are built by pickle opcodes and need nothing. Anything else could run code.
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it holds a {module}.{name} object, not only arrays")
        return super().find_class(module, name)


def _unpickle(data: bytes, source: str):
    """Unpickle arrays and containers only (latin1 reads the Python 2 pickles of CIFAR)."""
    try:
        return _ArraysOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:120]
        raise ConfigError(f"refused to read {source}: {reason}") from None


# ---------------------------------------------------------------------------- named sets


def read_named(name: str, root: str | None) -> ArraySplits:
    """The arrays of a named data set (``root``: the DIR of ``name:DIR``; None for built-ins).

    Raises:
        ConfigError: unknown name, missing package or files, files of the wrong size or
            content (one line).
    """
    if name == "animal-mnist":
        return _animal_mnist()
    if root is None or not root:
        raise ConfigError(f"data set {name!r} needs its folder: --data {name}:DIR")
    folder = Path(root)
    if not folder.is_dir():
        raise ConfigError(f"data set {name}:{root}: {root!r} is not a directory")
    if name in _CIFAR:
        return _cifar(name, folder)
    if name == "stl10":
        return _stl10(folder)
    raise ConfigError(f"unknown data set {name!r}; choose one of {', '.join(NAMED_DATASETS)}")


def _animal_mnist() -> ArraySplits:
    try:
        root = importlib.resources.files("animal_mnist") / "data" / "Animal_MNIST"
    except ModuleNotFoundError:
        raise ConfigError(
            f"dataset 'animal-mnist' is not installed; install it with: {INSTALL_HINT}") from None
    images_file = root / "animal_data_version_3.gz"
    labels_file = root / "animal_label_version_3.gz"
    if not (images_file.is_file() and labels_file.is_file()):
        raise ConfigError(
            f"dataset files of 'animal-mnist' are missing; reinstall with: {INSTALL_HINT}")

    def read(resource) -> np.ndarray:
        with resource.open("rb") as raw, gzip.open(raw) as f:
            return np.asarray(_unpickle(f.read(), f"animal-mnist file {resource.name}"))

    images = read(images_file)  # (10000, 28, 28) uint8
    labels = read(labels_file)  # (10000,) int64
    images_t = torch.from_numpy(images.astype(np.uint8)).unsqueeze(1)
    labels_t = torch.from_numpy(labels.astype(np.int64))
    return ArraySplits({"all": (images_t, labels_t)}, num_classes=10)


# name -> (binary folder, python folder, train files, test files, label bytes, label key, classes)
_CIFAR = {
    "cifar10": ("cifar-10-batches-bin", "cifar-10-batches-py",
                [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], 1, "labels", 10),
    "cifar100": ("cifar-100-binary", "cifar-100-python",
                 ["train"], ["test"], 2, "fine_labels", 100),
}
_CIFAR_PIXELS = 3 * 32 * 32


def _cifar(name: str, root: Path) -> ArraySplits:
    bin_dir, py_dir, train, test, label_bytes, label_key, classes = _CIFAR[name]
    # The archive's folder inside DIR, or DIR itself; the binary version first.
    candidates = ((root / bin_dir, True), (root / py_dir, False), (root, True), (root, False))
    for folder, binary in candidates:
        if all((folder / (f + ".bin" if binary else f)).is_file() for f in train + test):
            break
    else:
        raise ConfigError(
            f"data set {name}:{root}: no {bin_dir}/ or {py_dir}/ with {', '.join(train + test)} "
            "in it (extract the official archive there; nothing is downloaded)"
        )
    read = _cifar_binary if binary else _cifar_python
    splits = {}
    for split, names in (("train", train), ("test", test)):
        parts = [read(folder / (f + ".bin" if binary else f), label_bytes, label_key)
                 for f in names]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise ConfigError(f"data set {name}:{root}: labels outside 0..{classes - 1} in the "
                              f"{split} files")
        splits[split] = (torch.from_numpy(images), torch.from_numpy(labels))
    return ArraySplits(splits, num_classes=classes)


def _cifar_binary(path: Path, label_bytes: int, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    # Each record: label byte(s) (CIFAR-100: coarse, fine), then 1024 R, 1024 G, 1024 B.
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + _CIFAR_PIXELS
    if raw.size == 0 or raw.size % record:
        raise ConfigError(f"{str(path)!r} is not a CIFAR binary file: {raw.size} bytes is not "
                          f"a multiple of the {record}-byte record")
    rows = raw.reshape(-1, record)
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32).copy(), rows[:, label_bytes - 1].copy()


def _cifar_python(path: Path, label_bytes: int, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path.read_bytes(), repr(str(path)))
    data = batch.get("data") if isinstance(batch, dict) else None
    labels = batch.get(label_key) if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != _CIFAR_PIXELS or labels is None or len(labels) != len(data):
        raise ConfigError(f"{str(path)!r} is not a CIFAR python batch: expected 'data' (N, 3072) "
                          f"uint8 and N '{label_key}'")
    return data.reshape(-1, 3, 32, 32).copy(), _integer_labels(labels, path, label_key)


def _integer_labels(labels, path: Path, label_key: str) -> np.ndarray:
    """``labels`` as int64 if they are one integer per image; floats are refused, not
    truncated, and so are strings, booleans and nested lists."""
    try:
        array = np.asarray(labels)
    except (ValueError, TypeError):  # ragged nesting
        array = None
    if array is None or array.ndim != 1 or array.dtype.kind not in "iu":
        kind = "nested" if array is None or array.ndim != 1 else array.dtype.name
        raise ConfigError(f"{str(path)!r} is not a CIFAR python batch: '{label_key}' must be "
                          f"one integer per image, got {kind} values")
    return array.astype(np.int64)


def _stl10(root: Path) -> ArraySplits:
    folder = root / "stl10_binary" if (root / "stl10_binary").is_dir() else root
    pixels = 3 * 96 * 96
    splits = {}
    for split in ("train", "test"):
        x_file, y_file = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
        if not (x_file.is_file() and y_file.is_file()):
            raise ConfigError(f"data set stl10:{root}: no stl10_binary/ with {x_file.name} and "
                              f"{y_file.name} (extract the official archive; nothing is "
                              "downloaded)")
        raw, labels = np.fromfile(x_file, dtype=np.uint8), np.fromfile(y_file, dtype=np.uint8)
        if raw.size == 0 or raw.size != labels.size * pixels:
            raise ConfigError(f"{str(x_file)!r} holds {raw.size} bytes, not {labels.size} 96x96 "
                              f"colour images (one per label in {y_file.name})")
        if labels.min() < 1 or labels.max() > 10:
            raise ConfigError(f"{str(y_file)!r} holds labels outside 1..10")
        # Each image is stored column-major per channel: transpose to (C, H, W).
        images = raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2).copy()
        splits[split] = (torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64) - 1))
    unlabelled = folder / "unlabeled_X.bin"
    if unlabelled.is_file():
        # 2.7 GB: mapped, then copied once into (C, H, W) order.
        raw = np.memmap(unlabelled, dtype=np.uint8, mode="r")
        if raw.size == 0 or raw.size % pixels:
            raise ConfigError(f"{str(unlabelled)!r} holds {raw.size} bytes, not a whole number "
                              "of 96x96 colour images")
        images = torch.from_numpy(raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2).copy())
        splits["unlabelled"] = (images, torch.full((len(images),), -1, dtype=torch.int64))
    return ArraySplits(splits, num_classes=10)


# ---------------------------------------------------------------------------- image folders


@dataclass(frozen=True)
class FolderScan:
    """A checked image folder: ``files[i]`` of class ``labels[i]`` has shorter side ``sides[i]``.

    ``left_out`` holds ``(file, reason)`` of the files whose header could not be read: they
    are not in ``files``.
    """

    files: np.ndarray  # (N,) str
    labels: np.ndarray  # (N,) int64
    sides: np.ndarray  # (N,) int64
    classes: list[str]
    left_out: tuple[tuple[str, str], ...] = ()


DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                 Image.DecompressionBombError)
CHECKS = ("header", "decode")
# Scans cached under SNCLR_CACHE_DIR (default: $XDG_CACHE_HOME/snclr, else ~/.cache/snclr;
# empty: no cache). Bump the version when the cached content changes meaning.
CACHE_ENV = "SNCLR_CACHE_DIR"
_CACHE_VERSION = 1


def error_reason(err: BaseException) -> str:
    """``"Type: first line"`` of an exception, short enough for a one-line message."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:100]}"


def _probe(path: str, decode: bool) -> tuple[int, str | None]:
    """``(shorter side, None)`` for a readable image, ``(0, reason)`` otherwise.

    Without ``decode`` only the header is read (format and size: PIL's lazy open), a few
    hundred bytes; with it the pixels too (JPEGs at 1/8 scale, which still reads every byte).
    """
    try:
        with Image.open(path) as image:
            side = min(image.size)
            if decode:
                image.draft(None, (1, 1))
                image.load()
        return side, None
    except DECODE_ERRORS as err:
        return 0, error_reason(err)


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _class_folders(path: Path) -> list[str]:
    """Sorted names of ``path``'s sub-folders, dot-folders (``.ipynb_checkpoints``) skipped."""
    with os.scandir(path) as entries:
        names = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
    if not names:
        raise FileNotFoundError(f"Couldn't find any class folder in {str(path)}.")
    return names


def _walk_images(top: str, seen_dirs: set[str], seen_files: set[str]) -> list[str]:
    """Image files under ``top`` in ``sorted(os.walk(top))`` order, each real file once.

    Dot-folders and dot-files are skipped, and so is anything that is not a regular file (a
    FIFO named ``x.png`` would block the scan). Directory links are followed unless they lead
    to a folder already walked (a loop such as ``loop -> .``), and a file reached twice
    through links is listed once, so it cannot land in both splits.
    """
    folders: list[tuple[str, list[tuple[str, str]]]] = []
    stack = [top]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen_dirs:
            continue
        seen_dirs.add(real)
        images, subfolders = [], []
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    if entry.is_dir():
                        subfolders.append(entry.path)
                    elif entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS):
                        # Only a link needs realpath (lstat per path component): any other
                        # entry's real path is its name in the folder's real path.
                        images.append((entry.path, os.path.realpath(entry.path)
                                       if entry.is_symlink() else os.path.join(real, entry.name)))
                except OSError:  # a dangling or unreadable link: not an image of the folder
                    continue
        folders.append((folder, sorted(images)))
        stack.extend(sorted(subfolders, reverse=True))
    files = []
    for _, images in sorted(folders):
        for file, real in images:
            if real not in seen_files:
                seen_files.add(real)
                files.append(file)
    return files


def bad_budget(total: int, max_fraction: float) -> int:
    """Unreadable files a data set of ``total`` may hold before a run stops: past this many."""
    return int(max_fraction * total)


def scan_folder(path: Path, classes: list[str] | None = None, *, check: str = "header",
                max_bad_fraction: float = 0.0) -> FolderScan:
    """Class sub-folders of ``path`` (torchvision ``ImageFolder`` order), every file checked.

    Dot-folders, dot-files and non-regular files are skipped, looping directory links are
    not followed, and no real file is counted twice (see :func:`_walk_images`).
    With ``classes`` (train's list), ``path`` is indexed by those classes, so a ``val/``
    lacking one of them keeps train's labels; its sub-folders must be among them.

    ``check="header"`` reads each file's image header only (format and size); a file that
    fails to decode later is the training loop's to skip. Up to
    ``bad_budget(N, max_bad_fraction)`` files with an unreadable header are left out
    (``FolderScan.left_out``). ``check="decode"`` decodes every file and refuses any failure.
    The result is cached (:func:`scan_cache_dir`), keyed by the folder, ``classes``, the check
    and every file's name, size and modification time: a changed folder is scanned again.

    Raises:
        ConfigError: no class folders or images, a class not in ``classes``, or more
            unreadable files than allowed (the count and the first such file, one line).
    """
    if check not in CHECKS:
        raise ConfigError(f"check_images must be one of {CHECKS}, got {check!r}")
    try:
        own = _class_folders(path)
        if classes is not None:
            unknown = [name for name in own if name not in classes]
            if unknown:
                raise ConfigError(
                    f"{str(path)!r} has {len(unknown)} class folder(s) that train/ lacks, "
                    f"e.g. {unknown[0]!r}; val/ classes must be train/ classes")
            class_to_idx = {name: classes.index(name) for name in own}
        else:
            classes = own
            class_to_idx = {name: i for i, name in enumerate(own)}
        samples, seen_dirs, seen_files, empty = [], set(), set(), []
        for name in own:
            found = _walk_images(os.path.join(str(path), name), seen_dirs, seen_files)
            if not found:
                empty.append(name)
            samples.extend((file, class_to_idx[name]) for file in found)
        if empty:
            raise FileNotFoundError(
                f"Found no valid file for the classes {', '.join(empty)}. "
                f"Supported extensions are: {', '.join(IMG_EXTENSIONS)}")
    except (FileNotFoundError, NotADirectoryError, PermissionError) as err:
        raise ConfigError(f"cannot read image folder {str(path)!r}: {err}") from None
    files = [file for file, _ in samples]
    return _checked_scan(path, files, [label for _, label in samples], classes, check,
                         max_bad_fraction)


def has_images(path: Path) -> bool:
    """Whether ``path`` holds image files directly (an unlabelled, flat folder)."""
    with os.scandir(path) as entries:
        return any(not e.name.startswith(".") and e.name.lower().endswith(IMG_EXTENSIONS)
                   and e.is_file() for e in entries)


def scan_unlabelled(path: Path, *, check: str = "header",
                    max_bad_fraction: float = 0.0) -> FolderScan:
    """Every image file under ``path``, sub-folders included, checked as :func:`scan_folder`
    checks; labels -1, no classes.

    Raises:
        ConfigError: no images, or more unreadable files than allowed (one line).
    """
    if check not in CHECKS:
        raise ConfigError(f"check_images must be one of {CHECKS}, got {check!r}")
    files = _walk_images(str(path), set(), set())
    if not files:
        raise ConfigError(f"image folder {str(path)!r} holds no images")
    return _checked_scan(path, files, [-1] * len(files), [], check, max_bad_fraction)


def _checked_scan(path: Path, files: list[str], labels: list[int], classes: list[str],
                  check: str, max_bad_fraction: float) -> FolderScan:
    """Probe every file (cached, :class:`_ScanCache`), in threads; leave out up to the bad
    budget of unreadable ones, refuse more (any with ``check="decode"``)."""
    cache = _ScanCache(path, classes, check, files)
    probes = cache.read()
    if probes is None:
        threads = max(1, min(32, os.cpu_count() or 1))
        with ThreadPoolExecutor(threads) as pool:
            probe = functools.partial(_probe, decode=check == "decode")
            probes = [result for i in range(0, len(files), CHECK_CHUNK)
                      for result in pool.map(probe, files[i : i + CHECK_CHUNK])]
        cache.write(probes)
    bad = [(file, reason) for file, (_, reason) in zip(files, probes) if reason is not None]
    if bad and (check == "decode" or len(bad) > bad_budget(len(files), max_bad_fraction)):
        file, reason = bad[0]
        raise ConfigError(
            f"{len(bad)} of {len(files)} image files in {str(path)!r} cannot be read, e.g. "
            f"{file!r} ({reason}); remove or replace them"
        )
    keep = [i for i, (_, reason) in enumerate(probes) if reason is None]
    return FolderScan(
        files=np.array([files[i] for i in keep], dtype=object),
        labels=np.array([labels[i] for i in keep], dtype=np.int64),
        sides=np.array([probes[i][0] for i in keep], dtype=np.int64), classes=classes,
        left_out=tuple(bad),
    )


def scan_cache_dir() -> Path | None:
    """Where folder scans are cached: ``$SNCLR_CACHE_DIR`` (empty: nowhere), else
    ``$XDG_CACHE_HOME/snclr``, else ``~/.cache/snclr``."""
    if CACHE_ENV in os.environ:
        value = os.environ[CACHE_ENV]
        return Path(value) if value else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "snclr"


class _ScanCache:
    """One folder's cached probes: a JSON file named by the folder, its classes and the check.

    The file holds a key over every file's name, size and modification time; a file whose
    key differs (a changed folder) or that cannot be parsed is ignored and rewritten. It is
    written to a temporary file and renamed into place, so a concurrent reader sees the old
    file or the new one, never a part.
    """

    def __init__(self, path: Path, classes: list[str], check: str, files: list[str]) -> None:
        folder = Path(path).resolve()
        skip = len(str(path)) + 1  # every file is str(path)/...: names relative to it
        digest = hashlib.sha256()
        for file in files:
            try:
                stat = os.stat(file)
                digest.update(f"{file[skip:]}\0{stat.st_size}\0"
                              f"{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            except OSError:  # vanished since the walk: never matches, and the probe says why
                digest.update(f"{file}\0missing\n".encode("utf-8", "surrogateescape"))
        self.key = digest.hexdigest()
        self.count = len(files)
        name = hashlib.sha256(json.dumps([_CACHE_VERSION, str(folder), classes, check])
                              .encode("utf-8", "surrogateescape")).hexdigest()[:32]
        base = scan_cache_dir()
        self.file = None if base is None else base / "scans" / f"{name}.json"

    def read(self) -> list[tuple[int, str | None]] | None:
        if self.file is None:
            return None
        try:
            cached = json.loads(self.file.read_text())
            if cached["version"] != _CACHE_VERSION or cached["key"] != self.key:
                return None
            sides, reasons = cached["sides"], cached["reasons"]
            if len(sides) != self.count:
                return None
            return [(int(side), reasons.get(str(i))) for i, side in enumerate(sides)]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def write(self, probes: list[tuple[int, str | None]]) -> None:
        if self.file is None:
            return
        payload = {"version": _CACHE_VERSION, "key": self.key,
                   "sides": [side for side, _ in probes],
                   "reasons": {str(i): reason for i, (_, reason) in enumerate(probes)
                               if reason is not None}}
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.file.parent, prefix=".scan-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as out:
                    json.dump(payload, out)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, self.file)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as err:  # a read-only cache costs a rescan next time, nothing else
            print(f"warning: cannot write the scan cache {str(self.file)!r} "
                  f"({err.strerror or type(err).__name__}); the next launch scans again",
                  file=sys.stderr)
